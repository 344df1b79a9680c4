r"""The whole recipe in one command: each stage in its own directory, each resumable.

  python -m rlhf_jax.recipe.pipeline --config=configs/pipeline.py[:args] [--config.x.y=v ...] \
      --workdir=W [--only=rm,ppo] [--from=ppo] [--upstream=W0]

Stages, in order (configs/pipeline.py holds one section per stage):
  tokenizer    sentencepiece on the bundled English + Chinese text     W/tokenizer/
  pretrain     next-token training on packed text                       W/pretrain/
  sft          assistant-only loss on dialogues                         W/sft/
  comparisons  K answers per prompt from SFT, graded by simulated       W/comparisons/tfds/
               annotators calibrated to people's agreement
  rm           reward model on those comparisons                        W/rm/
  ppo          the SFT policy against the RM, KL penalty to SFT         W/ppo/
  kto          SFT fine-tuned on the real human likes / dislikes        W/kto/
  dpo          SFT fine-tuned on the comparisons' pairs, no RM          W/dpo/
  evaluate     every policy on held-out prompts: gold, win rate vs SFT  W/evaluate/results.json
  report       W/report.md and W/plots/*.png                            (always rebuilt)

A finished stage writes W/<stage>/DONE.json (seconds, key metrics, config hash), atomically and
last; a re-run skips it. A trainer stopped part-way (killed, SIGTERM, train.stop_after) has no
DONE.json: the same command resumes it from its checkpoint. Stages that write data (comparisons,
evaluate) start over when unfinished: their output is taken as complete only with DONE.json.

`--only=a,b` redoes exactly those stages; `--from=s` redoes s and every later stage. A redone
stage's output is deleted first, unless it was interrupted under the same config: then the
same command, run again, continues it. `--upstream=W0` takes every stage that is not redone
here from the finished pipeline workdir W0 (it must have finished them): sweeps share one
tokenizer, pretraining, SFT and RM this way. The report is rebuilt at the end of every
invocation.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Callable, Sequence

from absl import app, flags

from rlhf_jax.config import overrides, validate
from rlhf_jax.core.langs import LANGS
from rlhf_jax.core import run_folder
from rlhf_jax.models.transformer import NUMERICS_FIELDS

log = logging.getLogger("rlhf_jax.recipe.pipeline")

STAGES = ("tokenizer", "pretrain", "sft", "comparisons", "rm", "ppo", "kto", "dpo",
          "evaluate", "report")
TRAINED = ("pretrain", "sft", "rm", "ppo", "kto", "dpo")  # run by a trainer (resumable)
OPTIONAL = ("ppo", "kto", "dpo")  # stages `config.skip` may leave out
POLICIES = ("sft", "ppo", "kto", "dpo")  # compared by the evaluate stage, SFT the baseline
# Whose outputs each stage reads: a stage finished before one of these was redone is stale.
DEPENDS = {"pretrain": ("tokenizer",), "sft": ("tokenizer", "pretrain"), "comparisons": ("sft",),
           "rm": ("sft", "comparisons"), "ppo": ("sft", "rm"), "kto": ("sft",),
           "dpo": ("sft", "comparisons"), "evaluate": ("sft", "ppo", "kto", "dpo")}
DONE = "DONE.json"
STARTED = "STARTED.json"  # the config hash a stage was started with (to resume, or not)
SUMMARY = "summary.json"
# Model fields a stage keeps its own (models.transformer.NUMERICS_FIELDS); every other model
# field comes from config.pretrain.model.


class StageStopped(RuntimeError):
  """A trainer returned before its last step (preempted, or train.stop_after): resumable."""


class MissingStageError(RuntimeError):
  """A stage needs the output of one that has not finished where the pipeline looks for it."""


# ---------------------------------------------------------------------------------------------
# Small helpers.


def write_json_atomic(path: str, obj) -> None:
  """Writes a temporary file next to `path` and renames it: readers see all of it or none."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False, sort_keys=False)
  os.replace(tmp, path)


