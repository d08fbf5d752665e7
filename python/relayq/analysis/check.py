"""The accuracy check after calibration: does the quantized model still compute the float model?

A bad calibration does not fail; it quietly returns a model that computes something else (2-bit
activations, a collapsed scale). :func:`check_accuracy` runs the quantized model on the last
calibration batches, whose float outputs and point values calibration has just computed anyway
(:class:`HeldBatches` keeps them), and measures:

* ``cosine``: the cosine similarity of each float output with the quantized one (the lowest is kept);
* ``top1_agreement``: for classifier-like outputs (2-D float, one row per sample), the fraction of
  samples whose argmax is unchanged;
* ``sqnr_db``: per quantization point, the signal-to-quantization-noise ratio of the point's own
  quantization, ``10 log10(sum x^2 / sum (x - q(x))^2)``: activations on the last batch's float
  values, weights on the constants. It names the culprits; it does not include the noise that flows
  in from earlier layers.

Below :data:`MIN_COSINE` or :data:`MIN_TOP1_AGREEMENT` it warns with an
:class:`~relayq.errors.AccuracyCollapseWarning` naming the points of lowest SQNR.

The check batches were also calibration batches: the check measures quantization error, not how well
the thresholds generalize, and holding them back would change the calibration the user asked for.
The quantized model is run as the realized integer module, built for the host with relayq's kernels:
it computes the simulated module's outputs bit for bit (a tested contract) and compiles faster.

Example::

    held = HeldBatches()
    simulated, qpoints = calibrate(annotated, batches, "kl", record=held)
    realized = realize(annotated, qpoints)
    report = check_accuracy(annotated, realized, qpoints, held)
    print(report["cosine"], report["top1_agreement"], report["worst_points"])
"""
from __future__ import annotations

import collections
import time
import warnings

import numpy as np
import tvm

from .. import qmath
from ..errors import AccuracyCollapseWarning
from ..runtime import HostFunction, host_target
from ..transform.common import bindings, const_value, main_function, simq_info

#: Output cosine similarity below which the quantized model is reported as collapsed. An 8-bit model
#: stays above 0.99 on the models relayq is tested on; the 2-bit collapses of issue 8 were 0.75-0.90.
MIN_COSINE = 0.95
#: Top-1 agreement with the float model below which the model is reported as collapsed (8-bit models
#: agree on 97-100 % of the digits and ImageNet samples; W8A2 agreed on 21 %, W2A2 on 29 %).
MIN_TOP1_AGREEMENT = 0.8
#: Fewer samples than this make top-1 agreement too coarse to warn on (one flip of 8 is 12.5 %): it is
#: measured and reported, but only the cosine decides.
MIN_TOP1_SAMPLES = 16
#: How many of the last calibration batches the check runs on.
CHECK_BATCHES = 4
#: How many points of lowest SQNR the warning names.
WORST_POINTS = 3


class HeldBatches:
    """A ``record`` callback for :func:`relayq.transform.calibrate.calibrate`: keeps the inputs and
    float outputs of the last ``n`` batches, and the point values (taps) of the last one."""

    def __init__(self, n: int = CHECK_BATCHES):
        self.batches = collections.deque(maxlen=n)
        self.taps: dict = {}

    def __call__(self, arrays, taps: dict, outputs: list) -> None:
        self.batches.append((list(arrays), list(outputs)))
        self.taps = dict(taps)


