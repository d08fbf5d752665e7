"""Accuracy-budget mixed precision: the smallest per-layer weight widths whose metric stays within a budget.

:func:`auto_mixed_precision` quantizes the model once at the widest candidate width (calibration runs
once), then searches per-layer weight widths on held-out data:

1. **reference**: the metric of the all-widest model (``baseline="quantized"``, the default) or of
   the float model (``baseline="float"``); the target is ``reference - budget``;
2. **float fallback, the last resort** (only when even the all-widest model misses the target, which
   can happen with ``baseline="float"``): the layers whose float fallback gains the most are kept in
   float, as few as a binary search over that ranking finds enough;
3. **lowering**: for each narrower candidate, narrowest first, the layers are ranked by the metric
   with that one layer lowered (:func:`relayq.analysis.sensitivity`), or with the cheap
   ``ranking="weight_sqnr"`` by each layer's own weight noise per weight saved; a binary search finds
   the longest prefix of the ranking that can be lowered together within the target; then the next
   ``refine`` layers are tried one by one.

Every probe re-quantizes from the first calibration (no data is run through calibration again), then
realizes and compiles the integer model: a probe costs one host compilation plus a run over the
held-out data. ``ranking="measured"`` costs one probe per weight layer, the binary search
``log2(layers)`` probes.

Only weight widths are searched (activations stay as configured): weights are what the model's size
is made of, and narrower activations are what collapses MobileNet-like models.

Example::

    res = relayq.auto_mixed_precision(mod, params, calib_batches, heldout_batches, budget=0.01)
    print(res.summary())
    qmodel = res.qmodel                 # quantized with res.config (a QConfig with layer_overrides)
    lib = relayq.build(qmodel)
"""
from __future__ import annotations

import dataclasses
import sys
import time
import warnings

import numpy as np

from . import qmath
from .analysis.check import _host_function
from .analysis.sensitivity import Variants, _Runner, as_batches, default_metric, sensitivity, with_weight_bits
from .api import QuantizedModel, quantize_model
from .config import as_config
from .errors import ConfigError
from .transform.calibrate import input_specs, weight_qpoint
from .transform.common import bindings, const_value, main_function, simq_info
from .transform.realize import realize, simulate
from .utils.progress import Progress

#: Bytes of a float32 weight (a layer kept in float).
_FLOAT_BYTES = 4


@dataclasses.dataclass
class MixedPrecisionResult:
    """What :func:`auto_mixed_precision` returns."""

    config: object               # the QConfig to reuse: layer_overrides (weight widths) and skip_layers
    widths: dict                 # layer -> weight bits, or "float"
    metric: float                # the chosen model's metric on the held-out data
    reference_metric: float      # the baseline's (all-widest model, or float)
    target: float
    metric_name: str
    size_bytes: int              # weights at their widths (+ int32 biases; float layers at 4 bytes)
    widest_size_bytes: int       # the same, every layer at the widest candidate
    float_size_bytes: int
    probes: int                  # models quantized and measured by the search
    seconds: float
    qmodel: object = dataclasses.field(default=None, repr=False)
    history: list = dataclasses.field(default_factory=list, repr=False)     # (what, metric, size)

    def summary(self) -> str:
        """Text: widths chosen, metric vs target, size vs the widest model."""
        counts = {}
        for w in self.widths.values():
            counts[w] = counts.get(w, 0) + 1
        mix = ", ".join(f"{n} layers {'float' if w == 'float' else f'W{w}'}" for w, n in
                        sorted(counts.items(), key=lambda kv: str(kv[0])))
        return (f"relayq mixed precision: {mix}; {self.metric_name} {self.metric:.4f} (target >= {self.target:.4f}, "
                f"reference {self.reference_metric:.4f}); weights {self.size_bytes / 1e6:.3f} MB = "
                f"{self.size_bytes / self.widest_size_bytes:.1%} of the all-widest model "
                f"({self.widest_size_bytes / 1e6:.3f} MB), {self.probes} probes in {self.seconds:.0f} s")


def _weight_layers(annotated) -> dict:
    """layer -> (weight array, per-channel axis) of every quantized conv2d / dense."""
    out = {}
    for b in bindings(main_function(annotated)):
        info = simq_info(b.value)
        if info is not None and info[2] == "weight":
            out[info[1].rsplit(":", 1)[0]] = (const_value(info[0]), info[4])
    return out