def read_marker(stage_dir: str, name: str = DONE) -> dict | None:
  path = os.path.join(stage_dir, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_done(stage_dir: str) -> dict | None:
  """The stage's DONE.json, or None while it has not finished."""
  return read_marker(stage_dir, DONE)


def parse_langs(langs: str) -> tuple[str, ...]:
  out = tuple(l.strip() for l in str(langs).split(",") if l.strip())
  bad = [l for l in out if l not in LANGS]
  if not out or bad or len(set(out)) != len(out):
    raise ValueError(f"config.langs={langs!r}: give 'en,zh', 'en' or 'zh'")
  return out


def parse_stages(value, what: str) -> list[str]:
  """'rm,ppo' or a sequence -> stage names, checked against STAGES."""
  names = value.split(",") if isinstance(value, str) else list(value)
  names = [n.strip() for n in names if n.strip()]
  bad = [n for n in names if n not in STAGES]
  if bad:
    raise ValueError(f"{what}: unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
  return names


def config_hash(config, stage: str) -> str:
  """A short hash of what determines a stage's output: its section and the shared fields,
  less train.stop_after (where to pause changes nothing). The section never holds the paths
  between stages: those go into a copy (Context.stage_config)."""
  section = config[stage].to_dict() if stage in config else {}
  section.get("train", {}).pop("stop_after", None)
  shared = {k: config[k] for k in ("size", "langs", "data_dir", "seed")}
  blob = json.dumps({"stage": stage, "section": section, "shared": shared}, sort_keys=True,
                    default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stage_status(config, workdir: str, stage: str) -> str:
  """"missing" (no W/<stage>/DONE.json), "stale" or "done": what the driver weighs before it
  skips a finished stage, for callers that decide from outside (sweeps sharing one base).

  Stale: finished under another config hash, or before a stage it reads (DEPENDS, in the same
  workdir) was redone. The report has no DONE.json, so it is always "missing".
  """
  stage_dir = os.path.join(workdir, stage)
  done = read_done(stage_dir)
  if done is None:
    return "missing"
  newer = [d for d in DEPENDS.get(stage, ())
           if _done_time(os.path.join(workdir, d)) > _done_time(stage_dir)]
  if newer or done.get("config_hash") != config_hash(config, stage):
    return "stale"
  return "done"


def last_values(records: Sequence[dict]) -> dict:
  """{metric: its last logged value} over metrics.jsonl records."""
  out: dict = {}
  for r in records:
    out.update({k: v for k, v in r.items() if k not in ("step", "time")})
  return out


def _fmt(value, digits: int = 2) -> str:
  """A metric for a summary line; metrics.jsonl holds non-finite values as strings."""
  try:
    return f"{float(value):.{digits}f}"
  except (TypeError, ValueError):
    return "n/a"


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
    """The directory of a finished earlier stage, or an error saying how to get it."""
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
    # The tokenizer stage writes it where a run folder keeps its own (core/run_folder.py).
    return run_folder.tokenizer_file(os.path.dirname(self.require("tokenizer")))

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
  from rlhf_jax.text import tokenizer as tok_lib
  from rlhf_jax.train.inputs import tokenizer_corpus
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


def _run_trainer(ctx: Context, stage: str, config) -> dict:
  """launch.run in W/<stage>; StageStopped unless the run reached its last step."""
  from rlhf_jax.core import launch
  from rlhf_jax.core.metrics import read_metrics
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
  m = _run_trainer(ctx, "pretrain", ctx.stage_config("pretrain"))
  return {"train/loss": m.get("train/loss")}, f"loss {_fmt(m.get('train/loss'), 3)}"


def run_sft(ctx: Context):
  config = ctx.stage_config("sft")
  config.init_from = ctx.require("pretrain")
  m = _run_trainer(ctx, "sft", config)
  return {"train/loss": m.get("train/loss")}, f"loss {_fmt(m.get('train/loss'), 3)}"


def comparisons_data_dir(stage_dir: str) -> str:
  return os.path.join(stage_dir, "tfds")


def run_comparisons(ctx: Context):
  from rlhf_jax.recipe import comparisons
  from rlhf_jax.text import tokenizer as tok_lib
  from rlhf_jax.data import builders
  cfg, langs = ctx.config.comparisons, ctx.langs
  if cfg.rounds < 1:
    raise ValueError(f"config.comparisons.rounds must be >= 1, got {cfg.rounds}")
  sft_dir = ctx.require("sft")
  tokenizer = tok_lib.Tokenizer.load(ctx.tokenizer_path)
  params, model_config = run_folder.load_policy(sft_dir)
  prompts, prompt_langs = [], []
  # Training prompts, then held-out ones: the comparisons keep their prompt's split, so the
  # RM's held-out accuracy is measured on prompts it never trained on.
  # Each training prompt is answered `rounds` times (K fresh answers, ranked afresh each time):
  # more comparisons when the prompts run out. Held-out prompts are answered once.
  for splits, per_lang, rounds in ((("train",), cfg.prompts_per_lang, cfg.rounds),
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
  agree = " ".join(f"{lang} {_fmt(metrics.get(f'label_gold_agreement/{lang}'))}"
                   for lang in info["langs"])
  return metrics, f"{len(records)} prompts x {cfg.k} answers, labels agree with gold: {agree}"


def run_rm(ctx: Context):
  config = ctx.stage_config("rm")
  cfg = ctx.config.comparisons
  config.init_from = ctx.require("sft")
  config.data.name = f"rlhf_comparisons/{cfg.name}"
  config.data.data_dir = comparisons_data_dir(ctx.require("comparisons"))
  config.data.max_answers = cfg.k
  m = _run_trainer(ctx, "rm", config)
  keys = ["rm/loss", "eval/rm/accuracy", "eval/rm/gold_accuracy"] + [
      f"eval/rm/{what}/{lang}" for what in ("accuracy", "gold_accuracy") for lang in ctx.langs]
  metrics = {k: m.get(k) for k in keys}
  line = "held-out acc. " + " ".join(
      f"{lang} {_fmt(m.get(f'eval/rm/accuracy/{lang}'))}" for lang in ctx.langs)
  line += "  vs gold " + " ".join(
      f"{lang} {_fmt(m.get(f'eval/rm/gold_accuracy/{lang}'))}" for lang in ctx.langs)
  return metrics, line


def run_ppo(ctx: Context):
  config = ctx.stage_config("ppo")
  config.sft_dir = ctx.require("sft")
  config.rm_dir = ctx.require("rm")
  config.data.lang = "both" if len(ctx.langs) == 2 else ctx.langs[0]
  m = _run_trainer(ctx, "ppo", config)
  metrics = {k: m.get(k) for k in ("objective/kl", "objective/kl_coef", "objective/scores")}
  for lang in ctx.langs:
    for what in ("win_rate", "gold", "gold_sft", "proxy", "kl"):
      metrics[f"eval/{lang}/{what}"] = m.get(f"eval/{lang}/{what}")
  line = " ".join(f"{lang} win {_fmt(m.get(f'eval/{lang}/win_rate'))}" for lang in ctx.langs)
  return metrics, f"{line} kl {_fmt(m.get('objective/kl'), 1)}"


def run_kto(ctx: Context):
  config = ctx.stage_config("kto")  # the bundled human thumbs, in config.data_dir
  config.init_from = ctx.require("sft")
  m = _run_trainer(ctx, "kto", config)
  metrics = {k: m.get(k) for k in ("kto/loss", "eval/kto/liked_over_disliked",
                                   "eval/kto/initial/liked_over_disliked")}
  return metrics, (f"loss {_fmt(m.get('kto/loss'), 3)}  held-out liked over disliked "
                   f"{_fmt(m.get('eval/kto/initial/liked_over_disliked'))} -> "
                   f"{_fmt(m.get('eval/kto/liked_over_disliked'))}")


def run_dpo(ctx: Context):
  config = ctx.stage_config("dpo")
  config.init_from = ctx.require("sft")
  config.data.names = f"rlhf_comparisons/{ctx.config.comparisons.name}"
  config.data.data_dir = comparisons_data_dir(ctx.require("comparisons"))
  m = _run_trainer(ctx, "dpo", config)
  metrics = {k: m.get(k) for k in ("dpo/loss", "eval/dpo/accuracy",
                                   "eval/dpo/initial/accuracy")}
  return metrics, (f"loss {_fmt(m.get('dpo/loss'), 3)}  held-out pair accuracy "
                   f"{_fmt(m.get('eval/dpo/initial/accuracy'))} -> "
                   f"{_fmt(m.get('eval/dpo/accuracy'))}")


def run_evaluate(ctx: Context):
  from rlhf_jax.eval import policies as evaluate
  cfg = ctx.config.evaluate
  policies = {"sft": ctx.require("sft")}
  for name in POLICIES[1:]:
    if name not in ctx.skipped and ctx.available(name):
      policies[name] = ctx.stage_dir(name)
  results = evaluate.evaluate_policies(
      policies, ctx.tokenizer_path, ctx.langs, data_dir=ctx.data_dir,
      prompts_per_lang=cfg.prompts_per_lang, max_prompt_len=ctx.config.ppo.data.max_prompt_len,
      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
      seed=cfg.seed, samples_per_lang=cfg.samples_per_lang)
  write_json_atomic(os.path.join(ctx.workdir, "evaluate", "results.json"), results)
  metrics = {f"{name}/{lang}/{k}": v for name, by_lang in results["metrics"].items()
             for lang, row in by_lang.items() for k, v in row.items()
             if k in ("gold", "win_rate")}
  parts = [f"{name} " + " ".join(f"{lang} {_fmt(results['metrics'][name][lang]['win_rate'])}"
                                 for lang in results["langs"])
           for name in results["policies"] if name != "sft"]
  return metrics, "win vs SFT: " + ("; ".join(parts) or "no policy but SFT")


def run_report(ctx: Context):
  from rlhf_jax.eval import report
  path = report.write_report(ctx.workdir)
  return {}, path


STAGE_FNS: dict[str, Callable] = {
    "tokenizer": run_tokenizer, "pretrain": run_pretrain, "sft": run_sft,
    "comparisons": run_comparisons, "rm": run_rm, "ppo": run_ppo, "kto": run_kto,
    "dpo": run_dpo, "evaluate": run_evaluate, "report": run_report}


# ---------------------------------------------------------------------------------------------
# The driver.


def _say(line: str) -> None:
  print(line, flush=True)


def _done_time(stage_dir: str) -> float:
  path = os.path.join(stage_dir, DONE)
  return os.stat(path).st_mtime if os.path.exists(path) else 0.0


def _cpu_seconds() -> float:
  import resource
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _run_one(ctx: Context, stage: str) -> dict:
  stage_dir = os.path.join(ctx.workdir, stage)
  expected = config_hash(ctx.config, stage)
  done = read_done(stage_dir) if stage != "report" else None
  if done is not None:
    _say(f"[{stage}] done earlier: skipped")
    if done.get("config_hash") != expected:
      log.warning("[%s] was finished with a different config (hash %s, now %s); its output "
                  "is kept: pass --only=%s or --from=%s to redo it", stage,
                  done.get("config_hash"), expected, stage, stage)
    newer = [d for d in DEPENDS.get(stage, ()) if _done_time(ctx.stage_dir(d))
             > _done_time(stage_dir)]
    if newer:
      log.warning("[%s] was finished before %s was redone: its output is stale; pass "
                  "--only=%s to refresh it", stage, ", ".join(newer), stage)
    return {**done, "status": "skipped", "dir": stage_dir}
  if stage not in TRAINED and stage != "report" and os.path.isdir(stage_dir):
    shutil.rmtree(stage_dir)  # unfinished data: start over rather than trust part of it
  started = read_marker(stage_dir, STARTED)
  if started and started.get("config_hash") != expected:
    log.warning("[%s] resuming a run started with a different config (hash %s, now %s): "
                "pass --only=%s to start it afresh", stage, started.get("config_hash"),
                expected, stage)
  os.makedirs(stage_dir, exist_ok=True)
  if stage != "report":
    write_json_atomic(os.path.join(stage_dir, STARTED), {"config_hash": expected})
  start, cpu = time.time(), _cpu_seconds()
  # Whatever a stage's libraries print (TFDS announces every dataset it prepares) goes to
  # stderr with the progress bars: stdout holds one line per stage.
  with contextlib.redirect_stdout(sys.stderr):
    metrics, line = STAGE_FNS[stage](ctx)
  seconds = time.time() - start
  # CPU seconds too: on a shared machine wall time says more about the neighbours.
  record = {"stage": stage, "seconds": round(seconds, 2),
            "cpu_seconds": round(_cpu_seconds() - cpu, 2), "metrics": metrics, "line": line,
            "config_hash": expected, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
  if stage != "report":
    write_json_atomic(os.path.join(stage_dir, DONE), record)
  _say(f"[{stage}] {seconds:.0f}s  {line}")
  return {**record, "status": "ran", "dir": stage_dir}


def plan(config, workdir: str, only=None, start=None, upstream=None):
  """(stages to run here, stages to redo): checks the arguments, changes nothing."""
  if only and start:
    raise ValueError("give --only or --from, not both")
  if upstream:
    if not (only or start):
      raise ValueError("--upstream needs --from or --only: which stages run here")
    if os.path.abspath(upstream) == os.path.abspath(workdir):
      raise ValueError("--upstream must be another workdir than --workdir")
    if not os.path.isdir(upstream):
      raise FileNotFoundError(f"upstream workdir {upstream} does not exist")
  skip = parse_stages(config.skip, "config.skip")
  bad = [s for s in skip if s not in OPTIONAL]
  if bad:
    raise ValueError(f"config.skip: only {', '.join(OPTIONAL)} can be skipped, not {bad}")
  parse_langs(config.langs)
  redo: list[str] = []
  if only:
    redo = parse_stages(only, "--only")
  elif start:
    first = parse_stages(start, "--from")
    if len(first) != 1:
      raise ValueError(f"--from takes one stage, got {start!r}")
    redo = list(STAGES[STAGES.index(first[0]):])
  if only or upstream:
    local = [s for s in STAGES if s in redo or s == "report"]
  else:
    local = list(STAGES)
  return [s for s in local if s not in skip], [s for s in redo if s != "report"], skip


def run_pipeline(config, workdir: str, *, only=None, start=None, upstream=None) -> dict:
  """Runs the stages in order; returns {stage: summary} (also written to W/summary.json).

  only: stages to redo, alone (a list or 'a,b'); start: redo this stage and all after it;
  upstream: a finished pipeline workdir whose stages are used for those not run here.
  A trainer that stops part-way ends the run early (no DONE.json, no report): the same call
  resumes it.
  """
  local, redo, skip = plan(config, workdir, only, start, upstream)
  validate.validate_or_raise(config, stages=local)  # every stage it runs, before the first
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()  # the stages' own bars say more
  os.makedirs(workdir, exist_ok=True)
  for stage in redo:
    # A finished stage, or one started with another config, is deleted; one interrupted with
    # this same config resumes (re-running an interrupted --only/--from command continues it).
    stage_dir = os.path.join(workdir, stage)
    started = read_marker(stage_dir, STARTED) or {}
    if read_done(stage_dir) or started.get("config_hash") != config_hash(config, stage):
      shutil.rmtree(stage_dir, ignore_errors=True)
  ctx = Context(config=config, workdir=workdir, upstream=upstream,
                local=frozenset(local) | frozenset(redo), skipped=frozenset(skip))
  summary: dict = {}
  for stage in STAGES:
    if stage in skip:
      summary[stage] = {"status": "skipped by config.skip"}
      continue
    if stage not in local:
      directory = ctx.stage_dir(stage)
      here = directory == os.path.join(workdir, stage)
      summary[stage] = {**(read_done(directory) or {}), "dir": directory,
                        "status": "not run" if here else "upstream"}
      continue
    if stage == "report":
      _write_summary(config, workdir, summary, upstream)  # the report reads it
    try:
      summary[stage] = _run_one(ctx, stage)
    except StageStopped as e:
      summary[stage] = {"status": "stopped", "dir": os.path.join(workdir, stage),
                        "message": str(e)}
      _say(str(e))
      break
  _write_summary(config, workdir, summary, upstream)
  return summary


def _write_summary(config, workdir, summary, upstream) -> None:
  from rlhf_jax.eval.report import machine_info
  write_json_atomic(os.path.join(workdir, SUMMARY), {
      "workdir": os.path.abspath(workdir), "upstream": upstream and os.path.abspath(upstream),
      "stages": summary, "config": config.to_dict(), "machine": machine_info()})


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv):
  del argv
  from rlhf_jax.core.launch import setup_logging
  flags_ = flags.FLAGS
  if not flags_.workdir:
    raise app.UsageError("--workdir is required")
  setup_logging()
  try:
    run_pipeline(_CONFIG.value, flags_.workdir, only=flags_.only or None,
                 start=flags_["from"].value or None, upstream=flags_.upstream or None)
  except (MissingStageError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module (sweeps, notebooks,
  # tests) never clashes with another entry point's --config / --workdir.
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/pipeline.py", "configs/pipeline.py[:args]", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where every stage writes (W/<stage>/).")
  flags.DEFINE_string("only", "", "Redo only these stages, comma-separated.")
  flags.DEFINE_string("from", "", "Redo this stage and every later one.")
  flags.DEFINE_string("upstream", "", "A finished pipeline workdir to take the stages not run "
                                      "here from (needs --from or --only).")
  app.run(main, flags_parser=overrides.flags_parser("config", "configs/pipeline.py"))
