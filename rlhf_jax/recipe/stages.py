"""The stages of the recipe, each a function of the pipeline's Context: what it reads from earlier
stages (through their run folders), what it runs, and the key metrics of its summary line.

Each returns (key metrics, the text of its summary line); the driver (recipe/pipeline.py) writes
them into the stage's DONE.json and prints the line.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from typing import Callable

from rlhf_jax.config import util as config_util
from rlhf_jax.core import run_folder
from rlhf_jax.models.transformer import NUMERICS_FIELDS
from rlhf_jax.recipe.markers import (DONE, POLICIES, MissingStageError, StageStopped, fmt,
                                     last_values, parse_langs, read_done, write_json_atomic)
from rlhf_jax.text import tokenizer as tok_lib
from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
from rlhf_jax.train.inputs import tokenizer_corpus
from rlhf_jax.train import launch
from rlhf_jax.core.metrics import read_metrics
from rlhf_jax.recipe import comparisons
from rlhf_jax.data import builders
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.eval import policies as evaluate
from rlhf_jax.eval import report

# ---------------------------------------------------------------------------------------------
# Where each stage is and how it is configured.


@dataclasses.dataclass
class Context:
  """What every stage reads: the config, this workdir, and where each earlier stage lives."""
  config: object
  workdir: str
  upstream: str | None
  local: frozenset  # stages that run (or were run) in this workdir
  skipped: frozenset = frozenset()  # stages left out by config.skip
  replaced: frozenset = frozenset()  # stages a pretrained model stands in for (config.model)

  @property
  def langs(self) -> tuple[str, ...]:
    return parse_langs(self.config.langs)

  @property
  def data_dir(self) -> str | None:
    return self.config.data_dir or None

  def stage_dir(self, stage: str) -> str:
    """This workdir's stage if it runs here or finished here earlier (an earlier --only run
    in the same workdir), else the upstream's."""
    own = os.path.join(self.workdir, stage)
    if stage in self.local or not self.upstream or read_done(own) is not None:
      return own
    return os.path.join(self.upstream, stage)

  def require(self, stage: str) -> str:
    """The directory of a finished earlier stage, or an error saying how to get it. A stage
    the pretrained model stands in for is the model itself (a preset name or its path)."""
    if stage in self.replaced:
      return self.config.model
    directory = self.stage_dir(stage)
    if read_done(directory) is None:
      where = ("the upstream workdir " + self.upstream
               if self.upstream and stage not in self.local else "this workdir")
      raise MissingStageError(f"stage {stage!r} has not finished in {where} (no "
                              f"{os.path.join(directory, DONE)}): run the pipeline there first")
    return directory

  def available(self, stage: str) -> bool:
    return read_done(self.stage_dir(stage)) is not None

  @property
  def tokenizer_path(self) -> str:
    if "tokenizer" in self.replaced:  # the model's own, with its chat template
      return self.config.model
    # The tokenizer stage writes it where a run folder keeps its own (core/run_folder.py).
    return run_folder.tokenizer_file(os.path.dirname(self.require("tokenizer")))

  def tokenizer(self):
    """The tokenizer every stage reads text with: sentencepiece, or the model's own."""
    return load_any_tokenizer(self.tokenizer_path, self.config.tokenizer.vocab_size)

  def stage_config(self, stage: str):
    """A copy of the stage's section with the paths between stages and the shared fields
    filled in (never written back into the pipeline config)."""
    config = copy.deepcopy(self.config[stage])
    config.unlock()
    shape = {k: v for k, v in self.config.pretrain.model.to_dict().items()
             if k not in NUMERICS_FIELDS}
    for key, value in shape.items():
      config.model[key] = value
    config.model.vocab_size = self.config.tokenizer.vocab_size
    config.tokenizer.vocab_size = self.config.tokenizer.vocab_size
    config.tokenizer.path = self.tokenizer_path
    config.seed = self.config.seed + config.seed
    config.data.data_dir = self.config.data_dir
    return config


# ---------------------------------------------------------------------------------------------
# The stages. Each returns (key metrics, the text of its summary line).


def run_tokenizer(ctx: Context):
  cfg = ctx.config.tokenizer
  path = run_folder.tokenizer_file(ctx.workdir)
  if cfg.path:  # a given model, copied in so the workdir stands on its own
    if not os.path.exists(cfg.path):
      raise FileNotFoundError(f"config.tokenizer.path={cfg.path} does not exist")
    for suffix in (".vocab", ".model"):  # the .model last: its presence means complete
      src = cfg.path[:-len(".model")] + suffix
      if os.path.exists(src):
        shutil.copyfile(src, path + ".tmp")
        os.replace(path + ".tmp", path[:-len(".model")] + suffix)
  else:
    tok_lib.train_tokenizer(tokenizer_corpus(), path[:-len(".model")], cfg.vocab_size,
                            character_coverage=cfg.character_coverage, seed=ctx.config.seed)
  vocab = tok_lib.Tokenizer.load(path).vocab_size
  if vocab != cfg.vocab_size:
    raise ValueError(f"the tokenizer {cfg.path or path} has {vocab} pieces but "
                     f"config.tokenizer.vocab_size={cfg.vocab_size}")
  return {"vocab_size": vocab}, f"{vocab} pieces"


