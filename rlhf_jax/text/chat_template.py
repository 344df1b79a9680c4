"""Rendering Hugging Face chat templates (Jinja) exactly as `transformers` renders them.

A checkpoint's chat template is written for transformers' Jinja environment, and a rendering
that differs by one character (a sorted key, an HTML-escaped "<", a kept newline) gives other
ids than the model was trained on. So the environment here is configured like transformers':

  - sandboxed and immutable (templates come from the Hub: untrusted code), with
    `trim_blocks` and `lstrip_blocks` on and the `loopcontrols` extension;
  - `tojson` is JSON as Python writes it: no HTML escaping (Jinja's own filter turns "<" into
    "\\u003c"), no key sorting, `ensure_ascii=False`, with `indent`, `separators`, `sort_keys`;
  - globals `raise_exception(msg)` (a `ChatTemplateError`), `strftime_now(fmt)`, `dict(...)`
    and a `namespace` that refuses underscore-prefixed attributes;
  - the `{% generation %} ... {% endgeneration %}` tag: it renders its body unchanged and, when
    asked, records the character span of each such block (the assistant text a loss trains on);
  - the variables `messages`, `tools`, `documents` (None unless given), `add_generation_prompt`
    plus any keyword (bos_token, eos_token, ...) the caller passes.

Compiled templates are cached by source: rendering a chat per example would otherwise parse the
template each time.
"""
from __future__ import annotations

import contextvars
import datetime
import functools
import json
from typing import Any, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(jinja2.TemplateError, ValueError):
  """`raise_exception` in a template: a jinja2 TemplateError, as transformers raises, and a
  ValueError, as every other malformed chat is here."""


class GenerationTag(jinja2.ext.Extension):
  """`{% generation %}body{% endgeneration %}`: renders body; records its span while tracking.

  The span is the offset of the block in the text rendered so far, so tracking needs the caller
  to collect the rendered blocks as they come out (see `render_with_spans`).
  """
  tags = {"generation"}

  def __init__(self, environment):
    super().__init__(environment)
    # (rendered blocks, spans) of the rendering in progress in this thread / task, or None.
    self.tracking = contextvars.ContextVar("generation_tracking", default=None)

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

  def _block(self, caller) -> str:
    text = caller()
    tracking = self.tracking.get()
    if tracking is not None:
      blocks, spans = tracking
      start = sum(len(b) for b in blocks)
      spans.append((start, start + len(text)))
    return text


def _raise_exception(message):
  raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


class _TemplateDict:
  """`dict(...)` and `dict.fromkeys(...)` without exposing the dict type itself."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class SafeNamespace(jinja2.utils.Namespace):
  """Jinja's namespace, refusing underscore-prefixed names (a way towards CPython internals)."""

  def __init__(*args, **kwargs):  # noqa: N805 - Jinja's own signature trick keeps `self=` usable
    self, rest = args[0], args[1:]
    attrs = dict(*rest, **kwargs)
    for name in attrs:
      SafeNamespace.check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    SafeNamespace.check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def check_name(name) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"chat templates cannot store underscore-prefixed attributes ({name!r})")


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
  """The compiled template in an environment configured as the module docstring says."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                     dict=_TemplateDict(), namespace=SafeNamespace)
  return env.from_string(source)


def _variables(messages, tools, documents, add_generation_prompt, extra) -> dict:
  return dict(extra, messages=list(messages), tools=tools, documents=documents,
              add_generation_prompt=bool(add_generation_prompt))


def render(source: str, messages: Sequence[dict], *, tools: Optional[list] = None,
           documents: Optional[list] = None, add_generation_prompt: bool = False,
           **extra: Any) -> str:
  """The chat as text, as `apply_chat_template(..., tokenize=False)` gives it."""
  template = compile_template(source)
  return template.render(**_variables(messages, tools, documents, add_generation_prompt, extra))


def render_with_spans(source: str, messages: Sequence[dict], *, tools: Optional[list] = None,
                      documents: Optional[list] = None, add_generation_prompt: bool = False,
                      **extra: Any) -> tuple[str, list[tuple[int, int]]]:
  """(text, [(start, end)] character spans of the `{% generation %}` blocks)."""
  template = compile_template(source)
  tag = next(e for e in template.environment.extensions.values() if isinstance(e, GenerationTag))
  blocks: list[str] = []
  spans: list[tuple[int, int]] = []
  token = tag.tracking.set((blocks, spans))
  try:
    variables = _variables(messages, tools, documents, add_generation_prompt, extra)
    for block in template.generate(**variables):
      blocks.append(block)
  finally:
    tag.tracking.reset(token)
  return "".join(blocks), spans


# Gemma's turn format, for Gemma GGUF files that carry no tokenizer.chat_template (the 270M
# base model's does not): "<bos>", then per message "<start_of_turn>{user|model}\n" + content
# (trimmed) + "<end_of_turn>\n", the assistant's role written "model"; a system message has no
# turn of its own but goes, followed by a blank line, before the first user message's content;
# roles must alternate user / assistant; the generation prompt is "<start_of_turn>model\n".
# This is the rendering google/gemma-3-*'s tokenizer_config.json template gives for text chats.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prefix='', turns=messages) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set ns.turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in ns.turns -%}"
    "{%- if (message['role'] == 'user') != loop.index0 is even -%}"
    "{{ raise_exception('Gemma chats alternate user and assistant turns, starting with user') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role'])"
    " + '\\n' + (ns.prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")

# Chat templates of architectures whose GGUF files may come without one, by
# general.architecture.
FAMILY_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}
