"""The pipeline from a pretrained model (`configs/pipeline.py:model=<HF directory>`), on tiny
random stand-ins of Gemma 3 and Llama built from transformers' configs (no download).

One run per family, shared by the module: first interrupted (SFT stops after 2 of its 3 steps),
then the same command to the end, then once more. It must skip the tokenizer and pretrain stages
(the model's own tokenizer and weights), train every other stage with LoRA on the imported
shape, render every prompt with the model's chat template, resume the interrupted SFT rather
than restart it, and skip every stage the third time. The stand-ins' tokenizers differ in every
turn token (Gemma's <start_of_turn>, ChatML's <|im_start|>), so a rendered prompt says which
template a stage used. Gemma runs in CI; Llama, the same path on another family, in test-all.
"""
import json
import os

import jax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_models as H  # noqa: E402
from rlhf_jax.config import util as config_util  # noqa: E402
from rlhf_jax.core import checkpoint as ckpt_lib  # noqa: E402
from rlhf_jax.core import run_folder  # noqa: E402
from rlhf_jax.core.metrics import read_metrics  # noqa: E402
from rlhf_jax.eval import report  # noqa: E402
from rlhf_jax.models import lora  # noqa: E402
from rlhf_jax.recipe import pipeline  # noqa: E402
from rlhf_jax.recipe.markers import MODEL_STAGES  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.xdist_group("pipeline_pretrained")]

FAMILIES = [pytest.param("gemma3"), pytest.param("llama", marks=pytest.mark.heavy)]
LORA_STAGES = ("sft", "rm", "ppo", "kto", "dpo")
POLICY_STAGES = ("sft", "ppo", "kto", "dpo")
# A rendered one-turn prompt, spelled out from each family's published turn format (Gemma's
# trims the content).
PROMPT_FORMAT = {
    "gemma3": "<bos><start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n",
    "llama": "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
}


# Llama's run holds every LoRA stage's base in int8 (configs/pipeline.py base_quant): the
# quantised base through every trainer, the run folders and the evaluation.
BASE_QUANT = {"gemma3": "", "llama": "int8"}


def pipeline_config(model_dir: str, data_dir: str, base_quant: str = "", **fields):
  config = config_util.load_config(
      f"configs/pipeline.py:model={model_dir},smoke=1,base_quant={base_quant}")
  with config.unlocked():
    config.data_dir = data_dir
    # The stand-ins spell English nearly letter by letter (a 2k-piece vocabulary shared with
    # Chinese): longer prompts than a real tokenizer needs, so enough of them fit.
    config.ppo.data.max_prompt_len = 96
    config.comparisons.max_prompt_tokens = 96
    for key, value in fields.items():  # 'sft.train.stop_after': 2, as on the command line
      *path, name = key.split(".")
      section = config
      for part in path:
        section = section[part]
      section[name] = value
  return config


