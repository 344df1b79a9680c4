"""Losses, each a pure function of arrays. Shapes in comments: B batch, T length, V vocab.

Token losses return (sum, count) rather than a mean so that gradient accumulation over
micro-batches, and sharded batches, give exactly the loss of one big batch.
"""
import jax
import jax.numpy as jnp


def token_logprobs(logits, targets):
  """log p(targets) under logits: [B, T, V], [B, T] -> [B, T] (float32)."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logits - jax.nn.logsumexp(logits, axis=-1)


def next_token_loss(logits, targets, loss_mask):
  """Summed next-token cross-entropy over masked positions, and the mask's count.

  logits [B, T, V]; targets [B, T] (already shifted: the token after position t);
  loss_mask [B, T] float (1 where targets[t] is trained).
  """
  nll = -token_logprobs(logits, targets)  # [B, T]
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


# ---------------------------------------------------------------------------------------------
# PPO. Per-token terms averaged over the real answer tokens of a minibatch (mask [B, N]).


def _masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def answer_mean(x, mask):
  """Each answer's mean over its own real tokens, then the mean over the answers that have any:
  [B, N] -> []. Every answer weighs the same, however many tokens it has."""
  mask = mask.astype(jnp.float32)
  per_answer = jnp.sum(x * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)  # [B]
  has = (jnp.sum(mask, -1) > 0).astype(jnp.float32)
  return jnp.sum(per_answer * has) / jnp.maximum(jnp.sum(has), 1.0)


LOSS_MEANS = ("token", "answer")  # ppo_policy_loss's `mean`


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, mean: str = "token"):
  """Clipped surrogate: mean of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old.

  logprobs, old_logprobs, advantages, mask: [B, N]. mean: "token" averages over every real
  token of the batch (a long answer weighs more); "answer" over each answer's tokens first, then
  over answers (`answer_mean`), so a language with short answers (Chinese against English)
  is not outweighed in a mixed batch. Returns (loss, stats) with the ratio's mean, the
  fraction of tokens where the clip is active, and approx KL ½·E[(log ρ)²], over tokens.
  """
  if mean not in LOSS_MEANS:
    raise ValueError(f"the policy loss's mean must be one of {LOSS_MEANS}, got {mean!r}")
  log_ratio = logprobs - old_logprobs
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  surrogate = jnp.maximum(unclipped, clipped)
  loss = _masked_mean(surrogate, mask) if mean == "token" else answer_mean(surrogate, mask)
  stats = {"ratio": _masked_mean(ratio, mask),
           "clipfrac": _masked_mean((clipped > unclipped).astype(jnp.float32), mask),
           "approxkl": 0.5 * _masked_mean(jnp.square(log_ratio), mask)}
  return loss, stats


def ppo_value_loss(values, old_values, returns, mask, clip_range):
  """Clipped value loss: ½·mean of max((V − R)², (V_old + clip(V − V_old, ±c) − R)²).

  Returns (loss, stats) with the fraction of tokens where the clipped error is the larger.
  """
  clipped_values = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
  unclipped = jnp.square(values - returns)
  clipped = jnp.square(clipped_values - returns)
  loss = 0.5 * _masked_mean(jnp.maximum(unclipped, clipped), mask)
  return loss, {"clipfrac": _masked_mean((clipped > unclipped).astype(jnp.float32), mask)}


def entropy_from_logits(logits):
  """Entropy [...] of softmax(logits [..., V]) in float32."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ---------------------------------------------------------------------------------------------
# Reward model. Scores r are one number per answer; a preference mask says which answer of a
# prompt beat which. Losses return (sum, count), like the token losses, so that accumulation
# and sharding give the loss of one big batch.


def bradley_terry_loss(chosen, rejected, margin=0.0, mask=None):
  """Pairwise Bradley-Terry: sum of -log sigma(r_w - r_l - m) over real pairs, and their count.

  chosen, rejected: [N] scores of the preferred and the other answer; margin: scalar or [N]
  (a pair must win by at least m before its loss flattens, as in Llama 2's RM); mask: [N]
  (1 = a real pair), None for all.
  """
  chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
  per_pair = jax.nn.softplus(-(chosen - rejected - margin))  # -log sigma(x) = softplus(-x)
  mask = jnp.ones_like(per_pair) if mask is None else mask.astype(jnp.float32)
  return jnp.sum(per_pair * mask), jnp.sum(mask)


