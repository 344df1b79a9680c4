"""experiments/colab_quickstart.ipynb runs top to bottom in a real Jupyter kernel and shows the
pipeline's report: its Markdown text and its plots."""
import base64
import json
import os
import pathlib
import re
import shutil
import sys

import pytest
from pipeline_fixture import SMOKE_CONFIG

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "experiments" / "colab_quickstart.ipynb"
KERNEL = "rlhf-jax-test"


def _kernel_spec(root: pathlib.Path) -> None:
  """A kernel spec that runs this interpreter, so the notebook sees the same packages as the
  tests, whatever other Python kernels the machine has registered."""
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "rlhf_jax test", "language": "python"}))


def _outputs(nb, output_type=None):
  return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
          if output_type is None or o.output_type == output_type]


@pytest.mark.slow
@pytest.mark.heavy
def test_quickstart_notebook_runs_and_shows_the_report(tmp_path, monkeypatch,
                                                       tiny_pipeline_workdir, bundled_data_dir):
  import nbformat
  from nbclient import NotebookClient

  # A copy of the finished tiny pipeline: the notebook's run skips every stage and rebuilds the
  # report there, without touching the workdir other tests read.
  workdir = tmp_path / "workdir"
  shutil.copytree(tiny_pipeline_workdir, workdir, symlinks=True)
  old_report = workdir / "report.md"
  if old_report.exists():
    old_report.unlink()
  _kernel_spec(tmp_path / "jupyter")
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("RLHF_JAX_NOTEBOOK_LOCAL", "1")
  monkeypatch.setenv("RLHF_JAX_NOTEBOOK_WORKDIR", str(workdir))
  monkeypatch.setenv("RLHF_JAX_NOTEBOOK_CONFIG", SMOKE_CONFIG.partition(":")[2])
  monkeypatch.setenv("RLHF_JAX_NOTEBOOK_DATA_DIR", bundled_data_dir)

  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                 resources={"metadata": {"path": str(tmp_path)}}).execute()

  # Every stage was finished already: the run skipped them all and rebuilt only the report.
  text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
  assert re.search(r"\[pretrain\] done earlier: skipped", text), text[-2000:]
  report = (workdir / "report.md").read_text(encoding="utf-8")
  # The report's text is displayed: joined, the Markdown outputs are report.md less its image
  # links, line for line.
  shown = "\n".join(o["data"]["text/markdown"] for o in _outputs(nb, "display_data")
                    if "text/markdown" in o["data"])
  links = re.findall(r"^!\[[^\]]*\]\(([^)]+\.png)\)$", report, flags=re.M)
  assert links, "the report links no plot"
  expected = [l for l in report.splitlines() if not re.fullmatch(r"!\[[^\]]*\]\([^)]+\.png\)",
                                                                   l.strip())]
  assert [l for l in shown.splitlines() if l.strip()] == [l for l in expected if l.strip()]
  assert shown.startswith("# RLHF pipeline report")
  # ... and each linked plot is displayed as the very PNG file the report points to.
  images = [base64.b64decode(o["data"]["image/png"]) for o in _outputs(nb, "display_data")
            if "image/png" in o["data"]]
  assert images == [(workdir / link).read_bytes() for link in links]
