"""report.py writes readable files from an Evaluation, atomically, and nothing half-done."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from c40 import report
from c40.data import CIFAR10_CLASSES, Dataset
from c40.errors import C40Error, DataError
from c40.evaluate import Evaluation

N, K = 60, len(CIFAR10_CLASSES)


@pytest.fixture(scope="module")
def ev() -> Evaluation:
    g = np.random.default_rng(0)
    logits = g.normal(size=(N, K)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.arange(N) % K
    return Evaluation(np.arange(N), labels, probs, -np.log(probs[np.arange(N), labels]),
                      CIFAR10_CLASSES)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)


HISTORY = [{"epoch": e, "lr": 0.1 * e, "train_loss": 2.0 / e, "train_acc": 0.3 * e,
            **({"test_loss": 2.2 / e, "test_acc": 0.28 * e} if e != 2 else {})}
           for e in (1, 2, 3)]


@pytest.fixture(scope="module")
def written(tmp_path_factory, ev, images):
    out = tmp_path_factory.mktemp("report")
    train = Dataset(images, np.arange(N) % K, CIFAR10_CLASSES)
    files = report.write_report(ev, out, images=images, train=train, history=HISTORY,
                                meta={"arch": "strided", "params": 123, "checkpoint": "x.pt"})
    return out, files


def test_all_files_written_and_nothing_else(written):
    out, files = written
    names = {"train_grid.png", "curves.png", "misclassified.png", "per_class_missed.png",
             "confusion.png", "predictions.parquet", "summary.json", "REPORT.md"}
    assert {p.name for p in files.values()} == names
    assert {p.name for p in out.iterdir()} == names  # no temp files left behind


@pytest.mark.parametrize("name,min_w,min_h", [
    ("train_grid.png", 300, 400), ("misclassified.png", 400, 400),
    ("per_class_missed.png", 400, 200), ("confusion.png", 400, 400), ("curves.png", 600, 200)])
def test_pngs_are_valid_images(written, name, min_w, min_h):
    with Image.open(written[0] / name) as im:
        im.verify()
    with Image.open(written[0] / name) as im:
        assert im.format == "PNG"
        assert min_w <= im.width <= 3000 and min_h <= im.height <= 3000
        assert np.asarray(im.convert("L")).std() > 5  # not a blank canvas


def test_predictions_parquet(written, ev):
    table = pq.read_table(written[0] / "predictions.parquet")
    assert table.num_rows == N
    assert table.column_names == (["index", "label", "pred", "confidence"]
                                  + [f"prob_{c}" for c in CIFAR10_CLASSES])
    d = table.to_pydict()
    np.testing.assert_array_equal(d["pred"], ev.preds)
    np.testing.assert_allclose(d["confidence"], ev.probs.max(1))
    np.testing.assert_allclose(d["prob_cat"], ev.probs[:, 3])
    assert json.loads(table.schema.metadata[b"classes"]) == list(CIFAR10_CLASSES)


def test_summary_and_markdown(written, ev):
    out = written[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(ev.to_dict())) | {
        "arch": "strided", "params": 123, "checkpoint": "x.pt"}
    md = (out / "REPORT.md").read_text()
    for png in out.glob("*.png"):
        assert f"({png.name})" in md
    assert f"{ev.accuracy:.2%}" in md


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, ev, monkeypatch):
    path = report.write_predictions(ev, tmp_path / "predictions.parquet")

    def broken(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr("pyarrow.parquet.write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        report.write_predictions(ev, path)
    assert pq.read_table(path).num_rows == N  # the old complete file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.parquet"]  # no temp left


def test_failed_report_no_longer_claims_to_be_complete(tmp_path, ev, images, monkeypatch):
    (tmp_path / "REPORT.md").write_text("an earlier, complete report")

    def broken(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_misclassified", broken)
    with pytest.raises(C40Error, match="could not write the report .*No space left"):
        report.write_report(ev, tmp_path, images=images)
    assert not (tmp_path / "REPORT.md").exists()


def test_misclassified_grid_without_mistakes(tmp_path):
    probs = np.eye(K, dtype=np.float32)
    perfect = Evaluation(np.arange(K), np.arange(K), probs, np.zeros(K), CIFAR10_CLASSES)
    path = report.plot_misclassified(perfect, np.zeros((K, 32, 32, 3), np.uint8),
                                     tmp_path / "m.png")
    with Image.open(path) as im:
        assert im.width > 100


def test_read_metrics(tmp_path):
    good = tmp_path / "metrics.jsonl"
    good.write_text("".join(json.dumps(m) + "\n" for m in HISTORY) + "\n")
    assert report.read_metrics(good) == HISTORY
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 1}\n{"epoch": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON line"):
        report.read_metrics(bad)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\x89PNG\x00\xff")
    with pytest.raises(DataError, match="unreadable metrics file"):
        report.read_metrics(binary)
    with pytest.raises(DataError, match="not found"):
        report.read_metrics(tmp_path / "missing.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DataError, match="JSON object"):
        report.read_metrics(tmp_path / "list.jsonl")
