"""Receptive field, FLOPs and rule checks, read off the real module graph.

Forward hooks record every conv/pool in execution order with its kernel, stride, dilation and
padding, so the numbers follow the code. Skip connections in `c40.model` are identities, which
leave the chain's receptive field unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from c40.model import DepthwiseSeparable, count_params

_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass
class LayerInfo:
    name: str
    kind: str                 # Conv2d / DepthwiseConv2d / MaxPool2d / ...
    out_shape: tuple          # (C, H, W)
    params: int
    kernel: int
    stride: int
    dilation: int
    padding: int
    rf: int                   # receptive field after this layer, input pixels
    jump: int                 # distance between adjacent outputs, input pixels
    start: float              # centre of the first output's field, input pixel coordinates
    macs: int                 # multiply-accumulates per image


def _pair0(v) -> int:
    return int(v[0] if isinstance(v, tuple) else v)


def trace_layers(model: nn.Module, size: int = 32) -> list[LayerInfo]:
    """Run one (1, 3, size, size) forward pass and describe each conv/pool in execution order."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[nn.Module, tuple]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((m, tuple(o.shape[1:]))))
             for m in model.modules() if isinstance(m, _SPATIAL + (nn.Linear,))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    rf, jump, start, layers = 1, 1, 0.5, []
    for m, shape in calls:
        params = sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
        if isinstance(m, nn.Linear):
            layers.append(LayerInfo(names[m], "Linear", shape, params, 1, 1, 1, 0, rf, jump,
                                    start, m.in_features * m.out_features))
            continue
        k, s, p = _pair0(m.kernel_size), _pair0(m.stride), _pair0(m.padding)
        d = _pair0(getattr(m, "dilation", 1))
        start += ((k - 1) / 2 * d - p) * jump
        rf += (k - 1) * d * jump
        jump *= s
        kind = type(m).__name__
        macs = 0
        if isinstance(m, nn.Conv2d):
            if m.groups > 1 and m.groups == m.in_channels:
                kind = "DepthwiseConv2d"
            macs = shape[0] * shape[1] * shape[2] * (m.in_channels // m.groups) * k * k
        layers.append(LayerInfo(names[m], kind, shape, params, k, s, d, p, rf, jump, start, macs))
    return layers


def receptive_field(model: nn.Module) -> int:
    """Receptive field of one unit of the last feature map (before GAP), in input pixels."""
    return max(layer.rf for layer in trace_layers(model))


def summarize(model: nn.Module, arch: str) -> dict:
    """The rule checks of the assignment plus size and cost, as one JSON-ready dict."""
    layers = trace_layers(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    macs = sum(layer.macs for layer in layers)
    return {
        "arch": arch,
        "params": count_params(model),
        "receptive_field": max(layer.rf for layer in layers),
        "flops_per_image": 2 * macs,  # 1 multiply-accumulate = 2 FLOPs, forward pass only
        "macs_per_image": macs,
        "conv_layers": len(convs),
        "max_pool": any(isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) for m in model.modules()),
        "depthwise_separable": sum(_is_depthwise_separable(m) for m in model.modules()),
        "dilated_convs": sum(_pair0(m.dilation) > 1 for m in convs),
        "strided_convs": sum(_pair0(m.stride) > 1 for m in convs),
        "gap": any(isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
                   for m in model.modules()),
        "batchnorm": any(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
        "layers": [asdict(layer) for layer in layers],
    }


def _is_depthwise_separable(m: nn.Module) -> bool:
    if not isinstance(m, DepthwiseSeparable):
        return False
    dw, pw = m[0], m[1]
    return (dw.groups == dw.in_channels == dw.out_channels and _pair0(dw.kernel_size) == 3
            and _pair0(pw.kernel_size) == 1)


def format_summary(s: dict) -> str:
    """The per-layer table and totals that `c40 summary` prints."""
    rows = [f"{'layer':<24}{'kind':<17}{'output':<16}{'params':>8}{'k/s/d':>9}{'RF':>5}{'jump':>6}"]
    for layer in s["layers"]:
        ksd = f"{layer['kernel']}/{layer['stride']}/{layer['dilation']}"
        rows.append(f"{layer['name']:<24}{layer['kind']:<17}{str(tuple(layer['out_shape'])):<16}"
                    f"{layer['params']:>8}{ksd:>9}{layer['rf']:>5}{layer['jump']:>6}")
    rows.append(f"arch={s['arch']} params={s['params']:,} RF={s['receptive_field']} "
                f"FLOPs/image={s['flops_per_image'] / 1e6:.1f}M convs={s['conv_layers']} "
                f"depthwise-separable={s['depthwise_separable']} dilated={s['dilated_convs']} "
                f"strided={s['strided_convs']} max_pool={s['max_pool']} gap={s['gap']}")
    return "\n".join(rows)