def model_bytes(weights: dict, widths: dict) -> int:
    """Weight bytes at the given widths (layer -> bits or "float"), with an int32 bias per output channel."""
    total = 0
    for layer, (w, axis) in weights.items():
        bits = widths.get(layer)
        channels = w.shape[0] if w.ndim == 4 else w.shape[-1]
        if bits == "float":
            total += w.size * _FLOAT_BYTES + channels * _FLOAT_BYTES
        else:
            total += (w.size * int(bits) + 7) // 8 + channels * 4
    return total


def _weight_sqnr_ranking(weights: dict, layers: list, bits: int, config) -> list:
    """Layers by the quantization noise of their own weights at ``bits`` bits per weight saved, least first.

    The noise is the relative noise power ``10^(-SQNR/10)`` of the weights (for a conv / dense it is the
    layer output's too, for inputs uncorrelated with the error); dividing by the weight count favours the
    big layers, where lowering buys the most bytes for the damage.
    """
    from .analysis.check import sqnr_db

    score = {}
    for layer in layers:
        w, axis = weights[layer]
        p = weight_qpoint(layer + ":w", w, bits, axis, config.weight_method, config.power_of_two_scale)
        scale = np.asarray(p.scale, np.float64)
        if scale.ndim:
            shape = [1] * w.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        score[layer] = 10.0 ** (-sqnr_db(w, qmath.dequantize(p.weight_codes(w), scale)) / 10.0) / w.size
    return sorted(layers, key=lambda n: score[n])


