"""The optimizer: SGD by default, Muon for the full conv filters with --muon-lr, BatchNorm
biases at --bn-bias-lr x the rate."""
import pytest
import torch
from torch import nn

from c40.config import TrainConfig
from c40.model import create_model
from c40.optim import MuonSGD, create_optimizer, create_scheduler, muon_params


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_default_is_plain_sgd_and_muon_takes_only_full_conv_filters():
    model = create_model("strided")
    sgd = TrainConfig(muon_lr=0.0, bn_bias_lr=1.0)  # every recipe but fast
    assert type(create_optimizer(model, sgd)) is torch.optim.SGD
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    taken = {id(p) for p in muon_params(model)}
    for m in convs:  # depthwise filters and the 3-channel stem stay with SGD
        assert (id(m.weight) in taken) == (m.groups == 1 and m.in_channels > 3)
    assert len(taken) == 6  # 3x3 at 16/8 px, the stride-2 ones, and the 1x1 pointwise convs
    opt = create_optimizer(model, TrainConfig(muon_lr=0.05, bn_bias_lr=1.0))
    assert isinstance(opt, MuonSGD)
    assert [len(g["params"]) for g in opt.param_groups][2] == len(taken)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_non_muon_groups_step_exactly_as_torch_sgd():
    a, b = create_model("strided"), create_model("strided")
    b.load_state_dict(a.state_dict())
    cfg = TrainConfig(muon_lr=0.05, bn_bias_lr=1.0, weight_decay=5e-4)
    sgd = TrainConfig(muon_lr=0.0, bn_bias_lr=1.0, weight_decay=5e-4)
    mine, ref = create_optimizer(a, cfg), create_optimizer(b, sgd)
    for step in range(3):
        _grads(a, step), _grads(b, step)
        mine.step(), ref.step()
    muon = {id(p) for p in muon_params(a)}
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if id(p) not in muon:
            assert torch.allclose(p, q, atol=1e-6, rtol=0), name
    assert any(not torch.allclose(p, q) for p, q in zip(muon_params(a), muon_params(b)))


def test_muon_step_is_an_orthogonalized_update():
    conv = nn.Conv2d(16, 32, 3, bias=False)
    before = conv.weight.detach().clone()
    # a badly conditioned gradient: singular values 0.01 .. 1
    u, _, v = torch.linalg.svd(torch.randn(32, 144), full_matrices=False)
    conv.weight.grad = (u @ torch.diag(torch.logspace(-2, 0, 32)) @ v).view(32, 16, 3, 3)
    opt = MuonSGD([{"params": [conv.weight], "lr": 0.1, "momentum": 0.95, "muon": True,
                    "weight_decay": 0.0}], lr=0.1, momentum=0.9)
    opt.step()
    step = ((before - conv.weight.detach()) / 0.1).reshape(32, -1)
    s = torch.linalg.svdvals(step)
    assert s.max() < 1.3 and s.min() > 0.5  # every direction moves at about the same rate


def test_one_cycle_peaks_at_each_groups_own_rate():
    model = create_model("strided")
    cfg = TrainConfig(lr=0.2, muon_lr=0.05, bn_bias_lr=8, warmup=0.5)
    opt = create_optimizer(model, cfg)
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in opt.param_groups[2]["params"]} == bn_biases
    sched = create_scheduler(opt, cfg, total_steps=10)
    peaks = [0.0] * len(opt.param_groups)
    for _ in range(10):
        peaks = [max(p, g["lr"]) for p, g in zip(peaks, opt.param_groups)]
        opt.step(), sched.step()
    assert peaks == pytest.approx([0.2, 0.2, 1.6, 0.05])
