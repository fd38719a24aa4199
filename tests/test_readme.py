"""The README's Python example runs and its assertion holds."""
import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace('PRESETS["paper"]', 'PRESETS["paper"].__class__(dim=16, depth=1)')
    exec(compile(code, "README.md", "exec"), {})