def run_trainer(ctx: Context, stage: str, config) -> dict:
  """launch.run in W/<stage>; StageStopped unless the run reached its last step."""
  stage_dir = os.path.join(ctx.workdir, stage)
  returned = launch.run(config, stage_dir)
  step = run_folder.latest_step(stage_dir)
  if stage == "rm":  # one epoch by default: its normalisation is written only after the last
    finished = os.path.exists(os.path.join(stage_dir, "normalization.json"))
  elif config.train.steps:
    finished = step == config.train.steps
  else:  # steps = 0: epochs over the data, a count only the trainer knows
    finished = step is not None and step != config.train.stop_after
  if not finished or "preempted_at" in returned:
    raise StageStopped(f"[{stage}] stopped at step {step}"
                       + (f" of {config.train.steps}" if config.train.steps else "")
                       + ": run the same command again to resume from its checkpoint")
  return {**last_values(read_metrics(stage_dir)), **returned}


def run_pretrain(ctx: Context):
  config = ctx.stage_config("pretrain")
  if ctx.config.get("model"):  # continued pretraining: from the model's own weights
    config.init_from = ctx.config.model
  m = run_trainer(ctx, "pretrain", config)
  return {"train/loss": m.get("train/loss")}, f"loss {fmt(m.get('train/loss'), 3)}"


def run_sft(ctx: Context):
  config = ctx.stage_config("sft")
  config.init_from = ctx.require("pretrain")
  m = run_trainer(ctx, "sft", config)
  return {"train/loss": m.get("train/loss")}, f"loss {fmt(m.get('train/loss'), 3)}"


def comparisons_data_dir(stage_dir: str) -> str:
  return os.path.join(stage_dir, "tfds")


def run_comparisons(ctx: Context):
  cfg, langs = ctx.config.comparisons, ctx.langs
  if cfg.rounds < 1:
    raise ValueError(f"config.comparisons.rounds must be >= 1, got {cfg.rounds}")
  sft_dir = ctx.require("sft")
  tokenizer = ctx.tokenizer()
  params, model_config = run_folder.load_policy(sft_dir)
  prompts, prompt_langs = [], []
  # Training prompts, then held-out ones: the comparisons keep their prompt's split, so the
  # RM's held-out accuracy is measured on prompts it never trained on.
  # Each training prompt is answered `rounds` times (K fresh answers, ranked afresh each time):
  # more comparisons when the prompts run out. Held-out prompts are answered once.
  by_lang = config_util.parse_by_lang(
      cfg.get("prompts_by_lang", ""), "comparisons.prompts_by_lang", what="prompts",
      integer=True, minimum=1, langs=langs, langs_field="langs")
  train_per_lang = {lang: by_lang.get(lang, cfg.prompts_per_lang) for lang in langs}
  for splits, per_lang, rounds in ((("train",), train_per_lang, cfg.rounds),
                                   (("validation",), cfg.heldout_per_lang, 1)):
    ps, ls = comparisons.choose_prompts(tokenizer, per_lang, data_dir=ctx.data_dir,
                                        seed=ctx.config.seed, splits=splits, langs=langs,
                                        max_prompt_tokens=cfg.max_prompt_tokens)
    prompts += ps * rounds
    prompt_langs += ls * rounds
  answers = comparisons.sample_answers(
      params, model_config, tokenizer, prompts, cfg.k, seed=ctx.config.seed,
      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
      batch_size=cfg.batch_size)
  records, info = comparisons.build_records(prompts, answers, prompt_langs,
                                            seed=ctx.config.seed, label=cfg.label,
                                            target_agreement=cfg.agreement, source="sft")
  stage_dir = os.path.join(ctx.workdir, "comparisons")
  path = builders.write_comparisons(records, config=cfg.name,
                                    data_dir=comparisons_data_dir(stage_dir), overwrite=True,
                                    description=f"K={cfg.k} answers of {sft_dir}")
  info.update({"path": path, "records": len(records), "k": cfg.k, "sft": sft_dir})
  write_json_atomic(os.path.join(stage_dir, "info.json"), info)
  metrics = {"records": len(records)}
  for lang, lang_info in info["langs"].items():
    metrics[f"label_gold_agreement/{lang}"] = lang_info["label_gold_agreement"]
    metrics[f"comparisons/{lang}"] = lang_info["comparisons"]
  agree = " ".join(f"{lang} {fmt(metrics.get(f'label_gold_agreement/{lang}'))}"
                   for lang in info["langs"])
  return metrics, f"{len(records)} prompts x {cfg.k} answers, labels agree with gold: {agree}"


