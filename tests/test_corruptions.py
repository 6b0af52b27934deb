"""Corrupted test sets (`c40.corruptions`) on real CIFAR-10 test images, and `c40 eval
--corruptions` on a checkpoint: deterministic, severity ordered, clean accuracy = `c40 eval`'s."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from c40.augment import jpeg

from c40.cli import main
from c40.corruptions import CORRUPTIONS, corrupt
from c40.data import read_batch


@pytest.fixture(scope="module")
def images(cifar_dir):
    return read_batch(cifar_dir / "test_batch")[0][:64]  # (64, 32, 32, 3) uint8


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_seeded_and_grows_with_severity(images, name):
    levels = CORRUPTIONS[name].levels
    outs = [corrupt(images, name, lv, seed=0) for lv in levels]
    assert all(o.shape == images.shape and o.dtype == np.uint8 for o in outs)
    assert np.array_equal(corrupt(images, name, levels[2], seed=0), outs[2])  # same seed, same set
    dist = [np.abs(o.astype(np.int16) - images).mean() for o in outs]
    assert dist[0] > 0.3  # even the mildest level changes the pixels
    assert all(a < b for a, b in zip(dist, dist[1:])), dist  # severity 1 < 2 < ... < 5


def test_corruptions_do_what_their_names_say(images):
    x = images.astype(np.float64)
    bright = corrupt(images, "brightness", 0.2).astype(np.float64)
    assert 0.15 * 255 < (bright - x).mean() < 0.2 * 255  # + 0.2 x 255, clipped at 255
    blurred = corrupt(images, "blur", 1.0).astype(np.float64)
    grad = lambda im: np.abs(np.diff(im, axis=2)).mean()  # noqa: E731  horizontal detail
    assert grad(blurred) < 0.7 * grad(x)
    noisy = corrupt(images, "noise", 0.06).astype(np.float64)
    assert 0.04 * 255 < (noisy - x).std() < 0.07 * 255  # std 0.06 x 255 (less where clipped)
    assert np.array_equal(corrupt(images, "noise", 0.06, seed=1), corrupt(images, "noise", 0.06, seed=1))
    assert not np.array_equal(corrupt(images, "noise", 0.06, seed=1), noisy.astype(np.uint8))
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(images, "fog", 1)


def _saved_by_pil(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("quality", [75, 30])
def test_jpeg_is_what_a_photo_tool_saves(images, quality):
    """A user's photo was saved by a tool that encodes RGB as RGB. albumentations'
    ImageCompression reads an RGB array as BGR (3.2 grey levels off at quality 75)."""
    want = np.stack([_saved_by_pil(img, quality) for img in images])
    assert np.array_equal(corrupt(images, "jpeg", quality), want)
    assert np.array_equal(jpeg(images, [quality] * len(images)), want)


def test_eval_corruptions_reports_every_severity_against_the_clean_accuracy(capsys, tiny_cifar,
                                                                           tmp_path):
    from c40.config import TrainConfig
    from c40.train import fit

    cfg = TrainConfig.from_recipe("fast", data=str(tiny_cifar), epochs=2, batch_size=100, amp="off",
                                  device="cpu", out=str(tmp_path / "run"))
    fit(cfg, progress=False)
    capsys.readouterr()  # the epoch lines
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    assert main(["eval", "--checkpoint", ckpt, "--data", str(tiny_cifar), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", ckpt, "--data", str(tiny_cifar), "--json",
                 "--corruptions"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["clean"] == plain["accuracy"] and res["tta"] == "flip-shift"
    assert {"c40_commit", "torch", "albumentations", "opencv"} <= set(res["code"])  # reproducible
    assert set(res["corruptions"]) == set(CORRUPTIONS)
    for name, r in res["corruptions"].items():
        assert r["levels"] == list(CORRUPTIONS[name].levels)
        assert len(r["accuracy"]) == 5 and all(0 <= a <= 1 for a in r["accuracy"])
        assert r["drop"] == pytest.approx([res["clean"] - a for a in r["accuracy"]])
    # a heavily corrupted set is not the clean one: some accuracy moves at severity 5
    assert any(r["accuracy"][-1] != res["clean"] for r in res["corruptions"].values())
    assert main(["eval", "--checkpoint", ckpt, "--data", str(tiny_cifar), "--corruptions"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"clean accuracy {res['clean']:.4f} with flip-shift TTA")
    assert "jpeg       quality 90:" in text and "brightness shift 0.1:" in text
