import pytest
import torch
from torch import nn

from c40.model import create_model, list_models
from c40.receptive import receptive_field, trace_layers


def _chain(*layers):
    return nn.Sequential(*layers)


@pytest.mark.parametrize("net, rf, jump", [
    (_chain(nn.Conv2d(3, 4, 3, padding=1)), 3, 1),
    (_chain(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)), 5, 1),
    # 3x3 s2 then 3x3: 3 + 2*2 = 7, jump 2
    (_chain(nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, padding=1)), 7, 2),
    # dilation 2 gives an effective 5x5 kernel
    (_chain(nn.Conv2d(3, 4, 3, padding=2, dilation=2)), 5, 1),
    # 5x5 s1, 3x3 s2, 3x3 d3: 5, 5+2=7 (jump 2), 7+2*3*2=19
    (_chain(nn.Conv2d(3, 4, 5, padding=2), nn.Conv2d(4, 4, 3, 2, 1),
            nn.Conv2d(4, 4, 3, padding=3, dilation=3)), 19, 2),
    (_chain(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1)), 8, 2),
])
def test_hand_computed_small_nets(net, rf, jump):
    layers = trace_layers(net, size=32)
    assert layers[-1].rf == rf and layers[-1].jump == jump
    assert receptive_field(net) == rf


def test_centre_of_first_unit():
    # unpadded 3x3: the first output looks at pixels 0..2, centre 1.5 in pixel-edge coordinates
    assert trace_layers(_chain(nn.Conv2d(3, 4, 3)))[0].start == 1.5
    assert trace_layers(_chain(nn.Conv2d(3, 4, 3, padding=1)))[0].start == 0.5


def _positive_copy(model: nn.Module) -> nn.Module:
    """Positive conv weights and identity BatchNorm keep every path open, so the gradient of
    one output unit is non-zero exactly on its receptive field."""
    model = model.eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_(), m.running_var.fill_(1.0), m.weight.fill_(1.0), m.bias.fill_(0.1)
    return model


def empirical_rf(model: nn.Module, size: int = 160) -> int:
    model = _positive_copy(model)
    x = torch.zeros(1, 3, size, size, requires_grad=True)
    f = model.forward_features(x)                     # (1, C, h, w) before GAP
    f[0, :, f.shape[2] // 2, f.shape[3] // 2].sum().backward()
    nz = x.grad[0].abs().sum(0).nonzero()
    return int(max(nz[:, 0].max() - nz[:, 0].min(), nz[:, 1].max() - nz[:, 1].min()) + 1)


@pytest.mark.parametrize("arch", list_models())
def test_calculator_matches_backprop_measurement(arch):
    model = create_model(arch)
    assert empirical_rf(model) == receptive_field(model)
