"""Stage 3, calibrate: run the dataset, pick a threshold for every quantization point.

The annotated module is turned into a *tap* module: every activation marker becomes the identity and
its input becomes an extra output. The tap module is compiled once and run batch by batch; each tapped
tensor streams into an observer (histograms of bounded size), so memory never depends on the size of
the dataset. Weights are calibrated from the constants themselves.

The result is the list of :class:`QPoint` records (name, role, method, threshold, scale, bits) and
the *simulated* module (see :class:`~relayq.transform.realize.Simulator`): fake quantization on a float
(quantize -> clip -> dequantize) at the chosen scale, which runs in float and shows the accuracy the
integer model will have.

Example::

    simulated, qpoints = calibrate(annotated, batches, "kl")
    for p in qpoints:
        print(p.name, p.method, p.threshold)
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from typing import Any

import numpy as np
import tvm
from tvm import relax

from .. import qmath
from ..config import QConfig
from ..errors import CalibrationWarning, ConfigError, DatasetError, RelayqError
from ..runtime import batch_to_arrays, compile_host, host_target
from ..utils.log import get_logger
from ..utils.progress import Progress
from .common import bindings, const_value, dtype_of, main_function, op_name, shape_of, simq_info, substitute

_log = get_logger("calibrate")


@dataclasses.dataclass(frozen=True)
class QPoint:
    """The calibrated quantization of one point of the graph.

    ``threshold`` and ``scale`` are floats, or 1-D arrays along ``axis`` for per-channel weights.
    """

    name: str
    role: str            # "act" | "weight"
    method: str
    threshold: Any
    scale: Any
    bits: int
    signed: bool = True
    axis: int = -1
    zero_point: int = 0
    #: Weight points with bias correction: the expected output shift (E[(W_q - W) x], real units, one
    #: value per output channel) that realize subtracts from the layer's float bias before quantizing it.
    bias_corr: Any = None
    #: Weight points with learned rounding (AdaRound): the integer codes, in the weight's shape. Every
    #: consumer of weight codes (realize, the simulated module, the reference, bias correction) reads
    #: them through :meth:`weight_codes`, so that all of them use the same integers.
    codes: Any = dataclasses.field(default=None, repr=False, compare=False)

    def weight_codes(self, w: np.ndarray) -> np.ndarray:
        """The integer codes of weight ``w`` at this point: the learned ones when set, else round to nearest.

        >>> QPoint("w", "weight", "max", 1.0, 0.5, 4).weight_codes(np.array([0.7, -3.0])).tolist()
        [1, -6]
        """
        if self.codes is not None:
            return np.asarray(self.codes, dtype=np.int64)
        return qmath.quantize(w, self.scale, self.bits, axis=None if self.axis < 0 else self.axis)

    @property
    def qmin(self) -> int:
        return qmath.qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qmath.qrange(self.bits, self.signed)[1]

    def __repr__(self):
        t = self.threshold
        if isinstance(t, tuple):
            tv = f"[{t[0]:.6g}, {t[1]:.6g}], zero_point={self.zero_point}"
        else:
            tv = f"{float(t):.6g}" if np.ndim(t) == 0 else f"[{len(t)} channels, max {float(np.max(t)):.4g}]"
        return f"QPoint({self.name}, {self.role}, {self.method}, threshold={tv}, bits={self.bits})"


def input_specs(mod: tvm.IRModule) -> list:
    """``[(name, shape, dtype)]`` of main's inputs."""
    return [(p.name, shape_of(p), dtype_of(p)) for p in main_function(mod).params]


def conv_window(call) -> tuple | None:
    """``(kernel, strides, padding, dilation)`` of an NCHW / OIHW conv2d with static shapes whose taps do
    not all see the channel mean (a kernel larger than 1x1, padding, or a stride), for :func:`window_means`;
    None where the channel mean is exact (or the layout is not NCHW / OIHW)."""
    a = call.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
        return None
    try:
        kernel = tuple(int(k) for k in shape_of(call.args[1])[2:])
        int(shape_of(call.args[0])[2]), int(shape_of(call.args[0])[3])
    except (TypeError, ValueError, IndexError, AttributeError):
        return None                               # symbolic shapes: the channel mean it is
    strides, padding = tuple(int(v) for v in a.strides), tuple(int(v) for v in a.padding)
    if kernel == (1, 1) and strides == (1, 1) and not any(padding):
        return None
    return kernel, strides, padding, tuple(int(v) for v in a.dilation)


