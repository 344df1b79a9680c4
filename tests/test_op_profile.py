"""benchmarks/op_profile.py: reading compiled HLO, putting ops in categories, summing a trace."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import op_profile  # noqa: E402

# A hand-written module in XLA's text form: one library fusion around a dot, one loop fusion,
# a plain dot and a parameter copy named after a param leaf (as jax names argument copies).
HLO = r"""HloModule jit_step, entry_computation_layout={(f32[8,4]{1,0})->f32[8,4]{1,0}}

%fused_computation.1 (param_0: f32[8,4], param_1: f32[4,16]) -> f32[8,16] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %param_1 = f32[4,16]{1,0} parameter(1)
  ROOT %dot_general.3 = f32[8,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (param_0.1: f32[8,16]) -> f32[8,16] {
  %param_0.1 = f32[8,16]{1,0} parameter(0)
  ROOT %exp.1 = f32[8,16]{1,0} exponential(%param_0.1)
}

ENTRY %main.9 (Arg_0.1: f32[8,4], Arg_1.2: f32[4,16]) -> f32[8,4] {
  %Arg_0.1 = f32[8,4]{1,0} parameter(0), metadata={op_name="state.params[\'policy\'][\'mlp\'][\'up\'][\'kernel\']"}
  %Arg_1.2 = f32[4,16]{1,0} parameter(1)
  %ynn_fusion.7 = f32[8,16]{1,0} fusion(%Arg_0.1, %Arg_1.2), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(step)/jvp(Transformer.hidden_states)/layer_0/mlp/up/dot_general"}, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %exponential_fusion = f32[8,16]{1,0} fusion(%ynn_fusion.7), kind=kLoop, calls=%fused_computation.2, metadata={op_name="jit(step)/jvp()/exp"}
  %dot.4 = f32[8,4]{1,0} dot(%exponential_fusion, %Arg_1.2), lhs_contracting_dims={1}, rhs_contracting_dims={1}, metadata={op_name="jit(step)/transpose(jvp(Transformer.project))/lm_head/dot_general"}
  ROOT %copy.5 = f32[8,4]{1,0} copy(%dot.4), metadata={op_name="state.params[\'policy\'][\'embed\'][\'embedding\']"}
}
"""


def test_instruction_info_reads_a_hand_written_module():
  info = op_profile.instruction_info(HLO)
  # Every instruction, fused ones included; a dot, or a fusion calling one, is a matmul.
  assert info["ynn_fusion.7"]["matmul"] and info["dot.4"]["matmul"]
  assert info["dot_general.3"]["matmul"]  # the dot inside the fusion is itself a dot
  assert not info["exponential_fusion"]["matmul"] and not info["copy.5"]["matmul"]
  assert not info["exp.1"]["matmul"] and not info["Arg_1.2"]["matmul"]
  assert info["ynn_fusion.7"]["shape"] == (8, 16)
  assert info["ynn_fusion.7"]["op_name"].endswith("/mlp/up/dot_general")
  assert info["Arg_1.2"]["op_name"] == ""


def test_categories_by_scope_pass_and_shape():
  c = op_profile.categorize
  assert c("jit(u)/transpose(jvp(Transformer.hidden_states))/layer_1/attn/q/dot_general",
           True) == ("matmul", "attention projections", "backward")
  # o is the attention scope's own dot; the scores are einsums under the same scope
  assert c("jit(u)/jvp(ScalarModel)/trunk.hidden_states/layer_0/attn/dot_general", True)[1] == \
      "attention projections"
  assert c("jit(u)/jvp(M)/layer_0/attn/bkgtd,bksd->bkgts/dot_general", True)[1] == "attention"
  assert c("jit(u)/jvp(M)/layer_0/attn/concatenate", False) == (
      "elementwise", "attention", "forward")  # rotary
  assert c("jit(u)/jvp(M)/layer_0/attn/q/add_any", False)[1] == "attention"
  assert c("jit(u)/jvp(M)/layer_0/attn_norm/rsqrt", False)[1] == "norms"
  assert c("jit(u)/jvp(M)/layer_0/mlp/jit(silu)/mul", False)[1] == "mlp"
  # the optimizer: no gradient, no model scope; a leaf's path is no scope even when it
  # names the attention or the embedding
  assert c("jit(u)/while/body/closed_call/mul", False) == (
      "elementwise", "outside the models", "no gradient")
  assert c(r"state.params[\'critic\'][\'trunk\'][\'embed\'][\'embedding\']", False)[1] == \
      "outside the models"
  # an unscoped op inside the gradient over the vocabulary axis is the loss's log-softmax
  assert c("jit(u)/jvp()/exp", False, (16, 48, 8192), 8192) == (
      "elementwise", "vocabulary", "forward")
  assert c("jit(u)/jvp()/exp", False, (16, 48), 8192)[1] == "other"
  assert c("jit(u)/mul", False, (256, 8192), 8192)[1] == "outside the models"


def test_summarize_adds_each_ops_events_and_sets_the_runtime_apart():
  info = op_profile.instruction_info(HLO)
  events = [("ynn_fusion.7", 300), ("exponential_fusion", 50), ("ynn_fusion.7", 200),
            ("dot.4", 120), ("ThunkExecutor::Execute", 9000), ("copy.5", 7)]
  s = op_profile.summarize(events, info, vocab_size=16)
  assert s["by_op"] == {"ynn_fusion.7": 500, "exponential_fusion": 50, "dot.4": 120,
                        "copy.5": 7}
  assert s["runtime_ns"] == 9000
  assert s["by_row"] == {
      ("matmul", "mlp", "forward"): 500,
      ("elementwise", "vocabulary", "forward"): 50,  # [8, 16] over a 16-piece vocabulary
      ("matmul", "vocabulary", "backward"): 120,
      ("elementwise", "outside the models", "no gradient"): 7}


def test_a_tiny_update_profiled_end_to_end(tmp_path, capsys):
  out = tmp_path / "profile.json"
  op_profile.main(["--size", "tiny", "--prompts", "4", "--prompt_len", "8", "--new_tokens", "4",
                   "--epochs", "1", "--minibatches", "1", "--calls", "1", "--top", "5",
                   "--json_out", str(out)])
  r = json.loads(out.read_text())["results"][0]
  rows = {(x["what"], x["where"], x["pass"]): x["seconds"] for x in r["rows"]}
  # every projection of the policy and critic ran forward and backward, and was traced
  for where in ("mlp", "attention projections"):
    for pass_ in ("forward", "backward"):
      assert rows.get(("matmul", where, pass_), 0) > 0, (where, pass_)
  assert rows.get(("matmul", "vocabulary", "backward"), 0) > 0
  assert any(k[1] == "outside the models" for k in rows)  # the optimizer's step
  # the rows partition the op time
  assert abs(sum(rows.values()) - r["op_s_per_call"]) <= 1e-9 + 1e-6 * r["op_s_per_call"]
  assert abs(sum(x["fraction_of_op_time"] for x in r["rows"]) - 1) < 1e-6
  assert len(r["top_ops"]) == 5
  assert "| what | where |" in capsys.readouterr().out
