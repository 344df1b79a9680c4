"""The PPO KL plot draws one β line, or one per language when the run had kl.coef_by_lang: read
back from the figure's own lines, against the metrics written."""
import json
import os

import numpy as np
import pytest

from rlhf_jax.eval import report_plots
from rlhf_jax.eval.report_run import Run


def _run(tmp_path, records) -> Run:
  os.makedirs(tmp_path / "ppo")
  with open(tmp_path / "ppo" / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return Run(str(tmp_path))


def _beta_lines(run, tmp_path, monkeypatch) -> dict:
  """{label: y values} of the β axis's lines (the figure is caught before it is cleared)."""
  figures = []
  save = report_plots._save
  monkeypatch.setattr(report_plots, "_save",
                      lambda fig, path: (figures.append(
                          {ln.get_label(): ln.get_ydata() for ax in fig.axes[1:]
                           for ln in ax.get_lines()}), save(fig, path)))
  report_plots.plot_ppo_kl(run, str(tmp_path / "kl.png"))
  assert os.path.getsize(tmp_path / "kl.png") > 0
  return figures[0]


@pytest.mark.parametrize("per_language", [False, True])
def test_kl_plot_draws_each_languages_beta(per_language, tmp_path, monkeypatch):
  records = []
  for step in range(1, 4):
    r = {"step": step, "objective/kl": 0.5 * step, "objective/en/kl": 0.4 * step,
         "objective/zh/kl": 0.6 * step, "objective/kl_coef": 0.07 + 0.001 * step}
    if per_language:
      r.update({"objective/en/kl_coef": 0.07 - 0.001 * step,
                "objective/zh/kl_coef": 0.1 + 0.002 * step})
    records.append(r)
  lines = _beta_lines(_run(tmp_path, records), tmp_path, monkeypatch)
  if per_language:
    assert sorted(lines) == ["beta en", "beta zh"]
    np.testing.assert_allclose(lines["beta en"], [0.069, 0.068, 0.067])
    np.testing.assert_allclose(lines["beta zh"], [0.102, 0.104, 0.106])
  else:
    assert list(lines) == ["beta"]
    np.testing.assert_allclose(lines["beta"], [0.071, 0.072, 0.073])
