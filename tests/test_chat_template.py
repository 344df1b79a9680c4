"""Chat templates render byte for byte as transformers renders them (its apply_chat_template with
tokenize=False is the reference), for templates that use what Hub templates use: tools passed
through `tojson` (non-ASCII, HTML-like characters, indentation), namespaces, loop controls,
`raise_exception`, `strftime_now` and the `{% generation %}` tag."""
import datetime
import os

import jinja2
import pytest

from rlhf_jax.text import chat_template

transformers = pytest.importorskip("transformers")

# A tool-calling template in the style of ChatML models: a system block listing the tools as
# JSON, assistant tool calls as JSON inside tags, tool results in their own turn.
TOOLS_TEMPLATE = """\
{%- set ns = namespace(system=none, calls=0) -%}
{%- if messages and messages[0].role == 'system' -%}
  {%- set ns.system = messages[0].content -%}
{%- endif -%}
{%- if tools -%}
<|im_start|>system
{{ ns.system if ns.system else 'You may call functions.' }}

Tools:
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
Schema of the first: {{ tools[0] | tojson(indent=2) }}<|im_end|>
{% elif ns.system %}
<|im_start|>system
{{ ns.system }}<|im_end|>
{% endif %}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% continue %}{% endif -%}
  {%- if m.role not in ['user', 'assistant', 'tool'] -%}
    {{ raise_exception('unknown role ' + m.role) }}
  {%- endif %}
<|im_start|>{{ m.role }}
{% if m.content %}{{ m.content }}{% endif %}
{% for call in m.tool_calls | default([]) %}
{% set ns.calls = ns.calls + 1 %}
{% set args = call.function.arguments %}
<tool_call>{{ {'name': call.function.name, 'arguments': args} | tojson }}</tool_call>
{% endfor %}
<|im_end|>
{% endfor -%}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}{% if ns.calls %}[{{ ns.calls }} calls]{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather at a place, e.g. \"北京\" or <Zürich & co>",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name 城市"},
        "unit": {"type": "string", "enum": ["°C", "°F"]}}}}}]

TOOL_CHAT = [
    {"role": "system", "content": "Be exact.   Spaces\tand tabs stay."},
    {"role": "user", "content": "Wetter in Zürich? 北京呢？🌧️ <b>bold</b> & 'quotes'"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Zürich <CH>", "unit": "°C"}}},
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"z": "北京 & \"上海\"", "a": 1}}}]},
    {"role": "tool", "content": "{\"temp\": 21, \"note\": \"<sunny>\"}"},
    {"role": "user", "content": "Danke！"},
]

# Generation-tagged template: the assistant's text and turn end are inside the tag.
GENERATION_TEMPLATE = """\
{{ bos_token }}{% for m in messages %}
{% if m.role == 'assistant' %}<|assistant|>
{% generation %}{{ m.content | trim }}<|end|>{% endgeneration %}
{% else %}<|{{ m.role }}|>
{{ m.content }}<|end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""

GEN_CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "  4 "},
            {"role": "user", "content": "再加一？"}, {"role": "assistant", "content": "五"}]


@pytest.fixture(scope="module")
def hf_tokenizer():
  """A PreTrainedTokenizerFast built in-process (no download): a tiny word-level vocabulary is
  enough, since only the rendered text is compared."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>")


def _reference(hf_tokenizer, template, messages, **kwargs):
  return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                          **kwargs)


SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_tool_template_matches_transformers(hf_tokenizer, generation_prompt):
  ours = chat_template.render(TOOLS_TEMPLATE, TOOL_CHAT, tools=TOOLS,
                              add_generation_prompt=generation_prompt, **SPECIAL)
  theirs = _reference(hf_tokenizer, TOOLS_TEMPLATE, TOOL_CHAT, tools=TOOLS,
                      add_generation_prompt=generation_prompt)
  assert ours == theirs
  # What the shared filter must do: keep "<", "&" and non-ASCII as they are, keep key order.
  assert '"arguments": {"z": "北京 & \\"上海\\"", "a": 1}' in ours
  assert "<Zürich & co>" in ours and "\\u003c" not in ours
  assert '\n  "type": "function",\n' in ours  # tojson(indent=2)
  assert ours.endswith("[2 calls]")


def test_tool_template_without_tools(hf_tokenizer):
  chat = [m for m in TOOL_CHAT if "tool_calls" not in m and m["role"] != "tool"]
  ours = chat_template.render(TOOLS_TEMPLATE, chat, add_generation_prompt=True, **SPECIAL)
  assert ours == _reference(hf_tokenizer, TOOLS_TEMPLATE, chat, add_generation_prompt=True)
  assert ours.startswith("<|im_start|>system\nBe exact.   Spaces\tand tabs stay.<|im_end|>\n")


def test_generation_template_and_spans(hf_tokenizer):
  text, spans = chat_template.render_with_spans(GENERATION_TEMPLATE, GEN_CHAT, **SPECIAL)
  assert text == _reference(hf_tokenizer, GENERATION_TEMPLATE, GEN_CHAT)
  assert text == chat_template.render(GENERATION_TEMPLATE, GEN_CHAT, **SPECIAL)
  # Each span is exactly an assistant's trimmed content and its turn end.
  assert [text[a:b] for a, b in spans] == ["4<|end|>", "五<|end|>"]


def test_raise_exception_is_a_template_and_value_error(hf_tokenizer):
  bad = [{"role": "robot", "content": "beep"}]
  with pytest.raises(jinja2.TemplateError, match="unknown role robot"):
    _reference(hf_tokenizer, TOOLS_TEMPLATE, bad)
  with pytest.raises(ValueError, match="unknown role robot"):
    chat_template.render(TOOLS_TEMPLATE, bad)
  with pytest.raises(jinja2.TemplateError):
    chat_template.render(TOOLS_TEMPLATE, bad)


def test_strftime_now_and_sandbox():
  year = datetime.datetime.now().strftime("%Y")
  assert chat_template.render("{{ strftime_now('%Y') }}", []) in (year, str(int(year) + 1))
  with pytest.raises(jinja2.exceptions.SecurityError):
    chat_template.render("{{ messages.__class__.__mro__ }}", [])
  with pytest.raises(jinja2.exceptions.SecurityError):
    chat_template.render("{% set ns = namespace(_x=1) %}", [])
  with pytest.raises(jinja2.exceptions.SecurityError):  # immutable: no in-place edits
    chat_template.render("{{ messages.append(1) }}", [])


def _smollm2_template():
  from rlhf_jax.models import pretrained
  from rlhf_jax.models.gguf_io import GGUFFile
  try:
    path = pretrained.resolve("smollm2_135m")
  except (FileNotFoundError, ValueError) as e:
    pytest.skip(f"SmolLM2 GGUF not installed: {e}")
  if not os.path.isfile(path):
    pytest.skip(f"SmolLM2 GGUF not installed ({path})")
  return GGUFFile(path).metadata["tokenizer.chat_template"]


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_smollm2_template_matches_transformers(hf_tokenizer, generation_prompt):
  template = _smollm2_template()
  chat = [{"role": "user", "content": "Hi <|im_end|> 你好！  "},
          {"role": "assistant", "content": "Hello 🤗"}, {"role": "user", "content": "北京？"}]
  for messages in (chat, chat[1:], [{"role": "system", "content": "Sys"}] + chat):
    ours = chat_template.render(template, messages, add_generation_prompt=generation_prompt,
                                **SPECIAL)
    assert ours == _reference(hf_tokenizer, template, messages,
                              add_generation_prompt=generation_prompt)
