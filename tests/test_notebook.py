"""notebooks/explore.ipynb runs top to bottom without errors and shows the equivalence.

The notebook is executed in memory (the committed file is not rewritten) with
a Jupyter kernel that runs this test's own interpreter: a kernel spec with a
unique name pointing at ``sys.executable`` is written into a temporary
directory placed first on ``JUPYTER_PATH``, so a ``python3`` kernel installed
elsewhere on the machine cannot be picked up instead. The working directory
of the kernel is ``notebooks/``, as under ``pytest --nbmake``.
"""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"
KERNEL_NAME = "convmixer-jax-test-python"


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "".join(parts)


def test_explore_notebook_runs(tmp_path, monkeypatch):
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python (tests)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=600,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    errors = [
        out
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    text = _outputs_text(nb)
    m = re.search(r"identical predictions: (\d+) / (\d+)", text)
    assert m, "the notebook did not print the identical-prediction count"
    same, total = int(m.group(1)), int(m.group(2))
    assert total > 0 and same == total, m.group(0)
    assert "decrypt(encrypt(x)) == x on all" in text and "False" not in re.findall(
        r"decrypt\(encrypt\(x\)\) == x on all \d+ images: (\w+)", text
    )
    assert "E' == sign * E[perm] exactly: True" in text
    # section 7 (with the torch extra): an imported timm model, encrypted with a pb = 147 key;
    # section 8: a timm ViT encrypted with a block-scrambling key
    if "section skipped" not in text:
        diffs = [float(v) for v in re.findall(r"max \|diff\| / scale = ([0-9.e+-]+)", text)]
        assert len(diffs) == 3 and max(diffs) < 1e-4, diffs
        assert "pb = 147, flips = 73" in text
