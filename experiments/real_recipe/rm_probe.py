r"""How much of the gold ordering can a linear head read off the frozen SFT trunk?

The real-model RMs stop at held-out gold accuracy 0.67 (SmolLM2-135M) and 0.60-0.73 (Gemma 3).
This fits the RM's scalar head alone, by the RM's own ranking loss, on the trunk's final hidden
state at each answer's last token (where the RM reads its score), for a few L2 strengths, and
scores the held-out comparisons. A probe near the trained RM says the RM learned little beyond
a linear readout; a probe above it says the head is where the RM's steps go.

  python experiments/real_recipe/rm_probe.py --workdir workdirs/smollm2-v2 \
      --config 'model=smollm2_135m,sft_steps=12' --set langs=en --set comparisons.prompts_per_lang=192

The second feature is a mean of hidden states: over each row's tokens in the answers layout,
over each answer's own tokens (its prompt left out) in the shared_prompt layout (the pipeline's
default). Each probe is scored on the held-out comparisons and, less noisily, by 8-fold
cross-validation over train + held-out, per language. `--features_out F` keeps the features;
`--features_in F` refits from them without the model.

`--depths 6,12,18` reads the same two features after the first n layers of the trunk instead of
all of them (the trunk cut there, its final norm kept): where in the model the ordering is most
linearly readable, and so whether an RM on a shorter trunk could score better.
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
import pipeline as pipeline_config  # noqa: E402  configs/pipeline.py

from rlhf_jax.eval import reward_model as evaluate_rm  # noqa: E402
from rlhf_jax.eval.held_out import RewardModelHeldOut  # noqa: E402
from rlhf_jax.models import losses  # noqa: E402
from rlhf_jax.models import layer_layout  # noqa: E402
from rlhf_jax.models.heads import ScalarModel  # noqa: E402
from rlhf_jax.recipe import stages  # noqa: E402
from rlhf_jax.recipe.markers import replaced_by_model  # noqa: E402
from rlhf_jax.train import inputs as inputs_lib  # noqa: E402
from rlhf_jax.train import launch  # noqa: E402
from rlhf_jax.train import reward  # noqa: E402
from rlhf_jax.train.state import setup_mesh  # noqa: E402


def rm_config(workdir, arg, sets):
  config = pipeline_config.get_config(arg)
  for item in sets:
    key, value = item.split("=", 1)
    section = config
    *path, last = key.split(".")
    for p in path:
      section = section[p]
    section[last] = type(section[last])(value)
  ctx = stages.Context(config=config, workdir=workdir, upstream=None, local=frozenset(),
                       replaced=frozenset(replaced_by_model(config)))
  rm = ctx.stage_config("rm")
  rm.init_from = ctx.require("sft")
  rm.data.name = f"rlhf_comparisons/{config.comparisons.name}"
  rm.data.data_dir = stages.comparisons_data_dir(ctx.require("comparisons"))
  rm.data.max_answers = config.comparisons.k
  return rm


def features_fn(model, shared: bool):
  """(hidden at each answer's last token [B, K, D], a mean hidden [B, K, D]) of a batch.

  The answers layout averages each row's real tokens, its prompt included; the shared_prompt
  layout (data.layout) averages each answer's own tokens (segment 2 + i), the prompt left out:
  the readout a head on the mean of the answer would have."""
  def trunk(m, tokens, positions, segment_ids, prefix_ids=None):
    return m.trunk.hidden_states(tokens, positions, segment_ids, prefix_ids=prefix_ids)[0]

  @jax.jit
  def features_shared(params, tokens, positions, segment_ids, prefix_ids, score_at):
    hidden = model.apply({"params": params}, tokens, positions, segment_ids, prefix_ids,
                         method=trunk)  # [B, T, D]
    at_last = jnp.take_along_axis(hidden, score_at[..., None], axis=1)  # [B, K, D]
    k = score_at.shape[1]
    own = (segment_ids[:, None, :] == 2 + jnp.arange(k)[None, :, None])  # [B, K, T]
    mean = jnp.einsum("bkt,btd->bkd", own.astype(hidden.dtype), hidden)
    return at_last, mean / jnp.maximum(own.sum(-1), 1)[..., None]

  @jax.jit
  def features_answers(params, tokens, positions, segment_ids):
    b, k, t = tokens.shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    hidden = model.apply({"params": params}, flat(tokens), flat(positions), flat(segment_ids),
                         method=trunk)  # [B*K, T, D]
    mask = flat(segment_ids) > 0
    last = t - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)
    at_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    mean = jnp.sum(hidden * mask[..., None], 1) / jnp.maximum(mask.sum(1), 1)[:, None]
    return at_last.reshape(b, k, -1), mean.reshape(b, k, -1)
  return features_shared if shared else features_answers


def fit_head(x, prefer, valid, l2, steps=1500, lr=1e-2):
  """(w [D], b) minimising the RM's ranking loss of x @ w + b plus l2 * |w|^2, full batch."""
  x, prefer, valid = map(jnp.asarray, (x, prefer, valid))
  scale = jnp.std(x) + 1e-6

  def loss(p):
    scores = (x / scale) @ p["w"] + p["b"]
    total, count = losses.ranking_loss(scores, prefer, valid)
    return total / jnp.maximum(count, 1.0) + l2 * jnp.sum(p["w"] ** 2)

  tx = optax.adam(lr)
  params = {"w": jnp.zeros(x.shape[-1]), "b": jnp.zeros(())}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return lambda feats: np.asarray((jnp.asarray(feats) / scale) @ params["w"] + params["b"])


def gold_accuracy(scores, d) -> dict:
  """Gold accuracy overall and per language ('', '/en', '/zh') of scores [N, K]."""
  metrics, _ = evaluate_rm.comparison_metrics(scores, d["valid"], d["prefer"], d["lang"],
                                              d["gold"])
  return {k[len("gold_accuracy"):]: round(v, 3) for k, v in metrics.items()
          if k.startswith("gold_accuracy")}


def _take(d, rows) -> dict:
  return {k: v[rows] for k, v in d.items()}


def cross_validated(d, feature: str, l2: float, folds: int = 8) -> dict:
  """Gold accuracy of heads fitted on (folds - 1) / folds of the comparisons, each scored on
  the fold it did not see: all comparisons held out once, a less noisy figure than one split."""
  scores = np.zeros(d[feature].shape[:2])
  fold = np.arange(len(scores)) % folds
  for f in range(folds):
    head = fit_head(d[feature][fold != f], d["prefer"][fold != f], d["valid"][fold != f], l2)
    scores[fold == f] = head(d[feature][fold == f])
  return gold_accuracy(scores, d)


def cut_model(model_config, params, depth):
  """(a scalar model of the trunk's first `depth` layers, its params): the layers past depth
  dropped, embedding, final norm and head kept."""
  cfg = dataclasses.replace(model_config, n_layers=depth, scan_layers=False,
                            local_layers=tuple(i for i in model_config.local_layers if i < depth))
  unrolled = layer_layout.to_layout(params, False)
  trunk = {k: v for k, v in unrolled["trunk"].items()
           if not (k.startswith("layer_") and int(k[len("layer_"):]) >= depth)}
  return ScalarModel(cfg), {**unrolled, "trunk": trunk}


def probe_table(train, held) -> list:
  rows = []
  both = {k: np.concatenate([train[k], held[k]]) for k in train}
  for feature in sorted(k for k in train if k.startswith(("last", "mean"))):
    for l2 in (1e-3, 1e-2, 1e-1):
      head = fit_head(train[feature], train["prefer"], train["valid"], l2)
      row = {"feature": feature, "l2": l2, "train_gold": gold_accuracy(head(train[feature]), train),
             "heldout_gold": gold_accuracy(head(held[feature]), held),
             "cv_gold": cross_validated(both, feature, l2)}
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def read_features(path: str) -> dict:
  """{split: {key: array}} of a --features_out file."""
  with np.load(path) as f:
    splits = {}
    for name in f.files:
      split, key = name.split("/", 1)
      splits.setdefault(split, {})[key] = f[name]
  return splits


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="", help="a pipeline workdir with sft, comparisons")
  parser.add_argument("--config", default="", help="configs/pipeline.py's argument")
  parser.add_argument("--set", action="append", default=[])
  parser.add_argument("--json_out", default="")
  parser.add_argument("--features_out", default="")
  parser.add_argument("--features_in", default="", help="refit from a --features_out file")
  parser.add_argument("--depths", default="", help="e.g. 6,12,18: features after these layers")
  args = parser.parse_args()
  if args.features_in:
    splits = read_features(args.features_in)
    train, held = splits.pop("train"), splits.popitem()[1]
    rows = probe_table(train, held)
    if args.json_out:
      with open(args.json_out, "w") as f:
        json.dump(rows, f, indent=1)
    return
  if not (args.workdir and args.config):
    parser.error("--workdir and --config are needed unless --features_in")
  config = rm_config(args.workdir, args.config, args.set)
  launch.resolve_auto_dtype(config)
  mesh, rules = setup_mesh(config, 1)
  tokenizer, vocab_size = inputs_lib.load_tokenizer(config, tempfile.mkdtemp())
  model_config = reward.build_model_config(config, vocab_size)
  model = ScalarModel(model_config)
  config.data.epochs = 1
  loss_name = reward.resolve_loss(config.loss.name, config.data.name)
  kind, reduction, unit = reward.LOSSES[loss_name]
  tx = optax.sgd(0.0)
  data_iter, _ = reward.make_comparison_batches(config, tokenizer, "comparison", "kwise")
  state, shardings, _ = reward.starting_state(config, tempfile.mkdtemp(), model, tx, tokenizer,
                                              data_iter, mesh, rules)
  params = state.full_params(state.params)
  shared = config.data.get("layout", "answers") == "shared_prompt"
  depths = [int(d) for d in args.depths.split(",")] if args.depths else [model_config.n_layers]
  cuts = {d: cut_model(model_config, params, d) for d in depths}
  features = {d: features_fn(m, shared) for d, (m, _) in cuts.items()}
  keys = ("tokens", "positions", "segment_ids") + (("prefix_ids", "score_at") if shared else ())
  t0 = time.time()
  splits = {}
  for split in ("train", config.eval.split):
    split_config = config.copy_and_resolve_references()
    split_config.eval.split = split
    split_config.eval.max_comparisons = 0
    held = RewardModelHeldOut(split_config, tokenizer, model, mesh, rules,
                              shardings.eval_params())
    out = {k: held.arrays[k][:held.n] for k in ("prefer", "valid", "lang")}
    out["gold"] = held.gold
    name = (lambda f, d: f) if len(depths) == 1 else (lambda f, d: f"{f}@{d}")
    feats = {name(f, d): [] for d in depths for f in ("last", "mean")}
    bs = config.data.batch_size
    for start in range(0, held.n, bs):
      chunk = [held.arrays[k][start:start + bs] for k in keys]
      for d, (_, cut_params) in cuts.items():
        last, mean = features[d](cut_params, *chunk)
        feats[name("last", d)].append(np.asarray(last))
        feats[name("mean", d)].append(np.asarray(mean))
      print(f"{split}: {start + bs} of {held.n}, {time.time() - t0:.0f} s", flush=True)
    out.update({k: np.concatenate(v)[:held.n] for k, v in feats.items()})
    splits[split] = out
  if args.features_out:
    np.savez(args.features_out, **{f"{s}/{k}": v for s, d in splits.items() for k, v in d.items()})
  rows = probe_table(splits["train"], splits[config.eval.split])
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
