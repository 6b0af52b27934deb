"""examples/quickstart.ipynb runs top to bottom (tiny synthetic CIFAR-10 folder, one epoch)
and is committed without outputs."""
import pickle
from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def _write_batch(path: Path, n: int, seed: int) -> None:
    g = np.random.default_rng(seed)
    d = {b"data": g.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"labels": (np.arange(n) % 10).tolist()}
    path.write_bytes(pickle.dumps(d, protocol=2))


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_quickstart_runs(tmp_path, monkeypatch):
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    for i in range(1, 6):
        _write_batch(data / f"data_batch_{i}", 20, i)
    _write_batch(data / "test_batch", 40, 0)
    out = tmp_path / "out"
    for key, value in {"C40_DATA": data, "C40_NB_SUBSET": 60, "C40_NB_EPOCHS": 1,
                       "C40_NB_OUT": out}.items():
        monkeypatch.setenv(key, str(value))  # the kernel inherits this environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # train grid, curves, misclassified, per-class bars, confusion
    assert (out / "run" / "checkpoint.pt").is_file()
    assert (out / "report" / "REPORT.md").is_file()
