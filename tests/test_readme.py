"""The README's Python snippet runs as written."""
import re
import runpy
from pathlib import Path


def test_readme_python_snippet_runs(tmp_path, capsys):
  text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  snippet = next(b for b in blocks if "pipeline.auto_bits" in b)
  path = tmp_path / "snippet.py"
  path.write_text(snippet)
  runpy.run_path(str(path), run_name="__main__")
  out = capsys.readouterr().out
  assert "Layers(10 layers" in out and "(64, 10)" in out