def pair_mask(prefer, valid=None):
  """[B, K, K] float: prefer[b, i, j] (answer i beat answer j) kept only where both answers are
  real (valid [B, K]) and i != j."""
  mask = prefer.astype(jnp.float32)
  k = mask.shape[-1]
  mask = mask * (1.0 - jnp.eye(k, dtype=jnp.float32))
  if valid is not None:
    valid = valid.astype(jnp.float32)
    mask = mask * valid[:, :, None] * valid[:, None, :]
  return mask


RANKING_REDUCTIONS = ("prompt", "pair")


def ranking_loss(scores, prefer, valid=None, margin=0.0, reduction: str = "prompt"):
  """Bradley-Terry over every preferred pair a prompt's ranking or grades imply.

  scores: [B, K], one per answer: each answer goes through the model once however many pairs
  it is in. prefer: [B, K, K], 1 where answer i was preferred to answer j (a ranking gives all
  K(K-1)/2 pairs; grades give a pair for every two answers of different grade, ties none).
  valid: [B, K], 0 on padded answers. margin: scalar or [B, K, K].

  reduction "prompt" (K-wise, InstructGPT): every prompt with at least one pair weighs the
  same, its pairs averaged, so count = prompts with pairs. "pair": every pair weighs the
  same (a batch of independent pairs), count = pairs. Returns (loss sum, count).
  """
  if reduction not in RANKING_REDUCTIONS:
    raise ValueError(f"unknown reduction {reduction!r}; choose from {RANKING_REDUCTIONS}")
  scores = scores.astype(jnp.float32)
  diff = scores[:, :, None] - scores[:, None, :]  # [B, K, K] r_i - r_j
  per_pair = jax.nn.softplus(-(diff - margin))  # [B, K, K]
  mask = pair_mask(prefer, valid)
  if reduction == "pair":
    return jnp.sum(per_pair * mask), jnp.sum(mask)
  n_pairs = jnp.sum(mask, axis=(1, 2))  # [B]
  per_prompt = jnp.sum(per_pair * mask, axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
  has_pairs = (n_pairs > 0).astype(jnp.float32)
  return jnp.sum(per_prompt * has_pairs), jnp.sum(has_pairs)


def binary_feedback_loss(scores, labels, mask=None):
  """Pointwise logistic loss of single answers with a thumb: -log sigma(+r) for a like (1),
  -log sigma(-r) for a dislike (0). An RM learns from thumbs alone this way; the score's
  zero is then the like/dislike boundary. scores, labels, mask: same shape. (sum, count)."""
  scores = scores.astype(jnp.float32)
  sign = 2.0 * labels.astype(jnp.float32) - 1.0
  per_answer = jax.nn.softplus(-sign * scores)
  mask = jnp.ones_like(per_answer) if mask is None else mask.astype(jnp.float32)
  return jnp.sum(per_answer * mask), jnp.sum(mask)


def preference_stats(scores, prefer, valid=None):
  """(correct, pairs, margin sum) over the preferred pairs of [B, K] scores: a pair is correct
  when the preferred answer scores higher (an exact tie counts one half)."""
  scores = scores.astype(jnp.float32)
  diff = scores[:, :, None] - scores[:, None, :]  # [B, K, K]
  mask = pair_mask(prefer, valid)
  correct = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
  return jnp.sum(correct * mask), jnp.sum(mask), jnp.sum(diff * mask)


# ---------------------------------------------------------------------------------------------
# Preference fine-tuning with no reward model. Inputs are summed log-probs of whole answers,
# log π(y|x) = Σ_t log π(y_t | x, y_<t), one per example ([B]); `mask` [B] is 1 on real rows
# and 0 on the padding rows of a partly filled last batch. Both losses are batch means (KTO's
# KL estimate is a statistic of the whole batch, so a (sum, count) split would not be exact).


def kto_loss(policy_logp, ref_policy_logp, kl_policy_logp, kl_ref_logp, labels, mask, *, beta,
             desirable_weight, undesirable_weight, kl_mask=None):
  """Kahneman-Tversky optimisation from single answers marked liked (1) or disliked (0).

  r = β·(log π(y|x) − log π_ref(y|x)) is the implicit reward. The reference point z is β times
  a KL estimate: the mean log-ratio over mismatched (prompt, answer) pairs of the batch
  (kl_policy_logp, kl_ref_logp [B]: prompt i with some other row's answer), clamped at 0 and
  held constant (stop_gradient): it only says where "good" starts, the model cannot move it.
  A liked answer is valued v = σ(r − z), a disliked one v = σ(z − r); the loss is the mean
  over real rows of w·(1 − v), w = desirable_weight for likes, undesirable_weight otherwise.

  kl_mask [B]: real mismatched pairs (default: `mask`). Returns (loss, metrics): implicit
  rewards of liked / disliked rows (NaN when a batch has none), the KL estimate in nats, and
  the row counts.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  mask = f32(mask)
  kl_mask = mask if kl_mask is None else f32(kl_mask)
  liked = f32(labels) * mask
  disliked = (1.0 - f32(labels)) * mask
  kl_ratio = f32(kl_policy_logp) - f32(kl_ref_logp)  # [B]
  kl = jnp.maximum(_masked_mean(kl_ratio, kl_mask), 0.0)
  kl = jax.lax.stop_gradient(kl)
  z = beta * kl
  rewards = beta * (f32(policy_logp) - f32(ref_policy_logp))  # [B]
  value = jnp.where(liked > 0, jax.nn.sigmoid(rewards - z), jax.nn.sigmoid(z - rewards))
  weight = desirable_weight * liked + undesirable_weight * disliked  # 0 on padding rows
  loss = jnp.sum(weight * (1.0 - value)) / jnp.maximum(jnp.sum(mask), 1.0)
  n_liked, n_disliked = jnp.sum(liked), jnp.sum(disliked)
  nan = jnp.float32(jnp.nan)
  detached = jax.lax.stop_gradient(rewards)
  metrics = {
      "rewards/chosen": jnp.where(n_liked > 0, jnp.sum(detached * liked)
                                  / jnp.maximum(n_liked, 1.0), nan),
      "rewards/rejected": jnp.where(n_disliked > 0, jnp.sum(detached * disliked)
                                    / jnp.maximum(n_disliked, 1.0), nan),
      "kl": kl,
      "liked": n_liked,
      "disliked": n_disliked,
  }
  return loss, metrics


def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, mask, *, beta,
             label_smoothing=0.0):
  """Direct preference optimisation on (chosen, rejected) pairs, all inputs [B].

  logits = β·[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)];
  loss = mean over real pairs of −(1 − ε)·log σ(logits) − ε·log σ(−logits). ε > 0 treats a
  fraction ε of the labels as flipped (noisy annotators), which bounds how far the pair's
  margin is pushed. Returns (loss, metrics): implicit rewards of chosen and rejected, their
  margin, and the fraction of pairs whose chosen answer has the higher implicit reward
  (ties count one half).
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  mask = f32(mask)
  chosen = beta * (f32(pol_chosen) - f32(ref_chosen))  # [B]
  rejected = beta * (f32(pol_rejected) - f32(ref_rejected))  # [B]
  logits = chosen - rejected
  # -log σ(x) = softplus(-x)
  per_pair = ((1.0 - label_smoothing) * jax.nn.softplus(-logits)
              + label_smoothing * jax.nn.softplus(logits))
  loss = _masked_mean(per_pair, mask)
  chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
  margin = chosen - rejected
  correct = jnp.where(margin > 0, 1.0, jnp.where(margin == 0, 0.5, 0.0))
  metrics = {"rewards/chosen": _masked_mean(chosen, mask),
             "rewards/rejected": _masked_mean(rejected, mask),
             "rewards/margin": _masked_mean(margin, mask),
             "accuracy": _masked_mean(correct, mask),
             "pairs": jnp.sum(mask)}
  return loss, metrics