def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened (1.0 when both are zero)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def sqnr_db(x, xq) -> float:
    """``10 log10(sum x^2 / sum (x - xq)^2)`` in dB; ``inf`` where the quantization is exact."""
    x = np.asarray(x, np.float64)
    noise = float(np.sum((x - np.asarray(xq, np.float64)) ** 2))
    if noise == 0.0:
        return float("inf")
    signal = float(np.sum(x ** 2))
    return float(10.0 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def _fake_quant(x, p):
    axis = None if p.axis < 0 else p.axis
    codes = qmath.quantize(x, p.scale, p.bits, p.signed, p.zero_point, axis=axis)
    scale = np.asarray(p.scale, np.float32)
    if axis is not None and scale.ndim == 1:
        shape = [1] * np.ndim(x)
        shape[axis] = -1
        scale = scale.reshape(shape)
    return qmath.dequantize(codes, scale, p.zero_point)


def point_sqnr(annotated: tvm.IRModule, qpoints: dict, taps: dict) -> dict:
    """SQNR (dB) of every point's own quantization: weights from the constants, activations from ``taps``."""
    out = {}
    for b in bindings(main_function(annotated)):
        info = simq_info(b.value)
        if info is None or info[1] not in qpoints or info[1] in out:
            continue
        p = qpoints[info[1]]
        if p.role == "weight":
            x = const_value(info[0])
        elif p.name in taps:
            x = taps[p.name]
        else:
            continue
        out[p.name] = sqnr_db(x, _fake_quant(x, p))
    return out


def _host_function(realized: tvm.IRModule) -> HostFunction:
    """``realized`` compiled for the host as ``relayq.build`` does (relayq's kernels, then TVM)."""
    from ..backend import presets

    target = host_target()
    mod = presets.lower_for(realized, target, "host")
    return HostFunction(tvm.compile(mod, target=target, relax_pipeline=presets.relax_pipeline(target)))


def _as_list(out) -> list:
    return [out] if isinstance(out, np.ndarray) else list(out)


def measure(annotated: tvm.IRModule, realized: tvm.IRModule, qpoints: dict, held: HeldBatches,
            compile_model=None) -> dict:
    """The check's numbers, without warning: see the module docstring for the keys.

    ``compile_model``: a function of no argument returning the quantized model as a callable (numpy
    in, an array or a list of arrays out); by default ``realized`` is compiled for the host.
    """
    start = time.perf_counter()
    fn = compile_model() if compile_model is not None else _host_function(realized)
    floats, quants = [], []
    samples = 0
    for arrays, ref in held.batches:
        floats.append(ref)
        quants.append(_as_list(fn(*arrays)))
        samples += int(arrays[0].shape[0]) if arrays and np.ndim(arrays[0]) else 1
    per_output, top1 = [], []
    for i in range(len(floats[0]) if floats else 0):
        f = np.concatenate([np.reshape(r[i], (-1,)) for r in floats])
        if f.dtype.kind != "f":
            continue
        q = np.concatenate([np.reshape(r[i], (-1,)) for r in quants])
        per_output.append(cosine(f, q))
        if np.ndim(floats[0][i]) == 2 and floats[0][i].shape[1] >= 2:
            hit = np.concatenate([r[i].argmax(axis=1) == s[i].argmax(axis=1) for r, s in zip(floats, quants)])
            top1.append(float(hit.mean()))
    sqnr = point_sqnr(annotated, qpoints, held.taps)
    finite = sorted((v, k) for k, v in sqnr.items() if v != float("inf"))     # exact points are no culprits
    return {
        "batches": len(held.batches), "samples": samples,
        "cosine": min(per_output) if per_output else None, "cosine_per_output": per_output,
        "top1_agreement": min(top1) if top1 else None,
        "sqnr_db": sqnr, "worst_points": [(k, v) for v, k in finite[:WORST_POINTS]],
        "seconds": time.perf_counter() - start,
    }


def collapsed(report: dict) -> bool:
    """True when a :func:`measure` report is below :data:`MIN_COSINE` or :data:`MIN_TOP1_AGREEMENT`."""
    cos, top1 = report.get("cosine"), report.get("top1_agreement")
    if cos is not None and cos < MIN_COSINE:
        return True
    return top1 is not None and report.get("samples", 0) >= MIN_TOP1_SAMPLES and top1 < MIN_TOP1_AGREEMENT


def describe(report: dict) -> str:
    """One line: ``output cosine 0.998, top-1 agreement 100% on 16 samples; lowest SQNR: ...``."""
    if "skipped" in report:
        return f"accuracy check skipped: {report['skipped']}"
    parts = []
    if report.get("cosine") is not None:
        parts.append(f"output cosine {report['cosine']:.4f}")
    if report.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {report['top1_agreement']:.0%}")
    text = ", ".join(parts) or "no float output to compare"
    text += f" on {report.get('samples', 0)} samples ({report.get('batches', 0)} calibration batches)"
    if report.get("worst_points"):
        text += "; lowest SQNR: " + ", ".join(f"{k} {v:.1f} dB" for k, v in report["worst_points"])
    return text


def check_accuracy(annotated: tvm.IRModule, realized: tvm.IRModule, qpoints: dict, held: HeldBatches,
                   compile_model=None, warn: bool = True) -> dict:
    """Measure the quantized model against the float model on the held batches; warn on a collapse.

    Returns the :func:`measure` report with ``collapsed`` added, or ``{"skipped": reason}`` when the
    quantized model could not be compiled or run for the host (``build`` will say why).
    """
    if not held.batches:
        return {"skipped": "no calibration batch was run"}
    try:
        report = measure(annotated, realized, qpoints, held, compile_model)
    except Exception as e:  # noqa: BLE001 - the check must never turn a good quantization into a failure
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    report["collapsed"] = collapsed(report)
    if report["collapsed"] and warn:
        warnings.warn(f"relayq: the quantized model has collapsed: {describe(report)} (thresholds: cosine "
                      f">= {MIN_COSINE}, top-1 agreement >= {MIN_TOP1_AGREEMENT:.0%}). Raise the bit widths of "
                      "the points named, or keep their layers in float (QConfig.layer_overrides / skip_layers)",
                      AccuracyCollapseWarning, stacklevel=3)
    return report