def run_rm(ctx: Context):
  config = ctx.stage_config("rm")
  cfg = ctx.config.comparisons
  config.init_from = ctx.require("sft")
  config.data.name = f"rlhf_comparisons/{cfg.name}"
  config.data.data_dir = comparisons_data_dir(ctx.require("comparisons"))
  config.data.max_answers = cfg.k
  m = run_trainer(ctx, "rm", config)
  keys = ["rm/loss", "eval/rm/accuracy", "eval/rm/gold_accuracy"] + [
      f"eval/rm/{what}/{lang}" for what in ("accuracy", "gold_accuracy") for lang in ctx.langs]
  metrics = {k: m.get(k) for k in keys}
  line = "held-out acc. " + " ".join(
      f"{lang} {fmt(m.get(f'eval/rm/accuracy/{lang}'))}" for lang in ctx.langs)
  line += "  vs gold " + " ".join(
      f"{lang} {fmt(m.get(f'eval/rm/gold_accuracy/{lang}'))}" for lang in ctx.langs)
  return metrics, line


def run_ppo(ctx: Context):
  config = ctx.stage_config("ppo")
  config.sft_dir = ctx.require("sft")
  config.rm_dir = ctx.require("rm")
  config.data.lang = "both" if len(ctx.langs) == 2 else ctx.langs[0]
  m = run_trainer(ctx, "ppo", config)
  metrics = {k: m.get(k) for k in ("objective/kl", "objective/kl_coef", "objective/scores")}
  for lang in ctx.langs:
    for what in ("win_rate", "gold", "gold_sft", "proxy", "kl"):
      metrics[f"eval/{lang}/{what}"] = m.get(f"eval/{lang}/{what}")
  line = " ".join(f"{lang} win {fmt(m.get(f'eval/{lang}/win_rate'))}" for lang in ctx.langs)
  return metrics, f"{line} kl {fmt(m.get('objective/kl'), 1)}"


def run_kto(ctx: Context):
  config = ctx.stage_config("kto")  # the bundled human thumbs, in config.data_dir
  config.init_from = ctx.require("sft")
  m = run_trainer(ctx, "kto", config)
  metrics = {k: m.get(k) for k in ("kto/loss", "eval/kto/liked_over_disliked",
                                   "eval/kto/initial/liked_over_disliked")}
  return metrics, (f"loss {fmt(m.get('kto/loss'), 3)}  held-out liked over disliked "
                   f"{fmt(m.get('eval/kto/initial/liked_over_disliked'))} -> "
                   f"{fmt(m.get('eval/kto/liked_over_disliked'))}")


def run_dpo(ctx: Context):
  config = ctx.stage_config("dpo")
  config.init_from = ctx.require("sft")
  config.data.names = f"rlhf_comparisons/{ctx.config.comparisons.name}"
  config.data.data_dir = comparisons_data_dir(ctx.require("comparisons"))
  m = run_trainer(ctx, "dpo", config)
  metrics = {k: m.get(k) for k in ("dpo/loss", "eval/dpo/accuracy",
                                   "eval/dpo/initial/accuracy")}
  return metrics, (f"loss {fmt(m.get('dpo/loss'), 3)}  held-out pair accuracy "
                   f"{fmt(m.get('eval/dpo/initial/accuracy'))} -> "
                   f"{fmt(m.get('eval/dpo/accuracy'))}")


def run_evaluate(ctx: Context):
  cfg = ctx.config.evaluate
  policies = {"sft": ctx.require("sft")}
  for name in POLICIES[1:]:
    if name not in ctx.skipped and ctx.available(name):
      policies[name] = ctx.stage_dir(name)
  settings = dict(data_dir=ctx.data_dir, prompts_per_lang=cfg.prompts_per_lang,
                  max_prompt_len=ctx.config.ppo.data.max_prompt_len,
                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                  top_p=cfg.top_p, seed=cfg.seed, samples_per_lang=cfg.samples_per_lang)
  tokenizer = ctx.tokenizer()
  # The model's own tokenizer (an object) when it stood in for the tokenizer stage, else the path.
  results = evaluate.evaluate_policies(
      policies, tokenizer if "tokenizer" in ctx.replaced else ctx.tokenizer_path, ctx.langs,
      **settings)
  # What the policies were shown: the first held-out prompt as its chat template renders it.
  first = results["samples"][results["langs"][0]][:1]
  if first:
    results["settings"]["rendered_prompt"] = tokenizer.decode(
        prompts_lib.render(tokenizer, first[0]["prompt"]))
  write_json_atomic(os.path.join(ctx.workdir, "evaluate", "results.json"), results)
  metrics = {f"{name}/{lang}/{k}": v for name, by_lang in results["metrics"].items()
             for lang, row in by_lang.items() for k, v in row.items()
             if k in ("gold", "win_rate")}
  parts = [f"{name} " + " ".join(f"{lang} {fmt(results['metrics'][name][lang]['win_rate'])}"
                                 for lang in results["langs"])
           for name in results["policies"] if name != "sft"]
  return metrics, "win vs SFT: " + ("; ".join(parts) or "no policy but SFT")


def run_report(ctx: Context):
  path = report.write_report(ctx.workdir)
  return {}, path


STAGE_FNS: dict[str, Callable] = {
    "tokenizer": run_tokenizer, "pretrain": run_pretrain, "sft": run_sft,
    "comparisons": run_comparisons, "rm": run_rm, "ppo": run_ppo, "kto": run_kto,
    "dpo": run_dpo, "evaluate": run_evaluate, "report": run_report}
