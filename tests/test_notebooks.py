"""The example notebooks run top to bottom on tiny settings, show what they promise, and are
committed without outputs.

Each notebook is executed with nbclient on the ``python3`` kernel (ipykernel, installed with
the test extras) with ``AMQ_NOTEBOOK_QUICK=1``, its parameters cell's switch to tiny
settings. The kernel is a fresh process: it sees this process's environment (JAX on CPU)
but not the 8 simulated devices of conftest.
"""
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = ["quickstart.ipynb", "own_model.ipynb"]
CELL_TIMEOUT = 600  # seconds; a hang fails the test instead of blocking CI


def execute(nb, cwd, monkeypatch):
  monkeypatch.setenv("AMQ_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}})
  client.execute()  # raises CellExecutionError, naming the cell, on any error
  return nb


def outputs(nb):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def text_of(nb, stream=None) -> str:
  """Everything the notebook printed (``stream``: only 'stdout' or 'stderr')."""
  parts = []
  for o in outputs(nb):
    if o.output_type == "stream" and stream in (None, o.name):
      parts.append(o.text)
    elif o.output_type in ("execute_result", "display_data") and stream is None:
      parts.append(o.data.get("text/plain", ""))
  return "".join(parts)


def markdown_tables(nb) -> list[str]:
  return [o.data["text/markdown"] for o in outputs(nb)
          if o.output_type in ("execute_result", "display_data") and "text/markdown" in o.data]


def images(nb) -> list[str]:
  return [o.data["image/png"] for o in outputs(nb)
          if o.output_type in ("execute_result", "display_data") and "image/png" in o.data]


def table_rows(table: str) -> dict[str, list[str]]:
  """``{first cell: other cells}`` of a Markdown table's body rows."""
  rows = {}
  for line in table.splitlines()[2:]:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    rows[cells[0]] = cells[1:]
  return rows


def same_model(exported: str, qat: str, examples: int) -> bool:
  """The packed file evaluates like the fine-tuned model: re-quantizing the dequantized
  weights gives them back up to float rounding, which may flip one prediction."""
  return abs(percent(exported) - percent(qat)) <= 100.0 / examples + 1e-9


def percent(cell: str) -> float:
  m = re.fullmatch(r"(\d+\.\d+)%", cell)
  assert m, f"not a percentage: {cell!r}"
  return float(m.group(1))


def showed_progress(nb, desc: str) -> bool:
  """A tqdm.auto bar named ``desc``: a widget (with ipywidgets) or the text bar on stderr."""
  widgets = [o for o in outputs(nb) if "application/vnd.jupyter.widget-view+json"
             in o.get("data", {})]
  return bool(widgets) or desc in text_of(nb, "stderr")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_have_no_outputs(name):
  nb = nbformat.read(EXAMPLES / name, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, f"{name} has no code cells"
  for i, c in enumerate(code):
    assert c.outputs == [] and c.execution_count is None, (
        f"{name}: code cell {i} was committed with outputs; clear them "
        "(jupyter nbconvert --clear-output --inplace examples/*.ipynb)")
  # one parameters cell at the top switches every size
  assert 'os.environ.get("AMQ_NOTEBOOK_QUICK") == "1"' in code[0].source


def test_python3_kernel_is_this_interpreter(tmp_path, monkeypatch):
  """The ``python3`` kernel runs this virtualenv's Python (amq_jax importable), even when
  the virtualenv is not activated (CI calls .venv/bin/python -m pytest)."""
  nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
      "import sys, amq_jax; print(sys.executable)")])
  execute(nb, tmp_path, monkeypatch)
  assert Path(text_of(nb, "stdout").strip()).resolve() == Path(sys.executable).resolve()


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
  nb = execute(nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4), tmp_path,
               monkeypatch)
  out = text_of(nb)
  assert "Model(linen, 272,186 parameters, 22 quantizable layers" in out
  fp32 = float(re.search(r"FP32 top-1 on 256 test images: (\d+\.\d+)%", out).group(1))
  assert fp32 > 85.0, "the shipped ResNet20 was not loaded (chance is 10%)"
  assert showed_progress(nb, "hessian traces")
  assert out.count("TraceEstimate(") == 22
  # the spectrum and the frontier, inline
  assert len(images(nb)) >= 2
  tables = markdown_tables(nb)
  bits = next(t for t in tables if t.startswith("| layer |"))
  rows = table_rows(bits)
  assert list(rows)[0] == "stem_conv" and list(rows)[-1] == "head" and len(rows) == 22
  assert rows["stem_conv"][1:] == ["8", "8"] and rows["head"][1:] == ["8", "8"]  # pinned
  assert all(w in ("2", "3", "4", "8") for r in rows.values() for w in r[1:])
  # the larger budget stores more weight bits
  stored = [sum(int(r[0].replace(",", "")) * int(r[k]) for r in rows.values()) for k in (1, 2)]
  assert stored[1] > stored[0]
  comparison = table_rows(next(t for t in tables if t.startswith("| configuration |")))
  assert set(comparison) == {"FP32", "hawq_v2", "uniform"}
  for method in ("hawq_v2", "uniform"):
    size, avg, ptq, qat, exported = comparison[method]
    assert float(size) < float(comparison["FP32"][0]) / 5
    assert 2.0 <= float(avg) <= 8.0
    assert same_model(exported, qat, 256), comparison[method]
  assert out.count("model.amq") == 2


@pytest.mark.slow
def test_own_model_runs(tmp_path, monkeypatch):
  nb = execute(nbformat.read(EXAMPLES / "own_model.ipynb", as_version=4), tmp_path,
               monkeypatch)
  out = text_of(nb)
  assert "Model(linen," in out and "Model(nnx," in out
  assert showed_progress(nb, "hessian traces")
  for path in ("Conv_0/kernel", "Dense_1/kernel", "conv1/kernel", "fc2/kernel"):
    assert re.search(rf"{re.escape(path)}\s+TraceEstimate\(", out), path
  tables = markdown_tables(nb)
  bits = next(t for t in tables if t.startswith("| model | layer |"))
  for model in ("linen", "nnx"):
    avg = re.search(rf"\| {model} \| \*\*average\*\* \| \| \| (\d+\.\d+) ", bits)
    assert avg and float(avg.group(1)) <= 3.0 + 1e-6, bits
  assert re.search(r"quantized logits \(64, 10\)", out)
  export = table_rows(next(t for t in tables if t.startswith("| model | FP32 |")))
  assert set(export) == {"linen", "nnx"}
  for model, (fp32, ptq, qat, exported, file_bytes, float_bytes) in export.items():
    assert same_model(exported, qat, 256), (model, export[model])
    assert int(file_bytes.replace(",", "")) < int(float_bytes.replace(",", "")) / 4
  assert "NnxCNN with packed weights, e.g. fc2: (64, 10)" in out
