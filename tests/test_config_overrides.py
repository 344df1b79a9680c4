"""Fields that repeat another follow every override of it, through the command line's path.

DERIVED is the one table of such fields. Three checks keep it honest: each row holds on the
config as built and after `--config.<source>=` (absl config_flags, as rlhf_jax.main and the
pipeline parse it); overriding every numeric field in turn changes exactly the rows' dependents
and nothing else (a new link must be listed); and no config file copies a field's value
(`x = config.a.b`) except where ALLOWED_COPIES says why that is safe.
"""
import ast
import copy
import glob
import json
import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from rlhf_jax.config import util as config_util
from rlhf_jax.recipe import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_SECTIONS = ("pretrain", "sft", "rm", "ppo", "kto", "dpo")
TWICE = 2  # rm.eval.max_comparisons: every held-out prompt of both languages, one comparison each

PPO = ("configs/ppo.py:size=tiny", "configs/ppo.py:model=smollm2_135m")
PIPELINE = ("configs/pipeline.py", "configs/pipeline.py:smoke=1")
SIZED = tuple(f"configs/{name}.py:size=tiny"  # a model of a named size
              for name in ("pretrain", "sft", "sft_hf", "reward", "ppo", "kto", "dpo"))
IMPORTED = ("configs/sft_hf.py", "configs/ppo.py:model=smollm2_135m",
            "configs/reward.py:model=smollm2_135m")

# The table: (source field, dependent field, dependent = factor * source, configs).
DERIVED = [
    ("sampling.max_new_tokens", "eval.max_new_tokens", 1, PPO),
    ("ppo.sampling.max_new_tokens", "ppo.eval.max_new_tokens", 1, PIPELINE),
    ("ppo.sampling.max_new_tokens", "evaluate.max_new_tokens", 1, PIPELINE),
    ("comparisons.heldout_per_lang", "rm.eval.max_comparisons", TWICE, PIPELINE),
    # A model of a named size takes its tokenizer's vocabulary, an imported model's tokenizer
    # the model's (the pipeline then sets each stage's from its top-level tokenizer section).
    ("tokenizer.vocab_size", "model.vocab_size", 1, SIZED),
    *[(f"{s}.tokenizer.vocab_size", f"{s}.model.vocab_size", 1, PIPELINE)
      for s in PIPELINE_SECTIONS],
    ("model.vocab_size", "tokenizer.vocab_size", 1, IMPORTED),
]
CASES = [(spec, source, dependent, factor)
         for source, dependent, factor, specs in DERIVED for spec in specs]
SPECS = sorted({case[0] for case in CASES})

# Reads of a field's value while a config is built, each with why it cannot go stale.
ALLOWED_COPIES = {
    # data.seq_len = min(seq_len argument, model.max_len): a cap no FieldReference op can
    # express; a later model.max_len override below it is refused by rlhf_jax.config.validate.
    "config.model.max_len",
    # rm.data.max_answers: the pipeline sets it from comparisons.k when it runs the RM.
    "config.comparisons.k",
}


def parse(argv):
  """`argv` as rlhf_jax.main parses it: config_flags with a locked config, overrides applied."""
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                           lock_config=True, sys_argv=argv)
  flag_values(argv)
  return holder.value


def get(config, path):
  for part in path.split("."):
    config = config[part]
  return config


def bumped(value):
  """A different value of the same type, far from the default (so no row holds by chance)."""
  return value + 7 if isinstance(value, int) else value * 3.0 + 1.0


@pytest.mark.parametrize("spec,source,dependent,factor", CASES)
def test_derived_field_holds_as_built(spec, source, dependent, factor):
  config = config_util.load_config(spec)
  assert get(config, dependent) == factor * get(config, source)


@pytest.mark.parametrize("spec,source,dependent,factor", CASES)
def test_override_of_the_source_reaches_the_dependent(spec, source, dependent, factor):
  new = bumped(get(config_util.load_config(spec), source))
  config = parse(["prog", f"--config={spec}", f"--config.{source}={new}"])
  assert get(config, source) == new
  assert get(config, dependent) == factor * new
  # Checkpoints and the pipeline's summary store the config as JSON: plain values there.
  saved = json.loads(json.dumps(config.to_dict()))
  assert get(saved, dependent) == factor * new


@pytest.mark.parametrize("spec,source,dependent,factor", CASES)
def test_override_of_the_dependent_changes_it_alone(spec, source, dependent, factor):
  built = config_util.load_config(spec)
  new = bumped(get(built, dependent))
  config = parse(["prog", f"--config={spec}", f"--config.{dependent}={new}"])
  assert get(config, dependent) == new
  assert get(config, source) == get(built, source)


def numeric_fields(config, prefix=""):
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from numeric_fields(value, f"{prefix}{key}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield f"{prefix}{key}", value


@pytest.mark.parametrize("spec", SPECS)
def test_every_link_is_in_the_table(spec):
  """Overrides each numeric field alone, as config_flags does (holder[field] = value), and
  records which other fields moved: exactly the table's dependents of that source."""
  config = config_util.load_config(spec)
  before = dict(numeric_fields(config))
  links = set()
  for path, value in before.items():
    changed = copy.deepcopy(config)
    *parents, field = path.split(".")
    holder = get(changed, ".".join(parents)) if parents else changed
    holder[field] = bumped(value)
    after = dict(numeric_fields(changed))
    links |= {(path, other) for other in before
              if other != path and after[other] != before[other]}
  assert links == {(src, dep) for s, src, dep, _ in CASES if s == spec}


def field_reads(tree):
  """'config.a.b' for every value read below a section of `config` (`config.a` alone is a
  section passed on whole; `config.a.get_ref(...)` is the link itself, not a copy)."""
  inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
  for node in ast.walk(tree):
    if (not isinstance(node, ast.Attribute) or id(node) in inner
        or not isinstance(node.ctx, ast.Load)):
      continue
    chain, root = [], node
    while isinstance(root, ast.Attribute):
      chain.append(root.attr)
      root = root.value
    if (isinstance(root, ast.Name) and root.id == "config" and len(chain) >= 2
        and chain[0] not in ("get_ref", "get_oneway_ref")):
      yield ".".join(["config"] + chain[::-1])


def test_config_files_copy_no_field_value():
  files = glob.glob(os.path.join(REPO, "configs", "*.py")) + [
      os.path.join(REPO, "rlhf_jax", "config", f"{name}.py")
      for name in ("util", "sections", "stage_sections", "preference")]
  copies = set()
  for path in files:
    with open(path, encoding="utf-8") as f:
      copies |= set(field_reads(ast.parse(f.read())))
  assert copies <= ALLOWED_COPIES, sorted(copies - ALLOWED_COPIES)


class _Context(pipeline.Context):
  """The pipeline's stage configs without a finished tokenizer stage on disk."""

  @property
  def tokenizer_path(self):
    return "/unused/tokenizer.model"


def test_pipeline_vocabulary_reaches_every_stage(tmp_path):
  """The pipeline fills each stage's vocabulary in from its top-level tokenizer section."""
  config = parse(["prog", "--config=configs/pipeline.py", "--config.tokenizer.vocab_size=6000"])
  ctx = _Context(config=config, workdir=str(tmp_path), upstream=None,
                 local=frozenset(pipeline.STAGES))
  for stage in PIPELINE_SECTIONS:
    stage_config = ctx.stage_config(stage)
    assert stage_config.model.vocab_size == 6000, stage
    assert stage_config.tokenizer.vocab_size == 6000, stage
