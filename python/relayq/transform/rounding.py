"""AdaRound over an annotated graph: sample each layer's inputs during calibration, learn the codes.

The numerics live in :mod:`relayq.calibration.adaround`; this module maps the graph's conv2d / dense
layers onto it, layer by layer in topological order, and stores the learned integer codes in the
weight :class:`~relayq.transform.calibrate.QPoint` (``codes``), which realize, the simulated module and
the reference all read through ``QPoint.weight_codes``: the three stay bit-exact.

Example::

    qmodel = relayq.quantize_model(mod, params, data, config=relayq.QConfig(weight_bits=4, adaround=True))
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import qmath
from ..calibration import adaround
from ..utils.progress import Progress
from .common import bindings, main_function, op_name, simq_info


def layers(annotated) -> list:
    """``[(weight point, call, input act point or None)]`` of the conv2d / dense layers, in graph order."""
    func = main_function(annotated)
    marker = {}
    for b in bindings(func):
        info = simq_info(b.value)
        if info is not None:
            marker[b.var] = info
    out = []
    for b in bindings(func):
        call = b.value
        if op_name(call) in ("relax.nn.conv2d", "relax.matmul") and call.args[1] in marker \
                and marker[call.args[1]][2] == "weight":
            src = marker.get(call.args[0])
            out.append((marker[call.args[1]][1], call, src[1] if src is not None and src[2] == "act" else None))
    return out


def samplers(annotated, weights: dict, samples: int, batches: int | None) -> dict:
    """A :class:`~relayq.calibration.adaround.PatchSampler` per conv2d / dense weight point."""
    out = {}
    for i, (name, call, _) in enumerate(layers(annotated)):
        if name not in weights or name in out:
            continue
        if op_name(call) == "relax.nn.conv2d":
            a = call.attrs
            w = weights[name]
            out[name] = adaround.PatchSampler(
                "conv2d", samples, batches, kernel=tuple(w.shape[2:]), strides=tuple(int(s) for s in a.strides),
                padding=tuple(int(p) for p in a.padding), dilation=tuple(int(d) for d in a.dilation),
                groups=int(a.groups), seed=i)
        else:
            out[name] = adaround.PatchSampler("dense", samples, batches, seed=i)
    return out


def _layout(w: np.ndarray, point, is_conv: bool, groups: int):
    """``(w3, s3, back)``: the weight as (groups, out / groups, K), its scale broadcastable to it, and the
    function that turns codes in that layout back into the weight's shape."""
    scale = np.asarray(point.scale, np.float64)
    if is_conv:
        o = w.shape[0]
        w3 = w.reshape(groups, o // groups, -1)
        s3 = scale.reshape(groups, o // groups, 1) if scale.ndim else scale
        return w3, s3, lambda c: c.reshape(w.shape)
    w3 = w.T[None]                                    # dense weight (K, N): outputs along axis 1
    s3 = scale.reshape(1, -1, 1) if scale.ndim else scale
    return w3, s3, lambda c: np.ascontiguousarray(c[0].T)


def _quantize_input(x, point):
    """The samples as the quantized layer sees them: fake-quantized with the input's act point."""
    if point is None:
        return x
    q = qmath.quantize(x, np.float32(point.scale), point.bits, point.signed, point.zero_point)
    return qmath.dequantize(q, point.scale, point.zero_point)


def learn_rounding(annotated, weights: dict, points: dict, samplers_: dict, config) -> dict:
    """Learn every sampled layer's codes; returns the updated weight points (name -> QPoint with codes)."""
    todo = [(n, c, src) for n, c, src in layers(annotated) if n in samplers_ and samplers_[n].parts]
    out = {}
    backend = "torch" if adaround.torch_available() else "numpy"
    with Progress(f"adaround ({backend}, {config.adaround_iterations} iterations), layer", total=len(todo),
                  enabled=config.show_progress) as prog:
        for name, call, src in todo:
            if name in out:
                continue
            p = points[name]
            is_conv = op_name(call) == "relax.nn.conv2d"
            w3, s3, back = _layout(weights[name].astype(np.float64), p, is_conv, int(call.attrs.groups) if is_conv else 1)
            x = samplers_[name].data()
            xq = _quantize_input(x, points.get(src) if src else None)
            codes3, info = adaround.round_layer(w3, s3, p.qmin, p.qmax, x, xq, config.adaround_iterations, backend)
            out[name] = dataclasses.replace(p, codes=back(codes3), method=p.method + "+adaround")
            gain = info["mse_adaround"] / info["mse_nearest"] if info["mse_nearest"] > 0 else 1.0
            prog.step(note=f"{name}: output MSE x{gain:.3f} vs nearest" + (" (kept nearest)"
                                                                           if info["kept"] == "nearest" else ""))
    return out
