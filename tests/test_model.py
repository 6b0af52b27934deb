import pytest
import torch
from torch import nn

from c40.model import count_params, create_model, list_models, min_input_size
from c40.receptive import summarize

ARCHS = list_models()
# the two ways to reach a 4x4..6x6 map: three 3x3 stride-2 convs, or no stride and no pooling
STRIDED, NO_STRIDE = {"strided", "resnet", "strided_whiten", "resnet_whiten"}, {"dilated", "atrous"}


def test_every_registered_arch_is_of_a_known_kind():
    assert set(ARCHS) == STRIDED | NO_STRIDE


@pytest.mark.parametrize("arch", ARCHS)
def test_assignment_rules(arch):
    model = create_model(arch, dropout=0.1)
    s = summarize(model, arch)
    assert s["params"] < 200_000
    assert s["params"] == sum(p.numel() for p in model.parameters())  # nothing frozen hides params
    assert s["receptive_field"] > 44
    assert not s["max_pool"] and not any(isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))
                                         for m in model.modules())
    assert s["depthwise_separable"] >= 1 and s["dilated_convs"] >= 1
    assert s["gap"] and s["batchnorm"]
    if arch in STRIDED:
        assert s["strided_convs"] == 3
        strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride[0] > 1]
        assert all(m.kernel_size == (3, 3) and m.stride == (2, 2) for m in strided)
    else:
        assert s["strided_convs"] == 0
        assert all(m.stride == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
        assert not any(isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_any_input_size(arch):
    model = create_model(arch).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)  # GAP head: fully convolutional
    assert model.forward_features(torch.randn(1, 3, 32, 32)).dim() == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_min_input_size_is_where_the_forward_starts_to_work(arch):
    model = create_model(arch).eval()
    need = min_input_size(model)
    assert need <= 32 and model.training is False  # the probe is a copy: the model is untouched
    if arch in NO_STRIDE:  # unpadded convs: one pixel less and nothing is left of the map
        assert need > 24
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, need - 1, need - 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_is_configurable(arch):
    drops = [m.p for m in create_model(arch, dropout=0.25).modules() if isinstance(m, nn.Dropout)]
    assert drops and all(p == 0.25 for p in drops)


def test_width_scales_params_and_unknown_arch_fails():
    assert count_params(create_model("strided", width=0.5)) < count_params(create_model("strided"))
    with pytest.raises(ValueError, match="unknown arch 'resnet50'"):
        create_model("resnet50")


def test_model_is_pure():
    model = create_model("strided")
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_whitening_layer_whitens_real_patches_and_is_never_trained(cifar_dir):
    """The fixed 2x2 first layer of the *_whiten archs: fit on real images, its +v half gives
    unit-variance, uncorrelated channels (the -v half mirrors it); its filters count toward the
    limit but no optimizer group holds them."""
    from c40.augment import normalize
    from c40.config import TrainConfig
    from c40.data import channel_stats, load_dataset
    from c40.model import Whitening, fit_whitening
    from c40.optim import create_optimizer

    images = load_dataset(cifar_dir, "train").subset(400).images
    mean, std = channel_stats(images)
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), torch.tensor(mean), torch.tensor(std))
    model = create_model("strided_whiten")
    layer = model.c1
    assert isinstance(layer, Whitening) and fit_whitening(model, x) == 1
    w = layer.conv.weight
    y = nn.functional.conv2d(x, w[:8]).permute(1, 0, 2, 3).reshape(8, -1)
    cov = y @ y.T / y.shape[1]
    assert torch.allclose(cov, torch.eye(8), atol=0.05)
    assert torch.equal(w[8:], -w[:8])
    assert count_params(model) == sum(p.numel() for p in model.parameters() if p.requires_grad) + w.numel()
    opt = create_optimizer(model, TrainConfig())
    assert not any(p is w for g in opt.param_groups for p in g["params"])
    wide = create_model("strided_whiten", width=2.0)  # 32 channels: the 12 directions repeat
    fit_whitening(wide, x[:50])
    assert torch.equal(wide.c1.conv.weight[12], wide.c1.conv.weight[0])
    assert wide(x[:2]).shape == (2, 10)
    with pytest.raises(ValueError, match="even channel count"):
        Whitening(15)
