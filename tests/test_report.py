"""The report's verdict section, diagnostics and gold-vs-check plot, on hand-made evaluations:
a fresh results.json (with diagnostics) and one from before the diagnostics existed."""
import json
import struct

from rlhf_jax.eval import policies, report

PROMPTS = {"en": ["How was the film?", "Tell me about your day.", "Do you like rain?",
                  "What do you think of tea?"],
           "zh": ["电影好看吗？", "你今天怎么样？", "你喜欢下雨吗？", "你觉得茶怎么样？"]}
SFT = {"en": ["It was slow.", "Busy day.", "Not really.", "Tea is fine."],
       "zh": ["还行吧", "有点累", "不太喜欢", "茶不错"]}
# PPO: one cheerful English answer to everything (collapsed); four distinct, longer Chinese
# answers that both stand-in scorers prefer (improved).
PPO = {"en": ["Haha haha, I love it!"] * 4,
       "zh": ["很好看，我很喜欢", "今天很开心", "喜欢，下雨很舒服", "茶很好喝"]}


def _length(texts, lang):  # a stand-in for both scorers: longer is better
  return [len(t) for t in texts]


def _results(with_diagnostics: bool) -> dict:
  out = policies.compare({"sft": SFT, "ppo": PPO}, PROMPTS, scorer=_length,
                         check_scorer=_length,
                         greedy={"sft": SFT, "ppo": {"en": ["Haha"] * 4, "zh": PPO["zh"]}})
  out["settings"] = {"prompts_per_lang": {"en": 4, "zh": 4}}
  if not with_diagnostics:  # a results.json written before the diagnostics
    for key in ("diagnostics", "verdicts", "verdict_thresholds"):
      del out[key]
  return out


def _workdir(tmp_path, results: dict):
  (tmp_path / "evaluate").mkdir()
  (tmp_path / "evaluate" / "results.json").write_text(json.dumps(results, ensure_ascii=False),
                                                       encoding="utf-8")
  return tmp_path


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
  return struct.unpack(">II", head[16:24])


def _verdict_rows(text: str) -> dict:
  """{(policy, lang): cells} of the verdict table."""
  lines = text[text.index("| policy | language | verdict |"):].splitlines()[2:]
  rows = {}
  for line in lines:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[(cells[0], cells[1])] = cells[2:]
  return rows


def test_report_opens_with_the_verdict_table(tmp_path):
  results = _results(with_diagnostics=True)
  # By hand: en, PPO's 21 characters beat SFT's every answer -> win 1, but 1 unique answer of
  # 4 (25% < 50%): collapsed. zh, PPO 8, 5, 8, 4 characters against 3, 3, 4, 3: win 1 under
  # both scorers and on same-script pairs (all four), 4 unique answers: improved.
  assert results["verdicts"]["ppo"]["langs"]["en"]["verdict"] == "collapsed"
  assert results["verdicts"]["ppo"]["langs"]["zh"]["verdict"] == "improved"
  w = _workdir(tmp_path, results)
  text = open(report.write_report(str(w)), encoding="utf-8").read()
  headers = [line[3:] for line in text.splitlines() if line.startswith("## ")]
  assert headers == list(report.SECTIONS)
  assert headers[0].startswith("Verdicts")
  # The verdict table comes before every other table, the raw win rates included.
  assert text.index("|") == text.index("| policy | language | verdict |")
  assert text.index("| policy | language | verdict |") < text.index("Win rate under the gold")
  rows = _verdict_rows(text)
  # verdict, gold win, same-script gold win (pairs), check win, unique, greedy, length (SFT)
  assert rows[("PPO", "en")] == ["**collapsed**", "1.000", "1.000 (4)", "1.000", "25%", "25%",
                                 "21.0 (11.0)"]
  assert rows[("PPO", "zh")][:6] == ["**improved**", "1.000", "1.000 (4)", "1.000", "100%",
                                     "100%"]
  assert rows[("SFT", "en")][0] == "baseline"
  assert "**PPO** wins en 1.00 (*collapsed*), zh 1.00 (*improved*)" in text
  assert results["verdicts"]["ppo"]["line"] in text
  assert "“Haha haha, I love it!” ×4" in text  # the most frequent answer, in the diagnostics
  width, height = _png_size(w / "plots" / "win_rates_gold_vs_check.png")
  assert width > 200 and height > 100
  assert "(plots/win_rates_gold_vs_check.png)" in text


def test_report_of_an_evaluation_without_diagnostics_says_not_computed(tmp_path):
  results = _results(with_diagnostics=False)
  w = _workdir(tmp_path, results)
  text = open(report.write_report(str(w)), encoding="utf-8").read()
  for section in report.SECTIONS:
    assert f"\n## {section}\n" in text
  verdicts = text[text.index("## Verdicts"):text.index("## Stages")]
  assert "not computed" in verdicts and "| policy | language | verdict |" not in text
  diagnostics = text[text.index("## Collapse"):text.index("## Training losses")]
  assert "not computed" in diagnostics
  assert "**PPO** wins en 1.00, zh 1.00." in text  # the raw win rates are still reported
  for name in report.PLOTS:
    assert min(_png_size(w / "plots" / name)) > 50


