"""The CUDA path, proven on the CPU: no host sync in a training step, resume across devices and
AMP modes, the run's own GPU RNG only, deterministic mode's cuBLAS setting, the AMP policy.
(benchmarks/gpu_check.py runs the same things on a real GPU.)"""
import contextlib
import os

import numpy as np
import pytest
import torch
from torch import nn

from c40.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from c40.config import TrainConfig
from c40.ema import EMA
from c40.loaders import LoaderSpec, TensorLoader
from c40.model import create_model
from c40.precision import configure_backends, resolve_amp
from c40.run import setup_run
from c40.train import EpochStats, fit, train_batch

# Tensor methods and torch functions that make the host wait for the device (on CUDA): reading
# a value, or an op whose output size depends on the data.
TENSOR_SYNCS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__",
                "nonzero", "bincount", "unique", "masked_select", "argwhere")
TORCH_SYNCS = ("nonzero", "bincount", "unique", "masked_select", "argwhere")


@contextlib.contextmanager
def no_host_sync():
    """Every host-sync API raises inside the block. (`.numpy()` is not listed: on a CUDA tensor
    it raises by itself, so it cannot hide a sync; the loader's plan uses it on host draws.)"""
    saved = [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in TENSOR_SYNCS]
    saved += [(torch, n, getattr(torch, n)) for n in TORCH_SYNCS]

    def refuse(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host sync inside a training step: {name}")
        return f
    for owner, name, _ in saved:
        setattr(owner, name, refuse(name))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def tiny_cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), width=0.5, epochs=2, batch_size=64, lr=0.2,
                test_subset=200, tta=False, seed=3)
    return TrainConfig.from_recipe("fast", **{**base, **kw})


@pytest.mark.parametrize("amp,ema,loader", [("off", True, "tensor"), ("fp16", True, "tensor"),
                                            ("off", False, "albumentations")])
def test_a_training_step_never_waits_for_the_device(tiny_cifar, tmp_path, amp, ema, loader):
    """Loader batch + resize + step (+ fp16 scaler) + schedule + EMA + running sums, 4 times."""
    # fp16 is for pre-Ampere GPUs, whose fast recipe is plain SGD (fused: GradScaler hands it
    # the inf flag); Muon under fp16 lets GradScaler read the flag back once per step (c40.optim)
    sgd = dict(muon_lr=0.0, bn_bias_lr=1.0) if amp == "fp16" else {}
    cfg = tiny_cfg(tiny_cifar, tmp_path, amp=amp, ema=ema, loader=loader, workers=1, **sgd)
    run = setup_run(cfg, torch.device("cpu"), 0, 1)
    stats = EpochStats.zeros(run.device)
    try:
        batches = iter(run.train_loader)
        with no_host_sync():
            for _ in range(4):
                x, y = next(batches)
                train_batch(run, x, y, stats, res=24)
    finally:
        run.train_loader.close()
    assert run.step == 4 and stats.seen == 4 * 64
    assert torch.isfinite(stats.loss_sum) and int(stats.first_bad) == -1
    assert run.scaler.is_enabled() == (amp == "fp16")


def test_the_guard_catches_a_sync():
    with pytest.raises(AssertionError, match="item"), no_host_sync():
        torch.ones(2).sum().item()


def _stop_after_first_epoch(metrics, ckpt):
    if metrics["epoch"] == 1:
        raise KeyboardInterrupt


