"""The training engine on CPU with tiny real slices: learning, exact resume, NaN guard."""
import json

import pytest
import torch

from c40.checkpoint import load_checkpoint
from c40.config import TrainConfig
from c40.errors import C40Error, TrainingDiverged
from c40.train import fit


def tiny_cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), width=0.5, epochs=2, batch_size=64, lr=0.2,
                test_subset=200, tta=False, seed=3, eval_every=1)
    return TrainConfig.from_recipe("fast", **{**base, **kw})


def test_training_reduces_the_loss_on_real_data(tiny_cifar, tmp_path):
    res = fit(tiny_cfg(tiny_cifar, tmp_path, epochs=4, dropout=0.1), progress=False)
    losses = [m["train_loss"] for m in res.history]
    assert losses[-1] < losses[0] - 0.1
    assert res.accuracy > 0.2  # 10 classes: chance is 0.1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    keys = set(json.loads(lines[-1]))
    assert {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s",
            "seconds"} <= keys


def test_checkpoints_record_the_code_the_run_started_with(tiny_cifar, tmp_path, monkeypatch):
    """A long run outlives commits to its checkout: every epoch's checkpoint names the commit
    the process started from, not the one checked out when the epoch ended."""
    import subprocess

    import c40.checkpoint
    import c40.run
    import c40.train

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=c40.train.__file__.rsplit("/", 1)[0]).stdout.strip()
    assert c40.checkpoint.provenance()["c40_commit"] == (head or None)
    calls = iter(["start", "later", "later"])
    fake = lambda: {"c40_commit": next(calls)}  # noqa: E731  HEAD moves after the first call
    monkeypatch.setattr(c40.checkpoint, "provenance", fake)
    monkeypatch.setattr(c40.run, "provenance", fake)
    fit(tiny_cfg(tiny_cifar, tmp_path, subset=256, epochs=2), progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["provenance"] == {"c40_commit": "start"}


def test_progress_tests_use_at_most_flip_and_the_last_epoch_the_runs_tta(tiny_cifar, tmp_path,
                                                                        monkeypatch):
    """flip-shift's 6 views cost ~0.6 of a 32-px epoch per test: the tests before the last epoch
    (progress, and the validation Tune reads) use 2 views; the run's result uses its own mode,
    and every tested epoch's metrics say which views it averaged."""
    import c40.train

    seen = []
    real = c40.train.evaluate

    def spy(model, loader, classes, **kw):
        seen.append(kw["tta"])
        return real(model, loader, classes, **kw)
    monkeypatch.setattr(c40.train, "evaluate", spy)
    res = fit(tiny_cfg(tiny_cifar, tmp_path, subset=256, epochs=3, tta="flip-shift", val_split=64),
              progress=False)
    assert seen == ["flip", "flip", "flip-shift", "flip-shift"]  # val each epoch, then the test
    assert [m["eval_tta"] for m in res.history] == ["flip", "flip", "flip-shift"]
    assert "test_acc" in res.history[-1] and "test_acc" not in res.history[0]
    seen.clear()
    fit(tiny_cfg(tiny_cifar, tmp_path / "off", subset=256, epochs=2, tta="off"), progress=False)
    assert seen == ["off", "off"]  # never more views than the run asked for


class _Stop(Exception):
    pass


def _stop_after(epoch):
    def report(metrics, ckpt):
        if metrics["epoch"] == epoch:
            raise _Stop
    return report


@pytest.mark.parametrize("extra", [{}, {"ema": True, "dropout": 0.2}, {"muon_lr": 0.05, "bn_bias_lr": 8},
                                   {"arch": "strided_whiten"}])
def test_resume_is_bit_identical_on_cpu(tiny_cifar, tmp_path, extra):
    full = fit(tiny_cfg(tiny_cifar, tmp_path / "full", epochs=3, **extra), progress=False)
    with pytest.raises(_Stop):
        fit(tiny_cfg(tiny_cifar, tmp_path / "cut", epochs=3, **extra), report=_stop_after(1),
            progress=False)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    resumed = fit(tiny_cfg(tiny_cifar, tmp_path / "cut", epochs=3, resume=True, **extra),
                  progress=False)
    assert [m["epoch"] for m in resumed.history] == [1, 2, 3]
    assert resumed.accuracy == full.accuracy
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for m1, m2 in zip(a["history"], b["history"]):
        assert m1["train_loss"] == m2["train_loss"] and m1["test_acc"] == m2["test_acc"]
    # `elapsed` counts the whole run across the resume, not the resumed process alone
    e = [m["elapsed"] for m in resumed.history]
    assert e[1] >= e[0] + resumed.history[1]["seconds"] and e[2] > e[1]


def test_a_checkpoint_older_than_a_config_field_resumes_as_it_ran(tiny_cifar, tmp_path):
    """Checkpoints written before muon_lr and bn_bias_lr existed (e.g. a committed half-finished
    run) ran plain SGD: they resume with Muon off and a plain bias rate, whatever today's
    defaults, and a run asking for Muon is told the schedule differs."""
    sgd = dict(subset=256, epochs=2, muon_lr=0.0, bn_bias_lr=1.0)
    with pytest.raises(_Stop):
        fit(tiny_cfg(tiny_cifar, tmp_path, **sgd), report=_stop_after(1), progress=False)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["muon_lr"], state["config"]["bn_bias_lr"]
    torch.save(state, path)
    with pytest.raises(C40Error, match="muon_lr=0.0 but this run asks for 0.05"):
        fit(tiny_cfg(tiny_cifar, tmp_path, resume=True, **{**sgd, "muon_lr": 0.05}), progress=False)
    res = fit(tiny_cfg(tiny_cifar, tmp_path, resume=True, **sgd), progress=False)
    assert [m["epoch"] for m in res.history] == [1, 2]


def test_existing_run_needs_resume(tiny_cifar, tmp_path):
    fit(tiny_cfg(tiny_cifar, tmp_path, epochs=1), progress=False)
    with pytest.raises(C40Error, match="--resume"):
        fit(tiny_cfg(tiny_cifar, tmp_path, epochs=1), progress=False)


def poison_step(monkeypatch, at: int) -> None:
    """Fault injection: the batch of optimizer step `at` (0-based) becomes NaN."""
    import itertools

    import c40.train

    real, calls = c40.train.train_step, itertools.count()

    def poisoned(model, x, *args, **kwargs):
        return real(model, x * float("nan") if next(calls) == at else x, *args, **kwargs)
    monkeypatch.setattr(c40.train, "train_step", poisoned)


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tiny_cifar, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_cifar, tmp_path, epochs=3, subset=640)  # 10 steps per epoch
    poison_step(monkeypatch, 13)  # epoch 2
    with pytest.raises(TrainingDiverged, match="step 13"):
        fit(cfg, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_huge_lr_diverges_cleanly(tiny_cifar, tmp_path):
    with pytest.raises(TrainingDiverged, match="NaN/Inf"):
        fit(tiny_cfg(tiny_cifar, tmp_path, lr=1e6, epochs=1, warmup=0.0), progress=False)


def test_validation_split_reports_val_metrics(tiny_cifar, tmp_path):
    res = fit(tiny_cfg(tiny_cifar, tmp_path, epochs=1, val_split=100), progress=False)
    assert {"val_acc", "val_loss", "test_acc"} <= set(res.history[-1])


@pytest.mark.parametrize("recipe,extra", [("fast", {}), ("best", {}), ("dilated", {}),
                                          ("reference", {}), ("fast", {"amp": "bf16"})],
                         ids=["fast", "best", "dilated", "reference", "fast-bf16"])
def test_every_recipe_trains_on_a_tiny_subset(recipe, extra, tiny_cifar, tmp_path, capsys):
    """Each recipe's own settings (low-res epochs, EMA, the albumentations loader of the
    reference, the dilated arch) run end to end: 2 short epochs, the first at low res where the
    recipe has it (low_res_frac 0.5 of 2 epochs). `c40 eval --json` then prints exactly the
    accuracy training printed: same weights, TTA and autocast dtype, on any host."""
    from c40.cli import main

    cfg = TrainConfig.from_recipe(recipe, data=str(tiny_cifar), out=str(tmp_path), epochs=2,
                                  subset=256, batch_size=64, workers=1, **extra)
    if cfg.low_res < 32:
        cfg.low_res_frac = 0.5
    res = fit(cfg, progress=False)
    assert [m["epoch"] for m in res.history] == [1, 2]
    assert 0.0 <= res.accuracy <= 1.0 and res.params < 200_000
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["config"]["recipe"] == recipe and state["config"]["arch"] == cfg.arch
    assert (state["ema"] is not None) == cfg.ema
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--data", str(tiny_cifar),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["accuracy"], printed["loss"]) == (res.accuracy, res.history[-1]["test_loss"])


def test_depthwise_convs_run_in_fp32_under_cpu_bf16_autocast():
    """oneDNN's bf16 depthwise backward is ~30x slower than fp32 on CPU: those convs are kept in
    fp32 while every other conv still runs in bf16; nothing changes without bf16 or on CUDA."""
    from torch import nn

    from c40.model import create_model
    from c40.precision import keep_depthwise_fp32

    model = create_model("strided", width=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert depthwise
    assert keep_depthwise_fp32(model, None, torch.device("cpu")) == 0
    assert keep_depthwise_fp32(model, torch.bfloat16, torch.device("cuda")) == 0
    assert keep_depthwise_fp32(model, torch.bfloat16, torch.device("cpu")) == len(depthwise)
    dtypes = {}
    for m in convs:
        m.register_forward_hook(lambda mod, inp, out: dtypes.__setitem__(mod, out.dtype))
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert all(dtypes[m] == torch.float32 for m in depthwise)
    assert all(dtypes[m] == torch.bfloat16 for m in convs if m.groups == 1)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # a deep copy (the EMA model is one) computes with its own weights, not the original's
    import copy

    twin = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not torch.allclose(twin(x).float(), model(x).float())
        dw = next(m for m in twin.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
        z = torch.randn(2, dw.in_channels, 8, 8)
        assert torch.allclose(dw(z), torch.nn.functional.conv2d(
            z, dw.weight, None, dw.stride, dw.padding, dw.dilation, dw.groups))


def test_a_whitening_layer_is_fit_from_the_runs_training_images_and_stays_fixed(tiny_cifar, tmp_path):
    """strided_whiten: the run fits its first layer to its own (normalised) training images
    before the first step, and training leaves it as fit; the checkpoint carries it."""
    from c40.augment import normalize
    from c40.data import channel_stats, load_dataset
    from c40.model import create_model, fit_whitening

    cfg = tiny_cfg(tiny_cifar, tmp_path, arch="strided_whiten", subset=256, epochs=2)
    fit(cfg, progress=False)
    images = load_dataset(tiny_cifar, "train").subset(256).images
    mean, std = channel_stats(images)
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), torch.tensor(mean), torch.tensor(std))
    fresh = create_model("strided_whiten", width=0.5)
    fit_whitening(fresh, x)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["model"]["c1.conv.weight"]
    assert saved.abs().sum() > 0 and torch.equal(saved, fresh.c1.conv.weight)
