"""The PPO benchmark's matmul floor runs the same arithmetic its FLOP count describes.

`benchmarks/ppo_iteration.py` reports each phase's projection matmuls timed alone (the floor no
implementation in the same forms can beat). Those shape lists must add up, with attention's
two matmuls counted by hand here, to the model FLOPs the benchmark divides by for MFU;
otherwise the floor and the MFU would describe different work.
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import lora_ppo  # noqa: E402
import ppo_iteration  # noqa: E402

from rlhf_jax.models import model_config  # noqa: E402


@pytest.mark.parametrize("size,kv_heads", [("w1", None), ("tiny", None), ("tiny", 1)])
def test_phase_matmuls_add_up_to_the_model_flops(size, kv_heads):
  cfg = model_config(size, **({"n_kv_heads": kv_heads} if kv_heads else {}))
  batch, p, n, epochs, minibatches = 8, 5, 3, 2, 4
  s, L, hd = p + n, cfg.n_layers, cfg.n_heads * cfg.dim_per_head
  sets = ppo_iteration.phase_matmuls(cfg, batch, p, n, minibatches)

  def matmul_flops(phase, reps=1):
    return sum(reps * count * (3 if train else 1) * sum(2 * m * k * f for m, k, f in shapes)
               for count, train, shapes in sets[phase])

  # Attention's q.k and probs.v: 2 * 2 * s * H * Dh FLOPs per query row (over all s slots of
  # the sequence, the masked ones included, as flops_per_token counts them).
  attn_row = 4 * s * hd

  def attn(rows_per_layer):
    return attn_row * sum(rows_per_layer)

  trunk_read = [batch * s] * (L - 1) + [batch * n]  # policy / critic: answer columns last
  trunk_all = [batch * s] * L  # the RM reads the last token, so it runs every column
  expected = ppo_iteration.workload_flops(cfg, batch, p, n, epochs, recompute=False)
  assert matmul_flops("update", epochs) + epochs * 3 * 2 * attn(trunk_read) == expected["update"]
  assert matmul_flops("score") + attn(trunk_read) * 2 + attn(trunk_all) == expected["score"]
  # Generation's prefill reads one column per prompt, each decode step one row per sequence.
  gen_rows = [batch * p] * (L - 1) + [batch] + [batch] * L * (n - 1)
  assert matmul_flops("generate") + attn(gen_rows) == expected["generate"]


@pytest.mark.heavy  # ~2 minutes of compiles (six settings and the memory plans)
def test_lora_ppo_benchmark_reports_every_setting_at_a_tiny_size(tmp_path):
  """benchmarks/lora_ppo.py in process at the tiny size: the JSON holds every timed setting
  asked for and the memory part, and the LoRA state trains exactly the adapters and the
  critic's head (counted by hand) with a fraction of the full run's optimizer state."""
  path = tmp_path / "lora_ppo.json"
  lora_ppo.main(["--size", "tiny", "--prompts", "4", "--prompt_len", "8", "--new_tokens", "4",
                 "--iterations", "1", "--ranks", "0,4", "--dtypes", "float32",
                 "--critic_trunks", "trained,frozen",
                 "--mem_sizes", "tiny", "--mem_dtypes", "float32", "--mem_rank", "4",
                 "--subprocess", "0", "--json_out", str(path)])
  out = json.loads(path.read_text())
  assert not [r for r in out["results"] + out["memory"] if "error" in r]
  by_setting = {(r["setting"], r["dtype"]): r for r in out["results"]}
  assert set(by_setting) == {("full", "float32"), ("lora4", "float32"), ("lora4+head", "float32")}
  for r in by_setting.values():
    assert r["iteration_s"] > 0 and set(r["seconds"]) == {"generate", "score", "update"}
    assert r["peak_rss_gib"] > 0 and r["compiled_memory"]["update"]["peak_bytes"] > 0
  # tiny: d 64, 2 layers, 4 query heads and 2 kv heads of 16, SwiGLU 128. Adapter params per
  # layer at rank r: q (64 + 64) r, k and v (64 + 32) r each, o (64 + 64) r, gate and up
  # (64 + 128) r each, down (128 + 64) r: 1024 r. Policy and critic, 2 layers, r = 4: 16384,
  # plus the critic's head (a [64, 1] kernel and a bias): 16449.
  full, lora = by_setting[("full", "float32")], by_setting[("lora4", "float32")]
  assert lora["trained_params"] == 2 * 2 * 1024 * 4 + 65
  assert lora["opt_state_bytes"] < full["opt_state_bytes"] / 50
  # A head on the RM's frozen trunk: the policy's adapters and the head alone.
  assert by_setting[("lora4+head", "float32")]["trained_params"] == 2 * 1024 * 4 + 65
  (memory,) = out["memory"]
  assert (memory["size"], memory["dtype"], memory["rank"]) == ("tiny", "float32", 4)
  assert memory["lora"]["iteration_plan_bytes"] < memory["full"]["iteration_plan_bytes"]
  assert set(out["ratios"]["full_over_lora_iteration_s"]) == {"float32/lora4",
                                                              "float32/lora4+head"}
  assert set(out["ratios"]["lora_plan_over_one_model"]) == {
      "tiny/float32/lora4", "tiny/float32/lora_shared4", "tiny/float32/lora_shared_head4"}
  # A shared base keeps the RM as adapters and a head: the frozen trees differ by the RM's
  # trunk less its adapters (2 layers x 1024 r at r = 4, float32).
  shared = memory["lora_shared"]
  trunk = memory["lora"]["frozen_bytes"] - shared["frozen_bytes"] + 4 * 2 * 1024 * 4
  assert 0 < trunk < memory["lora"]["frozen_bytes"] / 2
  assert shared["iteration_plan_bytes"] <= memory["lora"]["iteration_plan_bytes"]
  head = memory["lora_shared_head"]
  assert head["trained_params"] == 2 * 1024 * 4 + 65
  assert head["iteration_plan_bytes"] <= shared["iteration_plan_bytes"]


def test_a_peer_figure_of_another_workload_is_refused(tmp_path):
  """--peer_json from `trl_ppo.py --workload w4` against a W1 run (64 x 32 prompts, 48 sampled,
  4 x 4 minibatches) names both workloads instead of printing a meaningless ratio."""
  import json
  peer = {"benchmark": "trl_ppo", "date": "d", "machine": {"loadavg_1m_before_after": [0, 0]},
          "versions": {"trl": "1.9.0", "torch": "2.13.0"},
          "workload": {"name": "w4", "prompts": 16, "prompt_len": 64, "new_tokens": 64,
                       "epochs": 1, "minibatches": 2},
          "results": [{"dtype": "float32", "iteration_s": 45.0, "cpu_iteration_s": 88.0}]}
  path = tmp_path / "trl.json"
  path.write_text(json.dumps(peer))
  with pytest.raises(ValueError, match="another workload"):
    ppo_iteration.peer_figures(str(path), ppo_iteration.parse_args([]))
  w4 = ppo_iteration.parse_args("--size 135m --prompts 16 --prompt_len 64 --new_tokens 64 "
                                "--epochs 1 --minibatches 2".split())
  assert ppo_iteration.peer_figures(str(path), w4)["iteration_s"] == 45.0


def test_summary_puts_each_workloads_headline_beside_both_recorded_kinds(tmp_path):
  import summary
  recorded = json.load(open(os.path.join(os.path.dirname(summary.__file__), "recorded.json")))
  assert summary.cpu_kind(" fpu sse avx2 fma ") == "avx2"
  assert summary.cpu_kind(" avx2 avx512f avx512_bf16 ") == "avx512_bf16"
  # W1 from both dtype rows, W3's pairwise row (not the k-wise one beside it), W2 missing.
  (tmp_path / "ppo_iteration.json").write_text(json.dumps({"results": [
      {"dtype": "float32", "speedup_vs_trl": 1.43, "mfu": {"update": 0.7}},
      {"dtype": "bfloat16", "speedup_vs_trl": 2.004}]}))
  (tmp_path / "reward_step_w3.json").write_text(json.dumps({"results": [
      {"layout": "kwise", "dtype": "float32", "pairs_per_s": 17.4, "mfu": 0.5},
      {"layout": "pairs", "dtype": "float32", "pairs_per_s": 11.9, "mfu": 0.43,
       "speedup_vs_torch": 0.93}]}))
  (tmp_path / "ppo_iteration_w4.json").write_text(json.dumps({"results": [
      {"dtype": "float32", "iteration_s": 118.4, "peak_rss_gib": 9.726}]}))  # no TRL figure
  rows = {r["workload"]: r for r in summary.build(str(tmp_path), recorded, "avx2")}
  assert rows["W1"]["this_run"]["text"] == "1.43x" and rows["W1"]["this_run"]["extra"] == ""
  assert rows["W1 bf16"]["this_run"]["text"] == "2.00x"
  assert rows["W3"]["this_run"]["value"] == 0.93 and rows["W3"]["this_run"]["text"] == "0.93x"
  assert rows["W3"]["this_run"]["extra"] == "11.9 pairs/s, MFU 43%"
  assert rows["W2"]["this_run"]["value"] is None and "missing" in rows["W2"]["this_run"]["text"]
  assert rows["W4"]["this_run"]["value"] is None and "speedup_vs_trl" in rows["W4"]["this_run"]["text"]
  w4 = next(w for w in recorded["workloads"] if w["name"] == "W4")
  assert rows["W4"]["recorded"]["avx2"] == w4["recorded"]["avx2"]["value"]  # the figure, as recorded
  table = summary.table(list(rows.values()), recorded, "avx2")
  assert table.count("\n") == len(rows) + 1  # header, rule, one line per workload


def test_recorded_figures_name_sections_that_exist_in_results_md():
  import summary
  here = os.path.dirname(summary.__file__)
  recorded = json.load(open(os.path.join(here, "recorded.json")))
  headings = {line[3:].strip() for line in open(os.path.join(here, "RESULTS.md"), encoding="utf-8")
              if line.startswith("## ")}
  for workload in recorded["workloads"]:
    assert set(workload["recorded"]) == set(recorded["kinds"]), workload["name"]
    for kind, entry in workload["recorded"].items():
      assert not entry["section"] or entry["section"] in headings, (workload["name"], kind)


def test_the_summary_reads_what_train_step_writes_and_torch_figures_are_checked(tmp_path):
  """train_step.py's own JSON (a tiny run) is what summary.py reads its headline from, and a
  plain torch loop's figure of another workload or shape is refused."""
  import common
  import summary
  import train_step
  out = tmp_path / "train_step_w2.json"
  train_step.main(["--size", "tiny", "--seq_len", "16", "--batch", "2", "--dtypes", "float32",
                   "--steps", "1", "--matmul_n", "64", "--json_out", str(out)])
  spec = {"file": out.name, "dtype": "float32", "metric": "tokens_per_s", "format": "rate",
          "rate": "tokens_per_s"}
  row = json.load(open(out))["results"][0]
  assert summary.headline(spec, str(tmp_path))["value"] == row["tokens_per_s"]

  peer = {"benchmark": "torch_steps", "date": "d", "machine": {"loadavg_1m_before_after": [0, 0]},
          "versions": {"torch": "2.13.0", "transformers": "5.24.0"},
          "results": [{"workload": "w2", "rows": 16, "seq_len": 128, "step_s": 1.5,
                       "cpu_step_s": 3.0}]}
  path = tmp_path / "torch.json"
  path.write_text(json.dumps(peer))
  assert common.torch_step_figure(str(path), "w2", 16, 128)["step_s"] == 1.5
  with pytest.raises(ValueError, match="no w3 result"):
    common.torch_step_figure(str(path), "w3", 32, 128)
  with pytest.raises(ValueError, match="16 rows x 128 tokens, this run 8 x 128"):
    common.torch_step_figure(str(path), "w2", 8, 128)
  path.write_text(json.dumps({**peer, "benchmark": "trl_ppo"}))
  with pytest.raises(ValueError, match="not a result of"):
    common.torch_step_figure(str(path), "w2", 16, 128)
