"""The C1 C2 C3 C4 -> O networks. Pure modules: no device moves, dtype casts or I/O.

Every arch: no MaxPool, >= 1 depthwise-separable conv, >= 1 dilated conv, BatchNorm, GAP,
configurable dropout, < 200k parameters (fixed ones count), receptive field > 44
(see `c40.receptive`).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

PARAM_LIMIT = 200_000  # the assignment's limit: parameters (trained or fixed) must stay below it
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(arch: str, *, dropout: float = 0.0, width: float = 1.0,
                 num_classes: int = 10) -> nn.Module:
    """Build a registered arch; `width` scales every channel count (rounded to 8)."""
    if arch not in _REGISTRY:
        raise ValueError(f"unknown arch '{arch}' (choose from {', '.join(list_models())})")
    return _REGISTRY[arch](dropout=dropout, width=width, num_classes=num_classes)


def count_params(model: nn.Module) -> int:
    """Parameters, trained or fixed (a whitening layer's count): the assignment's < 200,000 limit."""
    return sum(p.numel() for p in model.parameters())


def check_param_limit(arch: str, width: float = 1.0, *, model: nn.Module | None = None) -> int:
    """The parameters (trained or fixed) of `arch` at `width` (of `model` when it is already built); a
    ConfigError at or over the limit. The one place the rule is checked (c40 train and Ray
    Train's driver call it)."""
    from c40.errors import ConfigError

    params = count_params(model if model is not None else create_model(arch, width=width))
    if params >= PARAM_LIMIT:
        raise ConfigError(f"{arch} at width {width} has {params:,} parameters; "
                          f"the limit is < {PARAM_LIMIT:,}")
    return params


def min_input_size(model: nn.Module, limit: int = 64) -> int:
    """The smallest square input (pixels) the model's forward accepts: unpadded convs shrink the
    map, so the no-stride archs need ~27-29 px. Found by trying sizes on a CPU copy at batch 1."""
    probe = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad():
        for size in range(1, limit + 1):
            try:
                probe(torch.zeros(1, 3, size, size))
                return size
            except RuntimeError:  # "Kernel size can't be greater than actual input size"
                continue
    return limit + 1


def check_input_size(arch: str, model: nn.Module, size: int) -> None:
    """A ConfigError if `model` cannot take `size` px inputs (e.g. a low-res epoch at 24 px)."""
    from c40.errors import ConfigError

    need = min_input_size(model)
    if size < need:
        raise ConfigError(f"arch {arch} needs inputs of at least {need} px (its unpadded convs "
                          f"shrink the map), so it cannot train at --low-res {size}: pass "
                          f"--low-res-frac 0 or --low-res {need} or more")


def _ch(c: int, width: float) -> int:
    return max(8, int(round(c * width / 8)) * 8)


class ConvBN(nn.Sequential):
    """k x k conv (no bias) -> BatchNorm -> ReLU. `padding=None` keeps the size ("same")."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1,
                 padding: int | None = None):
        pad = dilation * (k - 1) // 2 if padding is None else padding
        super().__init__(nn.Conv2d(cin, cout, k, stride, pad, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise (groups = channels) -> 1x1 pointwise -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1,
                 padding: int | None = None):
        pad = dilation if padding is None else padding
        super().__init__(nn.Conv2d(cin, cin, 3, stride, pad, dilation, groups=cin, bias=False),
                         nn.Conv2d(cin, cout, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    """x + body(x): the skip is an identity, so the receptive field is the body's."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Whitening(nn.Module):
    """A fixed 2x2 patch-whitening conv (airbench's first layer) -> BatchNorm -> ReLU: the top
    cout/2 eigen-directions of the training images' 2x2x3 patch covariance, each as +v and -v
    (so ReLU keeps both signs), scaled to unit variance; past 3*k*k directions (width > 1.5)
    they repeat. `fit` sets the filters from data; they are never trained, and count toward the
    parameter limit. Unpadded: 32 -> 31 px."""

    def __init__(self, cout: int, k: int = 2):
        super().__init__()
        if cout % 2:
            raise ValueError(f"whitening needs an even channel count (+v and -v), got {cout}")
        self.conv = nn.Conv2d(3, cout, k, bias=False)
        self.conv.weight.requires_grad_(False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, eps: float = 5e-4, chunk: int = 500) -> None:
        """Filters from normalised images x (N, 3, H, W): eigenvectors of the patch covariance."""
        w = self.conv.weight
        k = w.shape[-1]
        cov = torch.zeros(3 * k * k, 3 * k * k, dtype=torch.float64)
        n = 0
        for i in range(0, len(x), chunk):
            p = F.unfold(x[i:i + chunk].double().cpu(), k)        # (B, 3*k*k, L), w's layout
            cov += torch.einsum("bil,bjl->ij", p, p)
            n += p.shape[0] * p.shape[2]
        evals, evecs = torch.linalg.eigh(cov / n)                 # ascending
        order = evals.argsort(descending=True)
        top = order[torch.arange(w.shape[0] // 2) % len(order)]
        v = (evecs[:, top] / (evals[top] + eps).sqrt()).T.reshape(-1, 3, k, k)
        w.copy_(torch.cat([v, -v]).to(w))


def fit_whitening(model: nn.Module, x: torch.Tensor) -> int:
    """Fit every Whitening layer of `model` to normalised images x; returns how many there were."""
    layers = [m for m in model.modules() if isinstance(m, Whitening)]
    for m in layers:
        m.fit(x)
    return len(layers)


class C40Net(nn.Module):
    """Blocks C1..C4, then the head O: GAP -> dropout -> linear."""

    def __init__(self, c1: nn.Module, c2: nn.Module, c3: nn.Module, c4: nn.Module,
                 channels: int, dropout: float, num_classes: int):
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = c1, c2, c3, c4
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.c4(self.c3(self.c2(self.c1(x))))  # (B, C, h, w) before GAP

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.gap(f).flatten(1)))  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def strided(*, dropout: float = 0.0, width: float = 1.0, num_classes: int = 10) -> C40Net:
    """FLOP-lean: one thin conv at 32x32, then three 3x3 stride-2 transitions (16, 8, 4).

    Full 3x3 convs where maps are large enough for them to run near peak on a CPU; the 4x4
    stage is depthwise-separable so the parameter budget goes where the FLOPs are cheap.
    ~32M FLOPs/image, ~186k params.
    """
    a, b, c, d = (_ch(n, width) for n in (16, 48, 96, 128))
    p = dropout
    c1 = ConvBN(3, a)                                                         # 32x32
    c2 = nn.Sequential(ConvBN(a, b, stride=2), Residual(ConvBN(b, b)), nn.Dropout(p))  # 16x16
    c3 = nn.Sequential(ConvBN(b, c, stride=2), Residual(ConvBN(c, c, dilation=2)),      # 8x8
                       nn.Dropout(p))
    c4 = nn.Sequential(DepthwiseSeparable(c, d, stride=2),                    # 4x4
                       Residual(DepthwiseSeparable(d, d)), nn.Dropout(p))
    return C40Net(c1, c2, c3, c4, d, dropout, num_classes)


@register_model
def dilated(*, dropout: float = 0.0, width: float = 1.0, num_classes: int = 10) -> C40Net:
    """No stride and no pooling before GAP: unpadded dilated convs shrink the map 32 -> 28 -> 20
    -> 6 while growing the receptive field; padded depthwise-separable convs (dilated where the
    map is small: a dilated depthwise conv measured ~5x slower than a plain one on CPU) add
    context at each size. ~37M FLOPs/image, RF 45.
    """
    a, b, c, d = (_ch(n, width) for n in (16, 32, 64, 128))
    p = dropout
    c1 = ConvBN(3, a)                                                                # 32x32
    c2 = nn.Sequential(ConvBN(a, b, dilation=2, padding=0),                          # 28x28
                       Residual(DepthwiseSeparable(b, b)), nn.Dropout(p))
    c3 = nn.Sequential(ConvBN(b, c, dilation=4, padding=0),                          # 20x20
                       Residual(DepthwiseSeparable(c, c, dilation=4)), nn.Dropout(p))
    c4 = nn.Sequential(ConvBN(c, d, dilation=7, padding=0),                          # 6x6
                       Residual(DepthwiseSeparable(d, d, dilation=2)),
                       Residual(DepthwiseSeparable(d, d)), nn.Dropout(p))
    return C40Net(c1, c2, c3, c4, d, dropout, num_classes)


@register_model
def resnet(*, dropout: float = 0.0, width: float = 1.0, num_classes: int = 10) -> C40Net:
    """Capacity per CPU second: ResNet-20-like residual pairs of full 3x3 convs where the maps are
    32x32, 16x16 and 8x8 (full 3x3 convs run near the CPU's peak; depthwise and 1x1 convs do not),
    widths 16/32/64, the first 8x8 conv dilated (d=2); the 4x4 stage is depthwise-separable, where
    a full conv's parameters would cost most. ~54M FLOPs/image, ~172k params, RF 81.
    """
    a, b, c, d = (_ch(n, width) for n in (16, 32, 64, 128))
    p = dropout
    pair = lambda ch, dil=1: Residual(ConvBN(ch, ch, dilation=dil), ConvBN(ch, ch))  # noqa: E731
    c1 = nn.Sequential(ConvBN(3, a), pair(a), pair(a))                                 # 32x32
    c2 = nn.Sequential(ConvBN(a, b, stride=2), pair(b), pair(b), nn.Dropout(p))        # 16x16
    c3 = nn.Sequential(ConvBN(b, c, stride=2), pair(c, dil=2), nn.Dropout(p))          # 8x8
    c4 = nn.Sequential(DepthwiseSeparable(c, d, stride=2),                             # 4x4
                       Residual(DepthwiseSeparable(d, d)), nn.Dropout(p))
    return C40Net(c1, c2, c3, c4, d, dropout, num_classes)


@register_model
def strided_whiten(*, dropout: float = 0.0, width: float = 1.0, num_classes: int = 10) -> C40Net:
    """strided with its 3x3 stem conv replaced by a fixed 2x2 whitening layer of the same width."""
    net = strided(dropout=dropout, width=width, num_classes=num_classes)
    net.c1 = Whitening(_ch(16, width))
    return net


@register_model
def resnet_whiten(*, dropout: float = 0.0, width: float = 1.0, num_classes: int = 10) -> C40Net:
    """resnet with its 3x3 stem conv replaced by a fixed 2x2 whitening layer of the same width."""
    net = resnet(dropout=dropout, width=width, num_classes=num_classes)
    net.c1[0] = Whitening(_ch(16, width))
    return net


@register_model
def atrous(*, dropout: float = 0.0, width: float = 1.0, num_classes: int = 10) -> C40Net:
    """resnet computed densely, the no-stride way (dilated-residual-network style): where resnet
    strides by 2, 4 and 8, this net's convs are dilated by 2, 4 and 8 instead, so every stage
    sees the same spacing of its input that resnet's does and the kernels leave no holes. Each
    transition is unpadded (32 -> 24 -> 16 -> 8) to keep the cost ~2x resnet's; the pairs are
    padded. No stride, no pooling before GAP; needs >= 25 px inputs.
    """
    a, b, c, d = (_ch(n, width) for n in (16, 32, 64, 128))
    p = dropout
    pair = lambda ch, d1, d2: Residual(ConvBN(ch, ch, dilation=d1), ConvBN(ch, ch, dilation=d2))  # noqa: E731
    c1 = nn.Sequential(ConvBN(3, a), pair(a, 1, 1), pair(a, 1, 1))                     # 32x32
    c2 = nn.Sequential(ConvBN(a, b, dilation=4, padding=0), pair(b, 2, 2), pair(b, 2, 2),
                       nn.Dropout(p))                                                   # 24x24
    c3 = nn.Sequential(ConvBN(b, c, dilation=4, padding=0), pair(c, 8, 4), nn.Dropout(p))  # 16x16
    c4 = nn.Sequential(DepthwiseSeparable(c, d, dilation=4, padding=0),                # 8x8
                       Residual(DepthwiseSeparable(d, d, dilation=8)), nn.Dropout(p))
    return C40Net(c1, c2, c3, c4, d, dropout, num_classes)