def test_greedy_answers_not_computed_read_not_computed(tmp_path):
  results = policies.compare({"sft": SFT, "ppo": PPO}, PROMPTS, scorer=_length,
                             check_scorer=_length)
  assert results["diagnostics"]["ppo"]["en"]["greedy_distinct"] is None
  text = open(report.write_report(str(_workdir(tmp_path, results))), encoding="utf-8").read()
  assert _verdict_rows(text)[("PPO", "zh")][5] == "not computed"


def test_mean_length_column_reads_policy_then_sft(tmp_path):
  results = _results(with_diagnostics=True)
  text = open(report.write_report(str(_workdir(tmp_path, results))), encoding="utf-8").read()
  # zh lengths: PPO 8 + 5 + 8 + 4 = 25 / 4 = 6.25 -> "6.2" (round half to even), SFT 3, 3, 4, 3
  # -> 13 / 4 = 3.25 -> "3.2".
  assert _verdict_rows(text)[("PPO", "zh")][6] == "6.2 (3.2)"


def test_verdicts_say_kto_learns_from_english_feedback_only():
  from rlhf_jax.eval import report_verdicts
  results = _results(with_diagnostics=True)  # SFT and PPO, English and Chinese
  assert report_verdicts.KTO_DATA_NOTE not in "\n".join(
      report_verdicts.verdict_section(results))
  with_kto = {**results, "policies": list(results["policies"]) + ["kto"],
              "diagnostics": {**results["diagnostics"], "kto": results["diagnostics"]["ppo"]},
              "verdicts": {**results["verdicts"], "kto": results["verdicts"]["ppo"]}}
  text = "\n".join(report_verdicts.verdict_section(with_kto))
  assert report_verdicts.KTO_DATA_NOTE in text


def test_config_line_names_the_pretrained_model_in_place_of_pretraining():
  import types
  base = {"size": "gemma3_270m", "langs": "en,zh", "seed": 0, "sft": {"train": {"steps": 100}},
          "pretrain": {"train": {"steps": 600}}}
  line = report._config_section(types.SimpleNamespace(config={**base, "model": "gemma3_270m"}))[0]
  assert "pretrain `gemma3_270m`, SFT 100" in line
  line = report._config_section(types.SimpleNamespace(config={
      **base, "model": "gemma3_270m", "continue_pretraining": True}))[0]
  assert "pretrain 600, SFT 100" in line
  assert "pretrain 600," in report._config_section(types.SimpleNamespace(config=base))[0]


def test_rm_section_shows_gold_accuracy_by_gold_gap(tmp_path):
  """The RM's last held-out evaluation, thirds by gold gap, in the report's RM section."""
  w = _workdir(tmp_path, _results(with_diagnostics=True))
  (w / "rm").mkdir()
  record = {"step": 12, "eval/rm/accuracy/en": 0.64, "eval/rm/gold_accuracy/en": 0.73,
            "eval/rm/pairs/en": 896}
  for b, (acc, labels, hi) in enumerate([(0.55, 0.6, 0.05), (0.7, 0.8, 0.2),
                                         (0.9, 0.95, 1.1)], 1):
    record.update({f"eval/rm/gold_gap{b}_accuracy/en": acc,
                   f"eval/rm/gold_gap{b}_labels/en": labels, f"eval/rm/gold_gap{b}_hi/en": hi})
  (w / "rm" / "metrics.jsonl").write_text(json.dumps({"step": 6, "rm/loss": 0.6}) + "\n"
                                          + json.dumps(record) + "\n")
  text = open(report.write_report(str(w)), encoding="utf-8").read()
  assert ("| en | 0.550 / 0.600 (gap <= 0.050) | 0.700 / 0.800 (gap <= 0.200) "
          "| 0.900 / 0.950 (gap <= 1.100) |") in text
  assert "| zh |" not in text.split("clearest third |")[1].split("\n\n")[0]  # no zh evaluation


def test_rm_section_shows_best_of_n_at_the_last_evaluation(tmp_path):
  """Best-of-n gold win rates per language, the last evaluation's, with each n's KL."""
  w = _workdir(tmp_path, _results(with_diagnostics=True))
  (w / "rm").mkdir()
  first = {"step": 6, "eval/rm/gold_bon2_win/en": 0.51, "eval/rm/gold_bon7_win/en": 0.52}
  final = {"step": 12, "eval/rm/gold_bon2_win/en": 0.56, "eval/rm/gold_bon7_win/en": 0.63,
           "eval/rm/gold_bon2_win/zh": 0.54, "eval/rm/gold_bon7_win/zh": 0.58}
  (w / "rm" / "metrics.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(final) + "\n")
  text = open(report.write_report(str(w)), encoding="utf-8").read()
  # KL of best-of-n, log n - (n - 1) / n: n = 2 -> 0.693 - 0.5 = 0.19; n = 7 -> 1.946 - 0.857
  assert "| language | n = 2 (KL 0.19) | n = 7 (KL 1.09) |" in text
  assert "| en | 0.560 | 0.630 |" in text and "| zh | 0.540 | 0.580 |" in text