_RUNS = {}  # per process: one pipeline run per family, however the tests are ordered


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bundled_data_dir, bundled_tokenizer):
  """family -> (model dir, workdir, interrupted summary, finished summary, re-run summary)."""

  def get(family):
    if family not in _RUNS:
      root = tmp_path_factory.mktemp(f"pretrained_{family}")
      model = H.write_tiny_chat_model(family, str(root / f"tiny_{family}"),
                                      pieces=H.sentencepiece_pieces(bundled_tokenizer))
      workdir = str(root / "run")
      quant = BASE_QUANT[family]
      stopped = pipeline.run_pipeline(
          pipeline_config(model, bundled_data_dir, quant, **{"sft.train.stop_after": 2}),
          workdir)
      config = pipeline_config(model, bundled_data_dir, quant)
      finished = pipeline.run_pipeline(config, workdir)
      again = pipeline.run_pipeline(config, workdir)
      _RUNS[family] = (model, workdir, stopped, finished, again)
    return _RUNS[family]
  return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_runs_on_the_model_with_lora(runs, family):
  model, workdir, _, finished, _ = runs(family)
  for stage in MODEL_STAGES:  # the model's own tokenizer and weights: nothing to run
    assert finished[stage]["status"] == "from the pretrained model"
    assert not os.path.exists(os.path.join(workdir, stage))
  for stage in ("sft", "comparisons", "rm", "ppo", "kto", "dpo", "evaluate", "report"):
    assert finished[stage]["status"] == "ran", (stage, finished[stage])
  shape = {k: v for k, v in run_folder.read_record(os.path.join(workdir, "sft"))["model"].items()
           if k in ("d_model", "n_layers", "vocab_size")}
  with open(os.path.join(model, "config.json")) as f:
    hf = json.load(f)
  assert shape == {"d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
                   "vocab_size": hf["vocab_size"]}
  for stage in LORA_STAGES:
    record = run_folder.read_record(os.path.join(workdir, stage))
    assert record["model"]["lora_rank"] == 16, stage
    assert record["model"].get("lora_base_quant", "") == BASE_QUANT[family], stage
    assert record["tokenizer"]["kind"] == "pretrained", stage
    assert record["tokenizer"]["source"] == os.path.abspath(model), stage
  # SFT's base is the model itself; the later stages sit on SFT.
  sft_record = run_folder.read_record(os.path.join(workdir, "sft"))
  assert sft_record["base"]["source"] == os.path.abspath(model)
  for stage in ("kto", "dpo"):
    base = run_folder.read_record(os.path.join(workdir, stage))["base"]["source"]
    assert base == os.path.abspath(os.path.join(workdir, "sft")), stage
  # A LoRA policy run saves its adapters and nothing else.
  for stage in POLICY_STAGES:
    saved = ckpt_lib.read_params(run_folder.checkpoint_dir(os.path.join(workdir, stage)))
    assert lora.count_adapters(saved) == len(jax.tree.leaves(saved)) > 0, stage


@pytest.mark.parametrize("family", FAMILIES)
def test_the_interrupted_stage_resumed(runs, family):
  _, workdir, stopped, _, _ = runs(family)
  assert stopped["sft"]["status"] == "stopped"
  assert "comparisons" not in stopped  # the run ended at the stopped stage
  # Resumed from the step-2 checkpoint: each step trained (and logged its loss) exactly once.
  steps = [m["step"] for m in read_metrics(os.path.join(workdir, "sft")) if "train/loss" in m]
  assert steps == [1, 2, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_second_run_skips_every_stage(runs, family):
  _, _, _, _, again = runs(family)
  for stage in pipeline.STAGES:
    want = ("from the pretrained model" if stage in MODEL_STAGES
            else "ran" if stage == "report" else "skipped")
    assert again[stage]["status"] == want, (stage, again[stage])


@pytest.mark.parametrize("family", FAMILIES)
def test_report_has_every_section(runs, family):
  model, workdir, _, _, _ = runs(family)
  with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
    text = f.read()
  for title in report.SECTIONS:
    assert f"\n## {title}\n" in text, title
  for stage in MODEL_STAGES:
    assert f"| {stage} | from the pretrained model |" in text
  assert f"size `{os.path.basename(model)}`" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_are_rendered_with_the_models_chat_template(runs, family):
  model, workdir, _, _, _ = runs(family)
  with open(os.path.join(workdir, "evaluate", "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  first = results["samples"][results["langs"][0]][0]["prompt"]
  first = first.strip() if family == "gemma3" else first
  assert results["settings"]["rendered_prompt"] == PROMPT_FORMAT[family].format(first)
  # Every trained stage reads text with the model's tokenizer and its template.
  with open(os.path.join(model, "tokenizer_config.json")) as f:
    template = json.load(f)["chat_template"]
  for stage in LORA_STAGES:
    tokenizer = run_folder.tokenizer(os.path.join(workdir, stage))
    assert tokenizer.chat_template == template, stage
    ids = tokenizer.render_prompt([{"role": "user", "content": first}])
    assert tokenizer.decode(ids) == PROMPT_FORMAT[family].format(first), stage
