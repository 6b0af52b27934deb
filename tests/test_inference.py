"""eval / report / predict / export on a checkpoint trained for one epoch on a tiny synthetic
CIFAR-10 folder; CLI error paths print one line and exit 2."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from c40 import inference
from c40.checkpoint import load_model
from c40.cli import main
from c40.config import TrainConfig
from c40.errors import C40Error
from c40.imagefolder import to_input
from c40.train import fit

N_TEST = 40


def _write_batch(path, n, seed):
    g = np.random.default_rng(seed)
    d = {b"data": g.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"labels": (np.arange(n) % 10).tolist()}
    path.write_bytes(pickle.dumps(d, protocol=2))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    root.mkdir()
    for i in range(1, 6):
        _write_batch(root / f"data_batch_{i}", 20, i)
    _write_batch(root / "test_batch", N_TEST, 0)
    return root


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig.from_recipe("fast", data=str(data), epochs=1, batch_size=50, amp="off",
                                  device="cpu", tta=False, out=str(out))
    fit(cfg, progress=False)
    return out / "checkpoint.pt"


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_json_agrees_with_report_summary(capsys, ckpt, data, tmp_path):
    rc, out, _ = _cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--json",
                      "--device", "cpu")
    assert rc == 0
    ev = json.loads(out)
    assert ev["n"] == N_TEST and ev["arch"] == "strided_whiten" and ev["params"] > 0
    assert set(ev["per_class"]["cat"]) >= {"accuracy", "missed_fraction"}
    assert np.array(ev["confusion"]).shape == (10, 10) and np.sum(ev["confusion"]) == N_TEST
    rc, out, _ = _cli(capsys, "report", "--checkpoint", ckpt, "--data", data, "--out",
                      tmp_path / "rep", "--device", "cpu")
    assert rc == 0 and "REPORT.md" in out
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary == ev
    names = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"train_grid.png", "curves.png", "confusion.png", "predictions.parquet"} <= names


def test_eval_uses_the_runs_own_tta_unless_told(capsys, ckpt, data, tmp_path):
    """`c40 eval` reproduces what `c40 train` printed: the run's own TTA mode (checkpoints from
    before the modes saved true/false: flip/off), unless --tta [MODE]/--no-tta says otherwise."""
    import torch

    state = torch.load(ckpt, weights_only=True)
    state["config"]["tta"] = True  # a checkpoint from before the modes: flip
    with_tta = tmp_path / "tta.pt"
    torch.save(state, with_tta)
    runs = {}
    for name, path, flags in [("own_off", ckpt, []), ("own_on", with_tta, []),
                              ("forced_off", with_tta, ["--no-tta"]), ("forced_on", ckpt, ["--tta"]),
                              ("six_views", ckpt, ["--tta", "flip-shift"])]:
        rc, out, _ = _cli(capsys, "eval", "--checkpoint", path, "--data", data, "--json",
                          "--device", "cpu", *flags)
        assert rc == 0
        runs[name] = json.loads(out)
    assert [runs[k]["tta"] for k in ("own_off", "own_on", "forced_off", "forced_on", "six_views")] \
        == ["off", "flip", "off", "flip", "flip-shift"]
    assert runs["own_on"]["accuracy"] == runs["forced_on"]["accuracy"]
    assert runs["own_off"]["accuracy"] == runs["forced_off"]["accuracy"]
    assert len({runs[k]["loss"] for k in ("own_off", "own_on", "six_views")}) == 3  # TTA really ran


def test_eval_text_and_tta(capsys, ckpt, data):
    rc, out, _ = _cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--tta",
                      "--device", "cpu")
    assert rc == 0 and f"on {N_TEST} test images with flip TTA" in out and "airplane" in out


def test_predict(capsys, ckpt, tmp_path):
    g = np.random.default_rng(0)
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(small)
    Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(big)
    rc, out, err = _cli(capsys, "predict", "--checkpoint", ckpt, "--device", "cpu", small, big)
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, (small, big)):
        name, label, conf = line.split("\t")
        assert name == str(path) and label in inference.load_model(ckpt)[1]["classes"]
        assert 0.0 < float(conf) <= 1.0
    assert "big.png: resized from 64x64 to 32x32" in err and "small.png" not in err


def test_predict_images_matches_model(ckpt):
    model, state = load_model(ckpt)
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8))
    gray = img.convert("L")
    p_rgb, p_gray = inference.predict_images(model, state, [img, gray])
    assert p_rgb.probs.shape == (10,) and p_rgb.probs.sum() == pytest.approx(1, abs=1e-5)
    assert to_input(gray)[1] == "converted from L to RGB"
    x = (torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
         - torch.tensor(state["mean"]).view(1, 3, 1, 1)) / torch.tensor(state["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(x).softmax(-1)[0].numpy()
    np.testing.assert_allclose(p_rgb.probs, ref, atol=1e-5)


def _load_export(fmt: str, path):
    """The exported file back as a function of a float (B, 3, 32, 32) batch, and its c40.json."""
    extra = {"c40.json": ""}
    if fmt == "pt2":
        fn = torch.export.load(str(path), extra_files=extra).module()
    elif fmt == "torchscript":
        with pytest.warns(FutureWarning):  # torch deprecates TorchScript; still loads
            fn = torch.jit.load(str(path), _extra_files=extra)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path))
        fn = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])  # noqa: E731
        extra = None
    return fn, extra


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "torchscript"])
def test_export_round_trip_gives_the_same_logits(capsys, ckpt, tmp_path, fmt):
    out = tmp_path / "sub" / f"model.{fmt}"
    argv = ["export", "--checkpoint", ckpt, "--out", out] + ([] if fmt == "pt2" else ["--format", fmt])
    rc, stdout, _ = _cli(capsys, *argv)
    assert rc == 0 and out.is_file() and stdout.strip() == f"exported {out}"
    fn, extra = _load_export(fmt, out)
    if extra is not None:
        assert json.loads(extra["c40.json"])["classes"][3] == "cat"
    model, _ = load_model(ckpt)
    for batch in (1, 5):  # any batch size, not the one traced
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(fn(x), model(x), atol=1e-5, rtol=1e-5)


def test_export_onnx_without_package_is_a_clear_error(capsys, ckpt, tmp_path, monkeypatch):
    real = inference.importlib.util.find_spec
    monkeypatch.setattr(inference.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    rc, _, err = _cli(capsys, "export", "--checkpoint", ckpt, "--format", "onnx", "--out",
                      tmp_path / "m.onnx")
    assert rc == 2 and "pip install 'c40[onnx]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(C40Error, match="unknown export format"):
        inference.export_checkpoint(ckpt, "tflite", tmp_path / "m")


@pytest.mark.parametrize("command", ["eval", "report", "predict", "export"])
@pytest.mark.parametrize("problem", ["missing", "corrupt", "not_c40"])
def test_bad_checkpoint_is_one_line_exit_2(capsys, tmp_path, data, command, problem):
    path = tmp_path / "checkpoint.pt"
    if problem == "corrupt":
        path.write_bytes(b"PK\x03\x04 truncated zip")
    elif problem == "not_c40":
        torch.save({"weights": torch.zeros(2)}, path)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    extra = {"eval": ["--data", data], "report": ["--data", data, "--out", tmp_path / "r"],
             "predict": [image], "export": ["--out", tmp_path / "m"]}
    rc, out, err = _cli(capsys, command, "--checkpoint", path, *extra[command])
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"c40 {command}: error: ") and str(path) in err
    assert not (tmp_path / "r" / "REPORT.md").exists() and not (tmp_path / "m").exists()


def test_bad_inputs_are_one_line_errors(capsys, ckpt, data, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    cases = [("predict", "--checkpoint", ckpt, bad),
             ("predict", "--checkpoint", ckpt, tmp_path / "none.png"),
             ("eval", "--checkpoint", ckpt, "--data", tmp_path / "nodata"),
             ("report", "--checkpoint", ckpt, "--data", data, "--out", tmp_path / "r",
              "--metrics", bad)]
    for argv in cases:
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (argv, err)


def test_eval_on_data_with_other_classes_is_a_clear_error(ckpt):
    from c40.data import Dataset

    model, state = load_model(ckpt)
    ds = Dataset(np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int64), ("x", "y"))
    with pytest.raises(C40Error, match="not the ones the checkpoint was trained on"):
        inference.evaluate_model(model, state, ds, torch.device("cpu"))
