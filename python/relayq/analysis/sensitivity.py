"""Per-layer sensitivity: which layers does quantization hurt, and which could go lower?

:func:`sensitivity` measures, on data the user gives:

* **SQNR per layer** (``sqnr_db``): at every activation point, the realized integer model's value
  (dequantized) against the float model's value of the same tensor, ``10 log10(sum x^2 / sum (x -
  xq)^2)`` over all the data. Unlike the per-point SQNR of :mod:`relayq.analysis.check` (each point's
  own rounding), this is the *accumulated* noise: everything quantized upstream is in it. A layer's
  number is the one at its output point (for the last layer, whose output is not requantized, at the
  model's output).
* **The metric with one layer changed** (``metric``, ``delta``): the model re-quantized with that one
  layer kept in float (``bits=None``) or with its weights at ``bits`` bits (the rest as configured),
  scored against the float model. ``delta`` is that score minus the score of the model as quantized:
  positive where keeping the layer float helps (it is sensitive), negative where lowering it hurts.

Re-quantizing runs no data through calibration: the points of the changed model are re-derived from
the model's calibration (:func:`relayq.transform.calibrate.recalibrate`: the same thresholds on the
same tensors; a weight at a new width is calibrated from the constant), then realized and compiled
for the host with relayq's kernels (about 8 s for MobileNetV2 on 2 cores, plus the data).

Metric: ``metric(reference, output) -> float`` (higher is better) on the model's first output,
concatenated over all batches; ``reference`` is the float model's. The default is top-1 agreement
with the float model for classifier outputs (2-D, one row per sample), else the output cosine.

Example::

    result = relayq.analysis.sensitivity(qmodel, [x[i:i + 8] for i in range(0, 64, 8)])
    print(result.table())
    worst = result.ranking()[-1]          # the layer whose float fallback gains the most
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
from tvm import relax

from ..config import LayerConfig
from ..errors import CalibrationWarning, ConfigError, DatasetError, FloatFallbackWarning
from ..transform.annotate import annotate, layer_sources, layers as layers_of, point_tensors
from ..runtime import batch_to_arrays
from ..transform.calibrate import CalibrationStats, _fast_float, input_specs, recalibrate, tap_module
from ..transform.common import bindings, main_function, simq_info
from ..transform.realize import Realizer, realize
from ..utils.progress import Progress
from .check import _host_function, cosine

#: Layer types without weights: ``bits=N`` (a weight width) does not apply to them.
_WEIGHTLESS = ("add", "concat", "max_pool2d", "avg_pool2d", "global_avg_pool")


#: Op types of a source node that computes (a conv / dense layer comes from one of these, an add or a
#: pool never does).
_COMPUTE_SOURCES = ("Conv", "Gemm", "MatMul", "Conv2d", "Linear", "ConvTranspose", "FullyConnected", "CONV_2D",
                    "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "Convolution")


def trusted_source(layer: str, source):
    """``source`` unless its op type contradicts the layer's kind (an add recorded as a Conv node: the
    frontend's scan can misattribute a binding); then None, so that no wrong name is shown.

    >>> from relayq.utils.names import LayerSource
    >>> trusted_source("add_1", LayerSource("ONNX", "features.16.conv.1.0", "Conv")) is None
    True
    """
    if source is None or source.op_type is None:
        return source
    compute = layer.rsplit("_", 1)[0] in ("conv2d", "dense")
    return source if compute == (source.op_type in _COMPUTE_SOURCES) else None


def top1_agreement(reference, output) -> float:
    """Fraction of rows whose argmax is the same in both (classifier outputs, one row per sample).

    >>> top1_agreement(np.array([[1, 0], [0, 1]]), np.array([[2, 1], [3, 0]]))
    0.5
    """
    ref = np.asarray(reference).reshape(len(reference), -1)
    out = np.asarray(output).reshape(len(output), -1)
    return float(np.mean(ref.argmax(axis=1) == out.argmax(axis=1)))


def output_cosine(reference, output) -> float:
    """Cosine similarity of the two outputs, flattened (see :func:`relayq.analysis.check.cosine`)."""
    return cosine(reference, output)


def default_metric(reference):
    """``(name, function)``: top-1 agreement for a classifier-like output (2-D, >= 2 columns), else cosine."""
    ref = np.asarray(reference)
    if ref.ndim == 2 and ref.shape[1] >= 2 and ref.dtype.kind == "f":
        return "top-1 agreement", top1_agreement
    return "output cosine", output_cosine


def as_batches(data, specs, what: str = "data") -> list:
    """The data as a list of input-array lists (it is run once per variant, so it is read once here)."""
    if data is None:
        raise DatasetError(f"{what}: pass an iterable of input batches")
    if isinstance(data, (np.ndarray, dict)):
        data = [data]
    out = [batch_to_arrays(b, specs, where=f"{what} batch {i}") for i, b in enumerate(data)]
    if not out:
        raise DatasetError(f"{what} is empty: pass at least one batch")
    return out


class _TapRealizer(Realizer):
    """The realized model that also returns the dequantized value at every activation point (first)."""

    def __init__(self, annotated, qpoints):
        super().__init__(annotated, qpoints)
        self.point_of = {b.var.name: info[1] for b in bindings(main_function(annotated))
                         if (info := simq_info(b.value)) is not None and info[2] == "act"}
        self.tapped = {}

    def finalize(self, val, scale, bits, name=None, zp=0, signed=True):
        q = super().finalize(val, scale, bits, name, zp, signed)
        point = self.point_of.get(name)
        if point is not None and point not in self.tapped:
            self.tapped[point] = q
        return q

    def outputs(self, out):
        taps = [self.to_float(q) for q in self.tapped.values()]
        return relax.Tuple([*taps, out]) if taps else out


def _tap_realized(annotated, qpoints):
    r = _TapRealizer(annotated, qpoints)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatFallbackWarning)
        mod = r.run()
    mod = relax.transform.DeadCodeElimination(["main"])(relax.transform.Normalize()(mod))
    return mod, list(r.tapped)


class Variants:
    """Re-quantizations of one QuantizedModel that share its calibration (no data is run to make them).

    Example::

        v = Variants(qmodel)
        annotated, qpoints, realized = v.make(qmodel.config.replace(skip_layers=("conv2d_3",)))
    """

    def __init__(self, qmodel):
        if not getattr(qmodel, "quantized", True) or not qmodel.qpoints:
            raise ConfigError("the model has no quantized layer: nothing to analyse")
        self.qmodel = qmodel
        self.stats = qmodel.calibration_stats or CalibrationStats()
        self.base_tensors = point_tensors(qmodel.prepared, qmodel.config)

    def config_for(self, layer: str, bits: int | None):
        """The model's config with ``layer`` kept float (``bits=None``) or its weights at ``bits`` bits."""
        cfg = self.qmodel.config
        if bits is None:
            return cfg.replace(skip_layers=tuple(cfg.skip_layers) + (layer,))
        return with_weight_bits(cfg, {layer: bits})

    def make(self, config):
        """``(annotated, qpoints, realized)`` of the model quantized with ``config``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FloatFallbackWarning)
            annotated = annotate(self.qmodel.prepared, config)
        qpoints = recalibrate(annotated, self.stats, config, self.qmodel.qpoints,
                              point_tensors(self.qmodel.prepared, config), self.base_tensors, self.qmodel.prepared)
        return annotated, qpoints, realize(annotated, qpoints)


def with_weight_bits(config, widths: dict):
    """``config`` with ``layer_overrides`` setting the weight width of each layer in ``widths``.

    An existing exact entry for a layer keeps its other fields.

    >>> from relayq import QConfig
    >>> with_weight_bits(QConfig(), {"conv2d_1": 4}).layer_overrides["conv2d_1"].weight_bits
    4
    """
    overrides = dict(config.layer_overrides)
    for layer, bits in widths.items():
        old = overrides.get(layer)
        overrides[layer] = dataclasses.replace(old, weight_bits=int(bits)) if old is not None \
            else LayerConfig(weight_bits=int(bits))
    return config.replace(layer_overrides=overrides)


@dataclasses.dataclass
class LayerSensitivity:
    """One row of a :class:`SensitivityResult`."""

    layer: str                    # relayq's name (conv2d_3)
    source: str | None            # the user's name (ONNX node, torch module) where known
    op: str
    weight_bits: int | None       # as configured (None for layers without weights)
    act_bits: int | None
    sqnr_db: float | None         # accumulated SQNR at the layer's output in the quantized model
    metric: float | None          # the metric with the layer changed (None where not measured)
    delta: float | None           # metric - the quantized model's metric
    cosine: float | None = None   # output cosine with the float model, the layer changed
    note: str | None = None       # why the metric is missing, where it is


@dataclasses.dataclass
class SensitivityResult:
    """What :func:`sensitivity` returns: rows per layer in graph order, and the reference numbers."""

    rows: list
    metric_name: str
    base_metric: float            # the model as quantized
    base_cosine: float
    change: str                   # "float" or "w4" ...: what was done to each layer in turn
    samples: int
    seconds: float
    point_sqnr_db: dict = dataclasses.field(default_factory=dict)     # every activation point

    def __getitem__(self, layer: str) -> LayerSensitivity:
        for r in self.rows:
            if r.layer == layer or r.source == layer:
                return r
        raise KeyError(layer)

    def ranking(self) -> list:
        """Rows with a measured delta, least harmful change first (highest metric, then cosine)."""
        rows = [r for r in self.rows if r.metric is not None]
        return sorted(rows, key=lambda r: (-r.metric, -(r.cosine if r.cosine is not None else 0.0)))

    def worst(self, n: int = 5) -> list:
        """The ``n`` layers of lowest SQNR (the noisiest outputs)."""
        rows = [r for r in self.rows if r.sqnr_db is not None and np.isfinite(r.sqnr_db)]
        return sorted(rows, key=lambda r: r.sqnr_db)[:n]

    def to_dict(self) -> dict:
        return {"metric": self.metric_name, "base_metric": self.base_metric, "base_cosine": self.base_cosine,
                "change": self.change, "samples": self.samples, "seconds": self.seconds,
                "layers": [dataclasses.asdict(r) for r in self.rows]}

    def table(self) -> str:
        """A text table, one row per layer in graph order.

        Example::

            print(result.table())
        """
        when = "layer float" if self.change == "float" else f"layer at {self.change}"
        head = (f"{'layer':<18} {'source':<34} {'op':<16} {'W/A':>5} {'SQNR dB':>8} "
                f"{self.metric_name + ' ' + when:>28} {'delta':>8}")
        lines = [f"relayq sensitivity: {self.metric_name} of the quantized model {self.base_metric:.4f} "
                 f"(output cosine {self.base_cosine:.4f}) on {self.samples} samples; each {when} in turn "
                 f"({self.seconds:.0f} s)", head, "-" * len(head)]
        for r in self.rows:
            wa = f"{r.weight_bits or '-'}/{r.act_bits or '-'}"
            src = (r.source or "")[-34:]
            sq = "" if r.sqnr_db is None else ("inf" if not np.isfinite(r.sqnr_db) else f"{r.sqnr_db:.1f}")
            m = "" if r.metric is None else f"{r.metric:.4f}"
            d = "" if r.delta is None else f"{r.delta:+.4f}"
            lines.append(f"{r.layer:<18} {src:<34} {r.op:<16} {wa:>5} {sq:>8} {m:>28} {d:>8}")
        return "\n".join(lines)


class _Runner:
    """Runs compiled models over the data, keeping the float reference."""

    def __init__(self, batches):
        self.batches = batches

    def run(self, fn) -> list:
        """Every output of ``fn`` over all batches, concatenated along the batch axis."""
        outs = [fn(*arrays) for arrays in self.batches]
        return [np.concatenate([np.reshape(o[i], (-1,) + np.shape(o[i])[1:]) if np.ndim(o[i]) else
                                np.reshape(o[i], (1,)) for o in outs]) for i in range(len(outs[0]))]


def _sqnr_acc(ref, out) -> float:
    ref = np.asarray(ref, np.float64)
    noise = float(np.sum((ref - np.asarray(out, np.float64)) ** 2))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(float(np.sum(ref ** 2)), 1e-300) / noise))


def model_outputs(qmodel, batches) -> tuple:
    """``(float outputs, quantized outputs)`` of the model's first output over ``batches``."""
    runner = _Runner(batches)
    ref = runner.run(_host_function(qmodel.prepared))[0]
    out = runner.run(_host_function(qmodel.realized))[0]
    return ref, out