def tap_module(annotated: tvm.IRModule, input_means: bool = False, layer_inputs: bool = False,
               windows: dict | None = None):
    """The annotated module with markers removed and every activation point's input as an output.

    Returns ``(module, names)``: the module's ``main`` returns ``(tap_0, tap_1, ..., original output)``,
    so ``names[i]`` is output ``i`` however many tensors the model itself returns (a tuple output is
    flattened by the runtime into several). With ``input_means`` it also returns the mean input of every
    conv2d / dense, named after the layer's weight point (``"conv2d_0:w"``), for bias correction: per
    channel, or for a conv whose taps see more than the channel mean (padding, stride, a kernel above
    1x1: :func:`conv_window`) the mean map over the batch ``(C, H, W)``, whose window attributes
    ``windows`` (when given) receives by point name, for :func:`window_means`. With ``layer_inputs`` the
    float input itself of every conv2d / dense, named ``"conv2d_0:w:in"`` (for AdaRound).
    """
    func = main_function(annotated)
    bb = relax.BlockBuilder()
    remap, taps, names = {}, [], []
    weight_of = {}                     # weight marker var -> its point name
    with bb.function("main", list(func.params)):
        with bb.dataflow():
            for b in bindings(func):
                info = simq_info(b.value)
                if info is not None:
                    x, name, role = info[0], info[1], info[2]
                    src = substitute(x, remap)
                    remap[b.var] = src
                    if role == "act" and name not in names:
                        if not isinstance(src, relax.Var):
                            src = bb.emit(src)
                        taps.append(src)
                        names.append(name)
                    elif role == "weight":
                        weight_of[b.var] = name
                    continue
                if input_means and op_name(b.value) in ("relax.nn.conv2d", "relax.matmul") \
                        and b.value.args[1] in weight_of:
                    x = substitute(b.value.args[0], remap)
                    window = conv_window(b.value) if op_name(b.value) == "relax.nn.conv2d" else None
                    axes = [0] if window is not None or op_name(b.value) != "relax.nn.conv2d" else [0, 2, 3]
                    taps.append(bb.emit(relax.op.mean(x, axis=axes)))
                    names.append(weight_of[b.value.args[1]])
                    if window is not None and windows is not None:
                        windows[names[-1]] = window
                if layer_inputs and op_name(b.value) in ("relax.nn.conv2d", "relax.matmul") \
                        and b.value.args[1] in weight_of:
                    x = substitute(b.value.args[0], remap)
                    taps.append(x if isinstance(x, relax.Var) else bb.emit(x))
                    names.append(weight_of[b.value.args[1]] + ":in")
                remap[b.var] = bb.emit(substitute(b.value, remap), b.var.name)
            out = bb.emit_output(relax.Tuple([*taps, substitute(func.body.body, remap)]))
        bb.emit_func_output(out)
    mod = bb.get()
    for gv, f in annotated.functions_items():
        if gv.name_hint != "main":
            mod[gv] = f
    return mod, names


def _make_calibrator(calibration, config: QConfig):
    from ..calibration import methods

    if isinstance(calibration, methods.Calibrator):
        return calibration, getattr(calibration, "name", type(calibration).__name__)
    if isinstance(calibration, str):
        options = {"p": config.percentile} if calibration == "percentile" else {}
        if calibration not in methods.METHODS:
            raise ConfigError(f"unknown calibration method {calibration!r}; known: {sorted(methods.METHODS)}")
        return methods.HistogramCalibrator(calibration, **options), calibration
    raise ConfigError(f"calibration must be a method name {sorted(methods.METHODS)} or a Calibrator, "
                      f"got {type(calibration).__name__}")


def _fast_float(mod: tvm.IRModule, target=None) -> tvm.IRModule:
    """Lower the tap module's float conv/dense chains onto relayq's scheduled fp32 kernels.

    TVM's default CPU pipeline leaves conv2d unscheduled (seconds per image on a ResNet), so running
    calibration data through it would dominate calibration time. A chain whose intermediate value is
    tapped is left to TVM (the lowering only fuses chains with private intermediates).
    """
    from ..backend import presets

    target = target or presets.target_from_preset(presets.best_host_preset())
    kind = presets.preset_of(target)
    if kind == "cuda-dp4a":
        return mod
    from ..backend.lower import lower_float

    return lower_float(mod, kind)


