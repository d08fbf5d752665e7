"""AdaRound over an annotated graph: sample each layer's inputs during calibration, learn the codes.

The numerics live in :mod:`relayq.calibration.adaround`; this module maps the graph's conv2d / dense
layers onto it, layer by layer in topological order, and stores the learned integer codes in the
weight :class:`~relayq.transform.calibrate.QPoint` (``codes``), which realize, the simulated module and
the reference all read through ``QPoint.weight_codes``: the three stay bit-exact.

Two ways to get the inputs the rounding is learned on (``QConfig.adaround_inputs``):

* ``"quantized"`` (:func:`learn_rounding_sequential`, the white paper's asymmetric reconstruction):
  the target is the float layer's output on the float model's input, ``act(W x + b)``; the rounding
  is learned on the input that the *quantized* model (every earlier layer with its learned codes and
  bias correction, every activation quantized) gives the layer, ``act(W~ x~ + b)``, at the same
  sampled output positions. The rounding then also makes up for the error of the layers before it.
  Running the partly quantized model needs its torch twin, which the caller hands in (``twin``: a
  function ``(annotated, qpoints) -> torch module``; transform does not import the training package).
  After each layer its bias is corrected by the measured mean output shift ``E[W~ x~ - W x]`` on the
  sampled positions, so that the next layer is learned on corrected inputs. Without AdaRound
  (``empirical_bias_correction``) the same walk corrects each layer by ``E[(W~ - W) x~]`` from the
  exact channel means of the quantized model's input.
* ``"float"`` (:func:`learn_rounding`): every layer on the float model's inputs, fake-quantized by
  the layer's input quantizer; all layers are sampled in one pass over the data, no torch twin.

Example::

    qmodel = relayq.quantize_model(mod, params, data, config=relayq.QConfig(weight_bits=4, adaround=True))
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import tvm
from tvm import relax

from .. import qmath
from ..calibration import adaround
from ..utils.log import get_logger
from ..utils.progress import Progress
from .calibrate import expected_output
from .common import bindings, main_function, op_name, simq_info

_log = get_logger("adaround")


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


def _clip_bounds(call):
    """``(lo, hi)`` of a ReLU / clip binding, else None."""
    name = op_name(call)
    if name == "relax.nn.relu":
        return 0.0, float("inf")
    if name == "relax.clip":
        vals = [a.value.value if hasattr(a.value, "value") else a.value for a in call.args[1:3]]
        return float(vals[0]), float(vals[1])
    return None


def layer_tails(annotated) -> dict:
    """Weight point -> ``(bias, (lo, hi))`` for the layers whose output goes through a constant bias
    add and then a ReLU / clip (their only reader each): the activation AdaRound puts in its loss."""
    from .common import const_value, is_const_expr, vars_of

    func = main_function(annotated)
    readers = {}
    for b in bindings(func):
        for v in vars_of(b.value):
            readers.setdefault(v, []).append(b)
    out = {}
    for name, call, _ in layers(annotated):
        conv_var = next(b.var for b in bindings(func) if b.value.same_as(call))
        r = readers.get(conv_var, [])
        if len(r) != 1 or op_name(r[0].value) != "relax.add" or not is_const_expr(r[0].value.args[1]):
            continue
        r2 = readers.get(r[0].var, [])
        if len(r2) != 1 or _clip_bounds(r2[0].value) is None:
            continue
        out[name] = (np.asarray(const_value(r[0].value.args[1]), np.float64).reshape(-1),
                     _clip_bounds(r2[0].value))
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
    """Learn every sampled layer's codes on the float model's inputs (``adaround_inputs="float"``);
    returns the updated weight points (name -> QPoint with codes)."""
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
            codes3, info = adaround.round_layer(w3, s3, p.qmin, p.qmax, x, xq, config.adaround_iterations, backend,
                                                batch=config.adaround_batch)
            out[name] = dataclasses.replace(p, codes=back(codes3), method=p.method + "+adaround")
            gain = info["mse_adaround"] / info["mse_nearest"] if info["mse_nearest"] > 0 else 1.0
            prog.step(note=f"{name}: output MSE x{gain:.3f} vs nearest" + (" (kept nearest)"
                                                                           if info["kept"] == "nearest" else ""))
    return out


class SegmentRunner:
    """Runs the partly quantized model forward one layer at a time, keeping every image's live values.

    Segment ``k`` holds the bindings from layer ``k-1``'s input marker (its codes have just changed)
    up to layer ``k``'s conv / dense; its inputs are the values it reads that were computed before (the function's
    inputs, or outputs of earlier segments: kept per image) and its outputs the values that later
    bindings read. So each binding runs once per image over the whole of AdaRound, instead of once per
    layer after it. Weight markers (constants) are copied into the segment that reads them, so the twin
    quantizes each weight with its current codes.
    """

    def __init__(self, annotated, twin, batches: list):
        from .common import vars_of

        self.func = main_function(annotated)
        self.annotated, self.twin = annotated, twin
        self.binds = bindings(self.func)
        self.index = {b.var: i for i, b in enumerate(self.binds)}
        self.weight_marker = {b.var for b in self.binds
                              if simq_info(b.value) is not None and simq_info(b.value)[2] == "weight"}
        self.reads = [vars_of(b.value) for b in self.binds]
        self.last_read = {}
        for i, vs in enumerate(self.reads):
            for v in vs:
                self.last_read[v] = i
        for v in vars_of(self.func.body.body):
            self.last_read[v] = len(self.binds)
        self.cache = [dict(zip(self.func.params, arrays)) for arrays in batches]
        self.done = 0                                     # bindings [0, done) have been run

    def inputs_of(self, call, points: dict) -> list:
        """Run up to (not including) ``call``'s binding with ``points``; the layer's data input per batch."""
        import torch

        stop = next(i for i, b in enumerate(self.binds) if b.value.same_as(call))
        start = self.done
        # The next segment starts at this layer's input marker (or the layer itself): the layer's codes
        # change once learned, and the twin quantizes a layer's bias only when it sees the marker that
        # quantizes its input, as the full twin does.
        src = self.index.get(call.args[0])
        info = simq_info(self.binds[src].value) if src is not None else None
        next_start = src if info is not None and info[2] == "act" and src >= start else stop
        seg = [b for b in self.binds[start:stop] if b.var not in self.weight_marker]
        defined = {b.var for b in seg}
        needed_markers, params = [], []
        for b in seg:
            for v in self.reads[self.index[b.var]]:
                if v in defined or v in params:
                    continue
                if v in self.weight_marker:
                    if all(v is not m.var for m in needed_markers):
                        needed_markers.append(self.binds[self.index[v]])
                else:
                    params.append(v)
        target = call.args[0]
        if target not in defined and target not in params:
            params.append(target)
        outs = [v for v in defined if self.last_read.get(v, -1) >= next_start]
        if target not in outs:
            outs.append(target)
        outs = sorted(outs, key=lambda v: self.index.get(v, -1))
        body_binds = sorted(needed_markers, key=lambda b: self.index[b.var]) + seg
        body = relax.SeqExpr([relax.BindingBlock(body_binds)], relax.Tuple(outs))
        ret = relax.TupleType([v.ty for v in outs])
        f = relax.Function(params, body, ret, self.func.is_pure, self.func.attrs)
        graph = self.twin(tvm.IRModule({"main": f}), points)
        graph.eval()
        result = []
        with torch.no_grad():
            for env in self.cache:
                ys = graph(*[torch.as_tensor(env[v]) for v in params])
                for v, y in zip(outs, ys):
                    env[v] = y
                result.append(env[target].numpy())
                for v in [v for v in env if self.last_read.get(v, -1) < next_start and v not in self.func.params]:
                    del env[v]
        self.done = next_start
        return result


def mean_output(w: np.ndarray, mean_in: np.ndarray, is_conv: bool, groups: int = 1) -> np.ndarray:
    """The mean output per channel of a conv2d (OIHW, any groups) or dense ((K, N)) weight given the
    mean input: per channel ``(C,)`` (padding borders neglected) or, for a conv, per channel and
    kernel tap ``(C, KH, KW)`` (:func:`relayq.transform.calibrate.window_means`, exact). ``groups``
    follows from the sizes; it is checked.

    >>> mean_output(np.ones((2, 1, 3, 3)), np.array([1.0, 2.0]), True, groups=2).tolist()
    [9.0, 18.0]
    """
    w = np.asarray(w, np.float64)
    if not is_conv:
        return expected_output(w, np.asarray(mean_in).reshape(-1))
    assert np.shape(mean_in)[0] == w.shape[1] * groups, (np.shape(mean_in), w.shape, groups)
    return expected_output(w, mean_in)


def _channel_mean(batches_out: list, is_conv: bool) -> np.ndarray:
    """Mean per input channel over every batch, position and sample (a conv's axis 1, a dense's last).

    The empirical correction keeps the channel mean (padding borders neglected) although the analytic
    one now reads the exact mean of each kernel tap (:func:`relayq.transform.calibrate.window_means`):
    on MobileNetV2 W8A8 per-tensor + CLE (test_lowbit_mobilenet) the exact taps measured 96.7% agreement
    against 98.3% with channel means, two photos of 120 (the same test moves by one photo with the
    torch thread count), so the formula this path was measured with stays until a larger evaluation
    decides.
    """
    if is_conv:
        return np.mean([np.asarray(y, np.float64).mean(axis=(0, 2, 3)) for y in batches_out], axis=0)
    return np.mean([np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1]).mean(axis=0) for y in batches_out], axis=0)


def learn_rounding_sequential(annotated, weights: dict, points: dict, samplers_: dict, batches: list, config,
                              twin, means: dict | None = None) -> dict:
    """Learn the codes layer after layer on the quantized model's inputs (see the module docstring).

    ``samplers_`` hold the float inputs sampled during calibration with their positions (one per
    batch of ``batches``, the calibration arrays in order); ``twin(annotated, qpoints)`` builds the torch
    twin of a (truncated) annotated module that runs it with fake quantization. ``points`` is updated
    as layers are learned; the learned weight points are returned (codes, and with
    ``config.bias_correction`` the measured ``bias_corr``). With AdaRound the correction is the mean of
    ``W~ x~ - W x`` over the sampled positions. Without it (``empirical_bias_correction``) it is
    ``mean_output(W~ - W, E[x~])`` with ``E[x~]`` the quantized input's channel means over every
    position of every batch (exact means: a few hundred sampled positions leave a noise larger than
    the 8-bit shift itself); ``means`` (weight point -> the float model's mean input per channel) says
    which layers to correct; without it the sampled patches give ``E[W~ x~ - W x]``. Without ``config.adaround`` the codes stay
    rounded to nearest and only the bias correction is measured, layer after layer
    (``QConfig.empirical_bias_correction``).

    Example::

        learned = learn_rounding_sequential(annotated, weights, points, samplers, arrays, config,
                                            lambda mod, qp: build_torch_graph(mod, qp, learn_scales=False))
    """
    todo = [(n, c, src) for n, c, src in layers(annotated) if n in samplers_ and samplers_[n].parts]
    tails = layer_tails(annotated) if config.adaround_activation else {}
    runner = SegmentRunner(annotated, twin, batches)
    spent = {"running the quantized model": 0.0, "optimizing": 0.0}
    points = dict(points)
    out = {}
    label = (f"adaround (torch, quantized inputs, {config.adaround_iterations} iterations x "
             f"{config.adaround_batch} samples), layer" if config.adaround else
             "empirical bias correction (torch, quantized inputs), layer")
    with Progress(label, total=len(todo), enabled=config.show_progress) as prog:
        for name, call, _ in todo:
            if name in out:
                continue
            p = points[name]
            is_conv = op_name(call) == "relax.nn.conv2d"
            groups = int(call.attrs.groups) if is_conv else 1
            w3, s3, back = _layout(weights[name].astype(np.float64), p, is_conv, groups)
            sampler = samplers_[name]
            t0 = time.perf_counter()
            inputs = runner.inputs_of(call, points)
            xq = np.concatenate([sampler.take(y, i) for i, y in enumerate(inputs)])
            mean_q = _channel_mean(inputs, is_conv) if means is not None and name in means else None
            del inputs
            x = sampler.data()
            t1 = time.perf_counter()
            spent["running the quantized model"] += t1 - t0
            bias, clip = tails.get(name, (None, None))
            if bias is not None:
                bias = bias.reshape(w3.shape[:2])
            if not config.adaround:
                codes3 = _layout(p.weight_codes(weights[name]).astype(np.float64), p, is_conv, groups)[0]
                shift = adaround.output_shift(codes3, s3, w3, x, xq) if mean_q is None else \
                    _weight_shift(p.weight_codes(weights[name]), p, weights[name], mean_q, is_conv, groups)
                new = dataclasses.replace(p, bias_corr=shift.reshape(-1)) if config.bias_correction else p
                out[name] = points[name] = new
                prog.step(note=f"{name}: mean output shift {float(np.abs(shift).mean()):.3g}")
                continue
            codes3, info = adaround.round_layer(w3, s3, p.qmin, p.qmax, x, xq, config.adaround_iterations, "torch",
                                                batch=config.adaround_batch, bias=bias, clip=clip)
            spent["optimizing"] += time.perf_counter() - t1
            new = dataclasses.replace(p, codes=back(codes3), method=p.method + "+adaround")
            if config.bias_correction:
                new = dataclasses.replace(new, bias_corr=info["output_shift"].reshape(-1))
            out[name] = points[name] = new
            gain = info["mse_adaround"] / info["mse_nearest"] if info["mse_nearest"] > 0 else 1.0
            prog.step(note=f"{name}: output MSE x{gain:.3f} vs nearest" + (" (kept nearest)"
                                                                           if info["kept"] == "nearest" else ""))
    if config.show_progress:
        _log.info("layer by layer on the quantized model: " + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()))
    return out


def _weight_shift(codes, point, w, mean_q, is_conv: bool, groups: int) -> np.ndarray:
    """``E[(W~ - W) x~]`` per output channel from the channel means of the quantized model's input."""
    scale = np.asarray(point.scale, np.float64)
    if scale.ndim:
        shape = [1] * np.ndim(w)
        shape[point.axis] = -1
        scale = scale.reshape(shape)
    wq = np.asarray(codes, np.float64) * scale
    return mean_output(wq - np.asarray(w, np.float64), mean_q, is_conv, groups)