def sensitivity(qmodel, data, metric=None, bits: int | None = None, layers=None,
                show_progress: bool = True) -> SensitivityResult:
    """Per-layer SQNR and the metric with one layer at a time kept float (or at ``bits`` weight bits).

    Args:
        qmodel: a :class:`~relayq.api.QuantizedModel`.
        data: an iterable of input batches (as for calibration); every variant runs all of it.
        metric: ``metric(reference, output) -> float``, higher is better, on the first output over all
            the data (``reference`` is the float model's). Default: top-1 agreement with the float
            model for classifier outputs, else the output cosine.
        bits: None to keep each layer in float in turn; an int to set its *weights* to that width
            (activations and every other layer as configured; layers without weights are left out).
        layers: the layers to vary (relayq names; default every quantized layer).
        show_progress: a progress line per layer on stderr.

    Returns a :class:`SensitivityResult` (``.table()``, ``.ranking()``, ``.worst()``).

    Example::

        res = relayq.analysis.sensitivity(qmodel, batches)                 # each layer float in turn
        res4 = relayq.analysis.sensitivity(qmodel, batches, bits=4)        # each layer's weights at 4 bits
        print(res.table())
    """
    start = time.perf_counter()
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, np.integer))):
        raise ConfigError(f"bits must be None (keep float) or an int width, got {bits!r}")
    variants = Variants(qmodel)
    batches = as_batches(data, input_specs(qmodel.prepared), "sensitivity data")
    runner = _Runner(batches)
    all_layers = layers_of(qmodel.annotated)
    if layers is None:
        layers = list(all_layers)
    unknown = [n for n in layers if n not in all_layers]
    if unknown:
        raise ConfigError(f"sensitivity: {unknown[:3]} are not quantized layers of the model (layers: "
                          f"{list(all_layers)[:8]}...)")
    # The float model's value at every activation point, and the quantized model's.
    tmod, tap_names = tap_module(qmodel.annotated)
    float_taps = runner.run(_host_function(_fast_float(tmod)))
    ref = float_taps[len(tap_names)]
    qmod, q_names = _tap_realized(qmodel.annotated, qmodel.qpoints)
    q_taps = runner.run(_host_function(qmod))
    out = q_taps[len(q_names)]
    float_at = dict(zip(tap_names, float_taps))
    point_sqnr = {name: _sqnr_acc(float_at[name], v) for name, v in zip(q_names, q_taps) if name in float_at}
    metric_name, metric_fn = ("custom", metric) if metric is not None else default_metric(ref)
    if metric is not None:
        metric_name = getattr(metric, "__name__", "metric")
    base = float(metric_fn(ref, out))
    base_cos = output_cosine(ref, out)
    sources = layer_sources(qmodel.annotated)
    compute = [n for n, t in all_layers.items() if t in ("conv2d", "dense")]
    rows, skipped = [], []
    with Progress("sensitivity, layer", total=len(layers), enabled=show_progress) as prog:
        for name in all_layers:
            op = all_layers[name]
            src = trusted_source(name, sources.get(name))
            user = (src.node or src.weight) if src is not None else None
            resolved = qmodel.config.layer(name, op, src.names() if src else ())
            wbits = qmodel.qpoints[f"{name}:w"].bits if f"{name}:w" in qmodel.qpoints else None
            sq = point_sqnr.get(f"{name}:out")
            if sq is None and compute and name == compute[-1]:
                sq = _sqnr_acc(ref, out)
            row = LayerSensitivity(name, user, op, wbits, resolved.act_bits if op not in ("max_pool2d",) else None,
                                   sq, None, None)
            rows.append(row)
            if name not in layers:
                continue
            if bits is not None and (op in _WEIGHTLESS or wbits is None):
                prog.step(note=f"{name}: no weights")
                continue
            try:
                _, _, realized = variants.make(variants.config_for(name, bits))
            except ConfigError as e:
                # Keeping this layer float gives a later op an input point on a tensor calibration never
                # observed (a transformer's merges): it cannot be derived without running the data again.
                row.note = f"not measured: {e}"
                skipped.append(name)
                prog.step(note=f"{name}: not measured")
                continue
            got = runner.run(_host_function(realized))[0]
            row.metric = float(metric_fn(ref, got))
            row.delta = row.metric - base
            row.cosine = output_cosine(ref, got)
            prog.step(note=f"{name} {row.delta:+.4f}")
    if skipped:
        warnings.warn(f"relayq: sensitivity: {len(skipped)} layer(s) not measured ({', '.join(skipped[:5])}"
                      f"{' ...' if len(skipped) > 5 else ''}): changing them needs statistics of tensors calibration "
                      "did not observe; quantize the model again with that configuration to measure them",
                      CalibrationWarning, stacklevel=2)
    return SensitivityResult(rows, metric_name, base, base_cos, "float" if bits is None else f"w{bits}",
                             int(ref.shape[0]) if np.ndim(ref) else 1, time.perf_counter() - start, point_sqnr)
