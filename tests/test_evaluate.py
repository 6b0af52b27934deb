"""`Evaluation` metrics on a hand-made case, TTA, merging shards, tensors in, JSON out."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from c40.evaluate import Evaluation, evaluate
from c40.loaders import LoaderSpec, TensorLoader

CLASSES = ("a", "b", "c")
# 7 samples, labels 0 0 1 1 2 2 2; mistakes: s1 (pred b, 0.8), s3 (pred a, 0.6), s5 (pred a, 0.9)
PROBS = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.6, 0.3, 0.1],
         [0.05, 0.05, 0.9], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]]
LABELS = [0, 0, 1, 1, 2, 2, 2]


def _case(**kw) -> Evaluation:
    probs = np.array(PROBS, np.float32)
    labels = np.array(LABELS)
    losses = -np.log(probs[np.arange(7), labels])
    return Evaluation(np.arange(10, 17), labels, probs, losses, CLASSES, **kw)


def test_hand_made_case():
    ev = _case()
    assert ev.n == 7 and ev.accuracy == pytest.approx(4 / 7)
    np.testing.assert_array_equal(ev.confusion(), [[1, 1, 0], [1, 1, 0], [1, 0, 2]])
    np.testing.assert_allclose(ev.per_class_accuracy(), [0.5, 0.5, 2 / 3])
    np.testing.assert_allclose(ev.missed_fraction(), [0.5, 0.5, 1 / 3])
    np.testing.assert_allclose(ev.confusion(normalize=True).sum(1), 1.0)
    m = ev.misclassified()
    np.testing.assert_array_equal(m.indices, [15, 11, 13])  # most confident mistake first
    np.testing.assert_array_equal(m.labels, [2, 0, 1])
    np.testing.assert_array_equal(m.preds, [0, 1, 0])
    np.testing.assert_allclose(m.confidence, [0.9, 0.8, 0.6])
    np.testing.assert_array_equal(ev.misclassified(limit=2).indices, [15, 11])


def test_topk_accuracy():
    ev = _case()
    assert ev.topk_accuracy(1) == pytest.approx(ev.accuracy)
    # s5 (label c) ties with b at 0.05: the tie goes to the lower index, as argmax does
    assert ev.topk_accuracy(2) == pytest.approx(6 / 7)
    assert ev.topk_accuracy(3) == ev.topk_accuracy(5) == 1.0
    with pytest.raises(ValueError):
        ev.topk_accuracy(0)


def test_absent_class_is_nan_and_null_in_json():
    ev = Evaluation(np.arange(2), np.array([0, 1]), np.eye(3, dtype=np.float32)[[0, 2]],
                    np.zeros(2, np.float32), CLASSES)
    assert np.isnan(ev.per_class_accuracy()[2])
    d = json.loads(json.dumps(ev.to_dict(), allow_nan=False))
    assert d["per_class"]["c"] == {"accuracy": None, "missed_fraction": None, "n": 0}
    assert d["per_class"]["b"]["missed_fraction"] == 1.0


def test_to_dict():
    d = _case().to_dict()
    json.dumps(d, allow_nan=False)
    assert d["n"] == 7 and d["accuracy"] == pytest.approx(4 / 7) and d["top5"] == 1.0
    assert d["confusion"] == [[1, 1, 0], [1, 1, 0], [1, 0, 2]]
    assert d["per_class"]["c"]["missed_fraction"] == pytest.approx(1 / 3)
    assert list(d["per_class"]) == list(CLASSES)


def test_accepts_tensors_and_checks_shapes():
    ref = _case()
    ev = Evaluation(torch.from_numpy(ref.indices), torch.tensor(LABELS), torch.tensor(PROBS),
                    torch.from_numpy(ref.losses), list(CLASSES))
    assert isinstance(ev.probs, np.ndarray) and ev.classes == CLASSES
    assert ev.to_dict() == ref.to_dict()
    with pytest.raises(ValueError, match="inconsistent shapes"):
        Evaluation(np.arange(3), np.zeros(2, int), np.zeros((2, 3)), np.zeros(2), CLASSES)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accepts_cuda_tensors():
    ref = _case()
    ev = Evaluation(torch.from_numpy(ref.indices).cuda(), torch.tensor(LABELS).cuda(),
                    torch.tensor(PROBS).cuda(), torch.from_numpy(ref.losses).cuda(), CLASSES)
    assert ev.to_dict() == ref.to_dict()


def test_empty_evaluation():
    ev = Evaluation(np.zeros(0), np.zeros(0), np.zeros((0, 3)), np.zeros(0), CLASSES)
    assert ev.accuracy == ev.loss == ev.topk_accuracy(5) == 0.0
    assert len(ev.misclassified().indices) == 0
    assert ev.confusion().sum() == 0


# ---------------------------------------------------------------------------- evaluate()
def _data(n=37, seed=0):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), g.integers(0, 3, n)


def _run(model, images, labels, tta=False, **spec_kw):
    spec = LoaderSpec(8, (0.5,) * 3, (0.25,) * 3, **spec_kw)
    return evaluate(model, TensorLoader(images, labels, spec), CLASSES, tta=tta)


def test_tta_changes_nothing_for_flip_invariant_model():
    torch.manual_seed(0)
    gap_linear = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    images, labels = _data()
    plain, tta = _run(gap_linear, images, labels), _run(gap_linear, images, labels, tta=True)
    np.testing.assert_allclose(tta.probs, plain.probs, atol=1e-6)
    np.testing.assert_allclose(tta.losses, plain.losses, atol=1e-5)
    conv = nn.Sequential(nn.Conv2d(3, 3, 3), nn.Flatten(), nn.Linear(3 * 30 * 30, 3))
    assert not np.allclose(_run(conv, images, labels, tta=True).probs,
                           _run(conv, images, labels).probs)  # TTA does act


def test_flip_shift_averages_six_views_with_reflected_borders():
    """flip-shift = the softmax averaged over the image, its mirror, and both moved by one pixel
    up-left and down-right with reflected borders (computed here by hand in numpy)."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 3, 3), nn.Flatten(), nn.Linear(3 * 30 * 30, 3))
    images, labels = _data(n=9)
    got = _run(conv, images, labels, tta="flip-shift").probs
    x = (images.astype(np.float32) / 255 - 0.5) / 0.25                  # the loader's normalising
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    views = [x, x[:, :, ::-1]]
    mirror_padded = np.pad(views[1], ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    views += [p[:, s:s + 32, s:s + 32] for p in (padded, mirror_padded) for s in (0, 2)]
    with torch.no_grad():
        want = np.mean([conv(torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2))))
                        .softmax(-1).numpy() for v in views], axis=0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, _run(conv, images, labels, tta="flip").probs)
    assert np.array_equal(_run(conv, images, labels, tta=True).probs,    # bools: old checkpoints
                          _run(conv, images, labels, tta="flip").probs)


def test_evaluate_restores_training_mode_and_matches_loss():
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(3, 3))
    model.train()
    images, labels = _data(n=10)
    ev = _run(model, images, labels)
    assert model.training
    np.testing.assert_array_equal(ev.labels, labels)
    np.testing.assert_allclose(ev.losses, -np.log(ev.probs[np.arange(10), labels]), rtol=1e-5)