@pytest.mark.parametrize("first,then", [("off", "fp16"), ("fp16", "off")])
def test_resume_across_amp_modes(tiny_cifar, tmp_path, first, then):
    """A run without fp16 saves an empty GradScaler state; an fp16 resume starts a fresh scale
    (and an fp16 checkpoint resumes without one)."""
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_cfg(tiny_cifar, tmp_path, subset=256, amp=first), report=_stop_after_first_epoch,
            progress=False)
    res = fit(tiny_cfg(tiny_cifar, tmp_path, subset=256, amp=then, resume=True), progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert [m["epoch"] for m in res.history] == [1, 2] and state["amp"] == then
    assert bool(state["scaler"]) == (then == "fp16")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_rng_resume_restores_only_the_runs_own_gpu(tmp_path, monkeypatch):
    """Saved on cuda:0 of a 2-GPU machine, resumed where only one GPU is visible. A fake
    torch.cuda RNG API with the real one's contract: CPU ByteTensors, existing devices only."""
    count, restored = [2], {}

    def get_state(device="cuda"):
        return torch.full((8,), 10 + (torch.device(device).index or 0), dtype=torch.uint8)

    def set_state(state, device="cuda"):
        if not isinstance(state, torch.ByteTensor):
            raise TypeError("RNG state must be a torch.ByteTensor")
        index = torch.device(device).index or 0
        if index >= count[0]:
            raise RuntimeError("CUDA error: invalid device ordinal")
        restored[index] = state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count[0])
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [get_state(i) for i in range(count[0])])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda states: [set_state(s, i) for i, s in enumerate(states)])
    cpu_before = torch.get_rng_state()
    save_checkpoint({"model": {}, "config": {}, "rng": capture_rng(torch.device("cuda", 0))},
                    tmp_path / "c.pt")
    count[0] = 1
    torch.manual_seed(123)
    restore_rng(load_checkpoint(tmp_path / "c.pt")["rng"], torch.device("cuda", 0))
    assert torch.equal(restored[0], get_state(0)) and list(restored) == [0]
    assert torch.equal(torch.get_rng_state(), cpu_before)


def test_deterministic_sets_the_cublas_workspace_before_cuda(tiny_cifar, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        fit(tiny_cfg(tiny_cifar, tmp_path, epochs=1, subset=128, deterministic=True), progress=False)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_cuda_backend_settings():
    try:
        configure_backends(torch.device("cuda"), deterministic=False)
        assert torch.backends.cudnn.benchmark
        configure_backends(torch.device("cuda"), deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
        configure_backends(torch.device("cpu"), deterministic=False)
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_on_cuda_prefers_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    assert resolve_amp("auto", torch.device("cuda")) == expected
    assert resolve_amp("fp16", torch.device("cuda")) == torch.float16
    assert resolve_amp("off", torch.device("cuda")) is None


def test_ema_matches_torch_averaged_model():
    """Decay 0.5: the warm-up's (1 + n) / (10 + n) for the first 8 updates, then 0.5."""
    def warmed_up_ema(avg, live, n):
        torch.optim.swa_utils.get_ema_multi_avg_fn(min(0.5, (1 + int(n)) / (10 + int(n))))(avg, live, n)

    torch.manual_seed(0)
    model = create_model("strided", width=0.5).train()
    ref = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=warmed_up_ema, use_buffers=True)
    ema = EMA(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(12):
        model(torch.randn(8, 3, 32, 32)).square().mean().backward()
        opt.step()
        ref.update_parameters(model)
        ema.update(model)
    mine, theirs = ema.state_dict(), ref.module.state_dict()
    assert mine.keys() == theirs.keys() and ema.n_averaged == int(ref.n_averaged) == 12
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def test_ema_forgets_the_start_of_a_short_run():
    """1,000 updates at decay 0.999 (2.6 epochs of batch 128): the weights of the first update
    must be gone from the average (without the warm-up they still weigh 0.999^999 = 37%)."""
    model = nn.Linear(4, 4)
    ema = EMA(model, 0.999)
    with torch.no_grad():
        model.weight.zero_()
        ema.update(model)
        model.weight.fill_(1.0)
        for _ in range(999):
            ema.update(model)
    assert ema.module.weight.min() > 0.999
    assert ema.decay_at(20_000) == 0.999  # long runs average with the configured decay


def test_tensor_loader_keeps_the_dataset_as_uint8():
    images = np.random.default_rng(0).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    loader = TensorLoader(images, np.zeros(100, np.int64), LoaderSpec(50, (0.5,) * 3, (0.25,) * 3))
    assert loader.images.dtype == torch.uint8 and loader.images.nbytes == images.nbytes
    x, _ = next(iter(loader))
    want = (torch.from_numpy(images[:50]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert x.dtype == torch.float32 and torch.allclose(x, want, atol=1e-5)