def auto_mixed_precision(mod, params=None, dataset=None, heldout=None, metric=None, budget: float = 0.01,
                         candidates=(4, 8), calibration="kl", config=None, *, baseline: str = "quantized",
                         ranking: str = "measured", refine: int = 4, shapes=None,
                         show_progress: bool = True) -> MixedPrecisionResult:
    """Search per-layer weight widths (float as the last resort) for the smallest model within ``budget``.

    Args:
        mod, params, dataset, calibration, config, shapes: as for :func:`relayq.quantize_model`
            (``config.weight_bits`` is replaced by the widest candidate).
        heldout: input batches the metric is measured on (not the calibration data).
        metric: ``metric(float_output, output) -> float``, higher is better (see
            :func:`relayq.analysis.sensitivity`); default top-1 agreement with the float model for
            classifiers, else output cosine.
        budget: the allowed drop of the metric below the reference (0.01 = one point of agreement).
        candidates: weight widths to choose from; the widest is the starting point.
        baseline: ``"quantized"`` (the all-widest model is the reference) or ``"float"``.
        ranking: ``"measured"`` (one probe per layer) or ``"weight_sqnr"`` (no probe: the noise of each
            layer's own weights at the narrow width per weight, so big robust layers go first).
        refine: after the binary search, layers tried one by one beyond the prefix it found.

    Returns a :class:`MixedPrecisionResult` (``.config`` to reuse, ``.qmodel``, ``.summary()``).

    Example::

        res = relayq.auto_mixed_precision(mod, params, calib, heldout, budget=0.01, candidates=(4, 8))
        print(res.summary())
        again = relayq.quantize_model(mod, params, calib, "kl", res.config)
    """
    start = time.perf_counter()
    widths_all = sorted({int(c) for c in candidates})
    if not widths_all or isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise ConfigError(f"auto_mixed_precision: candidates must be bit widths and budget a number >= 0, got "
                          f"candidates={candidates!r}, budget={budget!r}")
    if baseline not in ("quantized", "float") or ranking not in ("measured", "weight_sqnr"):
        raise ConfigError(f"auto_mixed_precision: baseline must be 'quantized' or 'float' and ranking 'measured' or "
                          f"'weight_sqnr', got {baseline!r}, {ranking!r}")
    widest = widths_all[-1]
    config = as_config(config).replace(weight_bits=widest, check_accuracy=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantize_model(mod, params, dataset, calibration, config, shapes=shapes)
    batches = as_batches(heldout, input_specs(qmodel.prepared), "heldout")
    runner = _Runner(batches)
    ref = runner.run(_host_function(qmodel.prepared))[0]
    name, fn = default_metric(ref) if metric is None else (getattr(metric, "__name__", "metric"), metric)
    variants = Variants(qmodel)
    history = []
    probes = 0

    def measure(cfg, what):
        nonlocal probes
        probes += 1
        _, _, realized = variants.make(cfg)
        value = float(fn(ref, runner.run(_host_function(realized))[0]))
        history.append((what, value))
        if show_progress:
            sys.stderr.write(f"relayq: mixed precision probe {probes} ({time.perf_counter() - start:.0f} s): {what}: "
                             f"{name} {value:.4f} ({'meets' if value >= target else 'misses'} the target)\n")
        return value

    base_metric = float(fn(ref, runner.run(_host_function(qmodel.realized))[0]))
    reference = base_metric if baseline == "quantized" else float(fn(ref, ref))
    target = reference - budget
    weights = _weight_layers(qmodel.annotated)
    widths = {n: widest for n in weights}
    cfg = config
    current = base_metric

    def longest_prefix(order, make_cfg, label):
        """The longest prefix of ``order`` whose change meets the target (binary search), and its metric."""
        lo, hi, best = 0, len(order), (0, None)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            value = measure(make_cfg(order[:mid]), f"{label} {mid}")
            if value >= target:
                lo, best = mid, (mid, value)
            else:
                hi = mid - 1
        return best

    if base_metric < target:
        # The last resort: keep the layers whose float fallback gains most in float, as few as needed.
        # Every layer is a candidate (an add or concat kept in float costs no weight bytes).
        sens = sensitivity(qmodel, batches, metric=fn, show_progress=show_progress)
        probes += len(sens.rows)
        order = [r.layer for r in sorted(sens.rows, key=lambda r: -(r.delta or 0.0)) if r.delta is not None]
        lo, hi = 1, len(order)
        while lo < hi:
            mid = (lo + hi) // 2
            if measure(config.replace(skip_layers=tuple(config.skip_layers) + tuple(order[:mid])), f"float {mid}") \
                    >= target:
                hi = mid
            else:
                lo = mid + 1
        floats = order[:lo]
        cfg = config.replace(skip_layers=tuple(config.skip_layers) + tuple(floats))
        current = measure(cfg, f"float {lo}")
        for n in floats:
            if n in widths:
                widths[n] = "float"
    for bits in widths_all[:-1]:
        movable = [n for n in weights if widths[n] == widest]
        if not movable:
            break
        if ranking == "measured":
            probe_model = dataclasses.replace(qmodel, config=cfg)
            if cfg is not config:
                annotated, qpoints, realized = variants.make(cfg)
                probe_model = dataclasses.replace(qmodel, annotated=annotated, qpoints=qpoints, realized=realized,
                                                  config=cfg)
            sens = sensitivity(probe_model, batches, metric=fn, bits=bits, layers=movable, show_progress=show_progress)
            probes += len(movable)
            order = [r.layer for r in sens.ranking() if r.layer in movable]
        else:
            order = _weight_sqnr_ranking(weights, movable, bits, config)
        k, value = longest_prefix(order, lambda chosen, b=bits: with_weight_bits(cfg, {n: b for n in chosen}),
                                  f"W{bits} prefix")
        chosen = list(order[:k])
        if value is not None:
            current = value
        with Progress(f"refining W{bits}, layer", total=min(refine, len(order) - k), enabled=show_progress) as prog:
            for n in order[k:k + refine]:
                value = measure(with_weight_bits(cfg, {m: bits for m in chosen + [n]}), f"W{bits} + {n}")
                if value >= target:
                    chosen.append(n)
                    current = value
                prog.step(note=n)
        cfg = with_weight_bits(cfg, {n: bits for n in chosen})
        for n in chosen:
            widths[n] = bits
    annotated, qpoints, _ = variants.make(cfg)
    realized, int_params = realize(annotated, qpoints, return_params=True)
    final = QuantizedModel(realized, int_params, qmodel.prepared, annotated, simulate(annotated, qpoints), qpoints,
                           qmodel.calibration, cfg, qmodel.calibration_seconds,
                           calibration_stats=qmodel.calibration_stats, source_model=qmodel.source_model)
    if current < target:
        warnings.warn(f"relayq: auto_mixed_precision could not meet the target {name} >= {target:.4f} (got "
                      f"{current:.4f}) even with layers kept in float", stacklevel=2)
    all_widest = {n: widest for n in weights}
    return MixedPrecisionResult(
        cfg, widths, current, reference, target, name, model_bytes(weights, widths), model_bytes(weights, all_widest),
        model_bytes(weights, {n: "float" for n in weights}), probes, time.perf_counter() - start, final, history)