def _compile_taps(tmod: tvm.IRModule, target=None):
    """The tap module compiled as ``relayq.build`` compiles: relayq's fp32 kernels for conv/dense chains,
    then its CPU pipeline, which schedules everything else (layer norm, softmax, attention matmuls, ...)."""
    from ..backend import presets

    target = target or host_target()
    return compile_host(_fast_float(tmod, target), target, pipeline=presets.relax_pipeline(target))


def observe(annotated: tvm.IRModule, dataset, calibrator, show_progress: bool = True, target=None,
            means: dict | None = None, ranges: dict | None = None, record=None,
            samplers: dict | None = None, timings: dict | None = None) -> list:
    """Run ``dataset`` through the tap module, feeding every activation point to ``calibrator``.

    Returns the names of the activation points observed. When a ``means`` dict is given, it receives
    the mean input of every conv2d / dense layer, keyed by weight point: per input feature for a dense,
    per channel for a 1x1 stride-1 unpadded conv, else per channel and kernel tap ``(C, KH, KW)``
    (:func:`window_means`: what each tap reads, zero padding included). ``ranges``
    receives ``(min, max)`` of every activation point over the whole dataset. ``record``, when given,
    is called after each batch as ``record(arrays, taps, outputs)``: the input arrays, a dict point
    name -> float value, and the float model's own outputs (a list), e.g. to keep the last batches for
    :mod:`relayq.analysis.check`. ``samplers`` (weight point -> callable) receive every batch's float
    input of their layer (AdaRound).

    A point that was constant over the whole dataset (all zero: a dead ReLU, a zeroed input) gets a
    :class:`~relayq.errors.CalibrationWarning` naming it: its scale says nothing about real data.
    ``timings``, when given, receives the seconds spent compiling the tap module (``"compile"``) and
    running the batches (``"batches"``).
    """
    start = time.perf_counter()
    windows = {}
    tmod, names = tap_module(annotated, input_means=means is not None, layer_inputs=bool(samplers), windows=windows)
    sums = {}
    lo_hi = {}
    specs = input_specs(annotated)
    fn = _compile_taps(tmod, target)
    compiled = time.perf_counter()
    total = len(dataset) if hasattr(dataset, "__len__") else None
    method = getattr(calibrator, "name", type(calibrator).__name__)
    seen = 0
    with Progress("calibrating, batch", total=total, enabled=show_progress) as prog:
        for i, batch in enumerate(dataset):
            arrays = batch_to_arrays(batch, specs, where=f"calibration batch {i}")
            outs = fn(*arrays)
            # The taps come first: the model's own outputs (one tensor or a tuple of any size) follow.
            taps = {}
            for name, value in zip(names, outs[:len(names)]):
                if name.endswith(":w:in"):
                    if name[:-3] in samplers:
                        samplers[name[:-3]](value)
                    continue
                if name.endswith(":w"):
                    sums[name] = sums.get(name, 0.0) + value.astype(np.float64)
                    continue
                taps[name] = value
                lo, hi = float(value.min()), float(value.max())
                old = lo_hi.get(name)
                lo_hi[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
                _call_calibrator(calibrator, method, name, "observe", name, value)
            if record is not None:
                record(arrays, taps, outs[len(names):])
            seen += 1
            prog.step()
    if timings is not None:
        timings.update(compile=compiled - start, batches=time.perf_counter() - compiled)
    if seen == 0:
        raise DatasetError("the calibration dataset is empty: pass at least one batch")
    if means is not None:
        # every batch has the same shape; a conv's mean map becomes the mean each kernel tap sees
        means.update({k: window_means(v / seen, *windows[k]) if k in windows else v / seen for k, v in sums.items()})
    if ranges is not None:
        ranges.update(lo_hi)
    _warn_degenerate(lo_hi, seen)
    return [n for n in names if not n.endswith(":w") and not n.endswith(":w:in")]


def _warn_degenerate(lo_hi: dict, batches: int) -> None:
    """One :class:`CalibrationWarning` naming every point that saw a single value over the dataset."""
    zero = [n for n, (lo, hi) in lo_hi.items() if lo == hi == 0.0]
    const = [f"{n} (always {lo:.6g})" for n, (lo, hi) in lo_hi.items() if lo == hi != 0.0]
    if not zero and not const:
        return
    parts = []
    if zero:
        parts.append(f"all zero at {', '.join(zero)} (a dead ReLU, a zeroed input: the scale falls back to 1.0)")
    if const:
        parts.append(f"constant at {', '.join(const)}")
    warnings.warn(f"relayq: degenerate calibration over {batches} batch(es): the data was "
                  + "; ".join(parts) + ". The scales of these points say nothing about real inputs: check the "
                  "calibration data and the layers before them", CalibrationWarning, stacklevel=3)


def _who(calibrator, method: str) -> str:
    """How messages name a calibrator: its method name, and its class when it is a user's."""
    from ..calibration.methods import HistogramCalibrator

    cls = type(calibrator).__name__
    return f"{method!r}" if type(calibrator) is HistogramCalibrator or cls == method else f"{method!r} ({cls})"


def _call_calibrator(calibrator, method: str, name: str, what: str, *args):
    """Call ``calibrator.<what>(*args)``; an error from a user's calibrator is re-raised naming the point.

    relayq's own calibrators are called as they are: an error inside them is a relayq bug, not bad input.
    """
    from ..calibration.methods import HistogramCalibrator

    fn = getattr(calibrator, what)
    if type(calibrator) is HistogramCalibrator:
        return fn(*args)
    try:
        return fn(*args)
    except RelayqError:
        raise
    except Exception as e:
        raise ConfigError(f"calibrator {_who(calibrator, method)} failed on point {name!r} in {what}(): "
                          f"{type(e).__name__}: {e}") from e


def bias_correction(w: np.ndarray, p: QPoint, mean_in: np.ndarray) -> np.ndarray:
    """The expected output shift ``E[(W_q - W) x]`` per output channel from the mean input.

    ``w`` is OIHW (conv2d, any groups) or (K, N) (dense). ``mean_in`` is what :func:`observe` measures:
    for a conv the mean input each kernel tap sees, ``(C, KH, KW)`` (:func:`window_means`: zero padding
    and stride included, so the shift is exact on small feature maps, where a 3x3 kernel on a 2x2 map
    sees padding in more than half of its taps), or per input channel ``(C,)`` (borders neglected, as in
    Nagel et al.'s data-free bias correction); for a dense the mean per input feature ``(K,)``.

    >>> p = QPoint("w", "weight", "max", 1.0, 0.5, 8)
    >>> bias_correction(np.full((1, 1, 1, 2), 0.2), p, np.array([[[1.0, 3.0]]])).tolist()   # codes 0: error -0.2
    [-0.8]
    """
    ax = None if p.axis < 0 else p.axis
    scale = _bcast(p.scale, w.ndim, ax)
    err = qmath.dequantize(p.weight_codes(w), scale).astype(np.float64) - w
    return expected_output(err, mean_in)


def expected_output(w: np.ndarray, mean_in: np.ndarray) -> np.ndarray:
    """The mean output per channel of a conv2d (OIHW, any groups) or dense ((K, N)) weight ``w`` without
    its bias, given the mean input: ``(C, KH, KW)`` per kernel tap (:func:`window_means`) or ``(C,)`` per
    channel (for a conv, every tap then sees the channel mean: padding borders neglected).

    >>> expected_output(np.ones((2, 1, 3, 3)), np.array([1.0, 2.0])).tolist()     # depthwise
    [9.0, 18.0]
    """
    w = np.asarray(w, np.float64)
    mean_in = np.asarray(mean_in, np.float64)
    if w.ndim != 4:
        return mean_in.reshape(-1) @ w
    o, cg, kh, kw = w.shape
    if mean_in.ndim == 1:
        mean_in = np.broadcast_to(mean_in[:, None, None], (mean_in.size, kh, kw))
    groups = mean_in.shape[0] // cg
    m = mean_in.reshape(groups, cg, kh, kw)[np.arange(o) // (o // groups)]   # (O, C/g, KH, KW): each output's inputs
    return np.einsum("ocij,ocij->o", w, m)


def window_means(mean_map: np.ndarray, kernel, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)) -> np.ndarray:
    """The mean input each tap of a conv2d kernel sees, ``(C, KH, KW)``, from the mean input map ``(C, H, W)``.

    Tap ``(i, j)`` reads input row ``s_h * y + d_h * i - pad_top`` for every output row ``y`` (and the same
    for columns); rows outside the map read the zero padding. Averaged over every output position, this
    is what the output's mean depends on: ``E[conv(x, W)] = sum W[o, c, i, j] * M[c, i, j]`` exactly,
    where the channel mean alone is right only without padding. ``padding`` is (top, left, bottom, right).

    >>> window_means(np.ones((1, 2, 2)), (3, 3), padding=(1, 1, 1, 1))[0].tolist()   # 2x2 map, 3x3 kernel
    [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]
    """
    mean_map = np.asarray(mean_map, np.float64)
    _, h, w = mean_map.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    pt, pl, pb, pr = padding

    def taps(size, k, s, d, before, after):
        out = (size + before + after - d * (k - 1) - 1) // s + 1
        rows = s * np.arange(out)[None, :] + d * np.arange(k)[:, None] - before        # (k, out)
        hit = (rows[:, :, None] == np.arange(size)[None, None, :]).sum(axis=1)        # (k, size): reads per row
        return hit / out

    a, b = taps(h, kh, sh, dh, pt, pb), taps(w, kw, sw, dw, pl, pr)
    return np.einsum("ih,chw,jw->cij", a, mean_map, b)


def _bcast(v, ndim, axis):
    v = np.asarray(v, dtype=np.float64)
    if v.ndim == 0 or axis is None:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def weight_qpoint(name: str, w: np.ndarray, bits: int, axis: int, method: str, pow2: bool = False) -> QPoint:
    """Calibrate one weight tensor: symmetric, per tensor (``axis=-1``) or per channel along ``axis``."""
    from ..calibration.methods import weight_threshold

    if not np.all(np.isfinite(w)):
        raise DatasetError(f"weight {name!r} contains NaN or Inf")
    t = weight_threshold(w, bits, method=method, channel_axis=None if axis < 0 else axis)
    if np.ndim(t) == 0:
        scale = qmath.scale_from_threshold(float(t), bits)
    else:
        t = np.asarray(t, dtype=np.float64)
        scale = np.array([qmath.scale_from_threshold(float(v), bits) for v in t])
    if pow2:
        scale = qmath.power_of_two(scale)
    return QPoint(name, "weight", method, t, scale, bits, True, axis)


def _finite_float(v, who: str, name: str, what: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"calibrator {who} returned {v!r} as the {what} of point {name!r}: "
                          "expected a number") from None
    if not np.isfinite(f):
        raise ConfigError(f"calibrator {who} returned a non-finite {what} ({f}) for point {name!r}")
    return f


def act_qpoint(name: str, calibrator, method: str, bits: int, config: QConfig, seen: tuple | None = None) -> QPoint:
    """Calibrate one activation point: symmetric signed codes, or asymmetric unsigned ones with a zero point.

    The calibrator's answer is validated: a NaN, infinite or negative threshold (a ``lo > hi`` range)
    raises :class:`ConfigError` naming the point and the calibrator. ``seen`` is the point's observed
    ``(min, max)``: a zero threshold for a point that was not all zero gets a CalibrationWarning.
    """
    who = _who(calibrator, method)
    if config.act_symmetric:
        # unsigned_activations: a point never seen negative takes unsigned codes with zero point 0.
        signed = not (config.unsigned_activations and seen is not None and seen[0] >= 0)
        t = _finite_float(_call_calibrator(calibrator, method, name, "threshold", name, bits, signed),
                          who, name, "threshold")
        if t < 0:
            raise ConfigError(f"calibrator {who} returned a negative threshold ({t}) for point {name!r}")
        if t == 0 and seen is not None and seen != (0.0, 0.0):
            warnings.warn(f"relayq: calibrator {who} returned threshold 0 for point {name!r}, whose values "
                          f"range over [{seen[0]:.6g}, {seen[1]:.6g}]: the point is quantized with scale 1.0",
                          CalibrationWarning, stacklevel=3)
        scale = qmath.scale_from_threshold(t, bits, signed)
        if config.power_of_two_scale:
            scale = qmath.power_of_two(scale)
        if signed:
            return QPoint(name, "act", method, t, scale, bits, True, -1)
        # as an asymmetric point whose range starts at 0
        return QPoint(name, "act", method, (0.0, scale * qmath.qrange(bits, False)[1]), scale, bits, False, -1, 0)
    rng = _call_calibrator(calibrator, method, name, "range", name, bits)
    try:
        lo, hi = rng
    except (TypeError, ValueError):
        raise ConfigError(f"calibrator {who} returned {rng!r} as the range of point {name!r}: "
                          "expected (lo, hi)") from None
    lo, hi = _finite_float(lo, who, name, "range"), _finite_float(hi, who, name, "range")
    if lo > hi:
        raise ConfigError(f"calibrator {who} returned an empty range ({lo}, {hi}) for point {name!r}: "
                          "lo must not exceed hi")
    scale, zp = qmath.asymmetric_params(lo, hi, bits)
    if config.power_of_two_scale:
        scale = qmath.power_of_two(scale)
        zp = int(np.clip(np.round(-min(lo, 0.0) / scale), 0, (1 << bits) - 1))
    return QPoint(name, "act", method, (lo, hi), scale, bits, False, -1, zp)


@contextlib.contextmanager
def _naming(annotated, point: str, method: str):
    """Errors about ``point`` name it in the user's terms too (its layer's ONNX node, weight, module)."""
    from .annotate import describe_layer

    try:
        yield
    except RelayqError as e:
        described = describe_layer(annotated, point)
        if described == point or repr(point) not in str(e):
            raise
        raise type(e)(str(e).replace(repr(point), f"{point!r}{described[len(point):]}")) from None
    except Exception as e:  # a user's Calibrator failing: say which point it failed on
        raise ConfigError(f"calibrator {method!r} failed on point {describe_layer(annotated, point)}: "
                          f"{type(e).__name__}: {e}") from e


#: Bins of the compact activation histograms kept for reports (the observer's 4096 merged 16 to 1):
#: enough to see a distribution and its clipping threshold, 2 kB per point.
COMPACT_BINS = 256


@dataclasses.dataclass
class CalibrationStats:
    """What calibration measured, kept so that a point can be re-calibrated without running the data again.

    Filled by :func:`calibrate` when passed as ``stats``. ``calibrator`` holds the streamed histograms
    of every activation point (the built-in calibrators keep one 4096-bin histogram per point);
    ``means`` the mean input of every conv2d / dense (bias correction: per channel, or per channel and
    kernel tap, see :func:`observe`), keyed by weight point; ``ranges`` the observed ``(min, max)`` of every
    activation point.

    Example::

        stats = CalibrationStats()
        simulated, qpoints = calibrate(annotated, batches, "kl", stats=stats)
        stats.compact_histogram("conv2d_0:out")     # (counts, edges) for a plot
    """

    calibrator: Any = None
    method: str = ""
    means: dict = dataclasses.field(default_factory=dict)
    ranges: dict = dataclasses.field(default_factory=dict)

    def compact_histogram(self, point: str, bins: int = COMPACT_BINS):
        """``(counts, edges)`` of an activation point's values (signed, over ``[-R, R]``), or None."""
        if isinstance(self.calibrator, CompactHistograms):
            return self.calibrator.hists.get(point)
        observers = getattr(self.calibrator, "observers", None)
        obs = observers.get(point) if observers else None
        if obs is None or obs.range <= 0:
            return None
        merge = max(1, len(obs.hist) // bins)
        counts = obs.hist.reshape(-1, merge).sum(axis=1)
        return counts, np.linspace(-obs.range, obs.range, len(counts) + 1)

    def compact(self, bins: int = COMPACT_BINS) -> "CalibrationStats":
        """A copy that keeps only compact histograms (for a QuantizedModel that is stored or reported).

        Its calibrator is a :class:`CompactHistograms`: it answers ``compact_histogram`` and, for the
        built-in methods, thresholds from the coarser histogram (re-calibration is then approximate).
        """
        hists = {}
        for name in getattr(self.calibrator, "observers", {}) or {}:
            h = self.compact_histogram(name, bins)
            if h is not None:
                hists[name] = h
        return CalibrationStats(CompactHistograms(hists), self.method, dict(self.means), dict(self.ranges))


class CompactHistograms:
    """Downsampled activation histograms by point (see :meth:`CalibrationStats.compact`)."""

    def __init__(self, hists: dict):
        self.hists = hists

    @property
    def observers(self):
        return {}


def recalibrate(annotated: tvm.IRModule, stats: CalibrationStats, config: QConfig, reuse: dict,
                tensors: dict, reuse_tensors: dict, prepared: tvm.IRModule | None = None) -> dict:
    """QPoints for ``annotated`` from earlier statistics, without running any data.

    ``reuse``: the points of an earlier calibration of the same prepared module (another annotation of
    it: a layer skipped or at another width). ``tensors`` / ``reuse_tensors`` map the point names of
    ``annotated`` / of ``reuse`` to the prepared variables they quantize
    (:func:`relayq.transform.annotate.point_tensors`). A point is taken over unchanged where it has the
    same name and width (AdaRound codes and bias correction included); an activation point on a tensor
    that another point observed gets that point's statistics (re-thresholded from its histogram when
    the width differs, when ``stats`` holds the calibrator); a tensor that was never observed but is a
    max pool / reshape / average of one that was takes that one's threshold (``prepared`` is needed
    for that walk). A weight point at a new width is calibrated from the constant, with bias
    correction from ``stats.means``. Raises :class:`ConfigError` naming a point it cannot derive.

    Example::

        qp2 = recalibrate(annotate(prepared, cfg2), stats, cfg2, qmodel.qpoints,
                          point_tensors(prepared, cfg2), point_tensors(prepared, cfg))
    """
    by_tensor = {}
    for name, var in reuse_tensors.items():
        if name in reuse:
            by_tensor.setdefault(var, name)
    out = {}
    for b in bindings(main_function(annotated)):
        info = simq_info(b.value)
        if info is None or info[1] in out:
            continue
        x, name, role, bits, axis = info
        old = reuse.get(name)
        if role == "weight":
            if old is not None and old.bits == bits and old.axis == axis:
                out[name] = old
                continue
            w = const_value(x)
            p = weight_qpoint(name, w, bits, axis, config.weight_method, config.power_of_two_scale)
            if config.bias_correction and name in stats.means:
                p = dataclasses.replace(p, bias_corr=bias_correction(w, p, stats.means[name]))
            out[name] = p
            continue
        if old is not None and old.bits == bits:
            out[name] = old
            continue
        var = tensors.get(name)
        src = by_tensor.get(var) if var is not None else None
        while src is None and var is not None and prepared is not None:
            from .annotate import pass_through_source

            var = pass_through_source(prepared, var)
            src = by_tensor.get(var) if var is not None else None
        if src is None:
            raise ConfigError(f"recalibrate: point {name!r} quantizes a tensor that calibration did not observe; "
                              "quantize the model again with this configuration")
        sp = reuse[src]
        if sp.bits == bits:
            out[name] = dataclasses.replace(sp, name=name)
            continue
        observers = getattr(stats.calibrator, "observers", None)
        if observers and src in observers:
            p = act_qpoint(src, stats.calibrator, stats.method, bits, config, stats.ranges.get(src))
            out[name] = dataclasses.replace(p, name=name)
        else:
            # No histogram kept: keep the clipping range, at the new width's step.
            t = sp.threshold
            if isinstance(t, tuple):
                scale, zp = qmath.asymmetric_params(t[0], t[1], bits)
                out[name] = dataclasses.replace(sp, name=name, bits=bits, scale=scale, zero_point=zp)
            else:
                out[name] = dataclasses.replace(sp, name=name, bits=bits, scale=qmath.scale_from_threshold(t, bits))
    return out


def needs_twin(config: QConfig) -> bool:
    """Whether calibration runs the partly quantized model layer by layer (through the torch twin):
    AdaRound on quantized inputs, or empirical bias correction."""
    return (config.adaround and config.adaround_inputs == "quantized") or \
        (config.empirical_bias_correction and config.bias_correction)


def calibrate(annotated: tvm.IRModule, dataset, calibration="naive", config: QConfig | None = None,
              target=None, record=None, stats: CalibrationStats | None = None, twin=None):
    """Calibrate every quantization point of ``annotated``.

    Returns ``(simulated_module, qpoints)`` with ``qpoints`` a dict name -> :class:`QPoint`.
    ``record`` is handed to :func:`observe` (called with every batch's inputs, taps and float outputs).
    ``stats``, when given, receives the calibrator (its histograms), the input means and the ranges
    (see :class:`CalibrationStats`), for :func:`recalibrate` and reports. ``twin`` is the function
    ``(annotated, qpoints) -> torch module`` that AdaRound with ``adaround_inputs="quantized"`` runs the
    partly quantized model with (``relayq.quantize_model`` hands in the training package's torch twin);
    without it AdaRound learns on the float model's inputs, with a warning.

    Example::

        simulated, qpoints = calibrate(annotated, [x0, x1, x2], "kl")
    """
    config = config or QConfig()
    start = time.perf_counter()
    timings = {}
    calibrator, method = _make_calibrator(calibration, config)
    func = main_function(annotated)
    points = {}
    act_bits = {}
    weights = {}
    for b in bindings(func):
        info = simq_info(b.value)
        if info is None:
            continue
        x, name, role, bits, axis = info
        if role == "weight":
            weights[name] = const_value(x)
            with _naming(annotated, name, method):
                points[name] = weight_qpoint(name, weights[name], bits, axis, config.weight_method,
                                             config.power_of_two_scale)
        else:
            act_bits[name] = bits
    means = {} if config.bias_correction else None
    if act_bits:
        ranges = {}
        samplers = None
        sequential = needs_twin(config)
        if sequential and twin is None:
            warnings.warn("relayq: AdaRound with adaround_inputs='quantized' and empirical_bias_correction need "
                          "the torch twin of the graph (torch installed, and relayq.quantize_model); using the "
                          "float model's inputs instead", CalibrationWarning, stacklevel=2)
            sequential = False
        arrays = None
        if sequential:
            # The layers are learned one after the other, each on a new pass of the data through the
            # partly quantized model: the batches are read once and kept.
            specs = input_specs(annotated)
            dataset = list(dataset)
            arrays = [batch_to_arrays(b, specs, where=f"calibration batch {i}") for i, b in enumerate(dataset)]
        from . import rounding as adaround
        if config.adaround or sequential:
            samplers = adaround.samplers(annotated, weights, config.adaround_samples,
                                         len(dataset) if hasattr(dataset, "__len__") else None)
        observe(annotated, dataset, calibrator, config.show_progress, target, means, ranges, record, samplers,
                timings)
        if stats is not None:
            stats.calibrator, stats.method, stats.ranges = calibrator, method, ranges
        for name, bits in act_bits.items():
            with _naming(annotated, name, method):
                points[name] = act_qpoint(name, calibrator, method, bits, config, ranges.get(name))
        measured = set()
        if samplers and sequential:
            learned = adaround.learn_rounding_sequential(annotated, weights, points, samplers, arrays, config, twin,
                                                         means)
            points.update(learned)
            # Their bias correction was measured on the quantized model's own inputs, layer by layer.
            measured = {n for n, p in learned.items() if p.bias_corr is not None}
        elif samplers and config.adaround:
            # Learned rounding before bias correction: the correction measures the codes' actual error.
            points.update(adaround.learn_rounding(annotated, weights, points, samplers, config))
        for name, m in (means or {}).items():
            if name not in measured:
                points[name] = dataclasses.replace(points[name], bias_corr=bias_correction(weights[name], points[name], m))
        if stats is not None:
            stats.means = dict(means or {})
    else:
        # Nothing to observe, but the dataset must still be valid for the model.
        specs = input_specs(annotated)
        n = 0
        for i, batch in enumerate(dataset):
            batch_to_arrays(batch, specs, where=f"calibration batch {i}")
            n += 1
        if n == 0:
            raise DatasetError("the calibration dataset is empty: pass at least one batch")
    from .realize import simulate

    simulated = simulate(annotated, points)
    if config.show_progress and timings:
        # The whole time, not only the batches: compiling the tap module and the threshold searches
        # (KL, MSE) can take longer than the data itself.
        total = time.perf_counter() - start
        _log.info(f"calibration {method!r}: {total:.1f} s (compiling the tap model {timings['compile']:.1f} s, "
                  f"batches {timings['batches']:.1f} s, thresholds and weights "
                  f"{total - timings['compile'] - timings['batches']:.1f} s)")
    return simulated, points
