"""``QuantizedModel.report(path)``: one HTML page with plots, for a person deciding what to change.

The page (PNG plots embedded as base64; the same PNGs are also written beside it, in
``<name>_files/``) shows:

* the accuracy check numbers (``qmodel.accuracy``: output cosine, top-1 agreement, worst points);
* **per-layer SQNR**, layers in graph order, labelled with the user's names (relayq's beside them),
  the worst highlighted: the accumulated SQNR of :func:`~relayq.analysis.sensitivity` when a
  sensitivity result is given, else each point's own quantization SQNR from the accuracy check;
* **activation histograms** of the worst layers' inputs / outputs (the compact calibration
  histograms kept in ``qmodel.calibration_stats``), log scale, with the chosen thresholds drawn;
* the **sensitivity table** and a bar chart of its deltas, when a result is given.

matplotlib is an optional extra (``pip install relayq[plots]``); without it :func:`write_report`
raises :class:`MissingPlotPackageError` saying so.

Example::

    res = qmodel.sensitivity(batches)
    qmodel.report("mobilenet_w4a8.html")
"""
from __future__ import annotations

import base64
import html
import io
import os

import numpy as np

from ..errors import RelayqError
from ..transform.annotate import layer_sources, layers as layers_of
from .sensitivity import trusted_source

#: Colours: ordinary bars, the worst layers, thresholds.
_BAR, _WORST, _THRESH = "#4C72B0", "#C44E52", "#DD8452"
#: Height per layer of the horizontal bar charts (inches): 9-point labels do not overlap above 0.18.
_ROW_INCHES = 0.2
#: Layers marked red in the sensitivity chart.
_SENSITIVE_SHOWN = 3
#: Longest label on a bar chart axis (characters); longer user names keep their end (the distinctive part).
_LABEL_CHARS = 44


class MissingPlotPackageError(RelayqError, ImportError):
    """matplotlib, which the report's plots need, is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingPlotPackageError("QuantizedModel.report needs matplotlib, which is not installed: "
                                      "pip install 'relayq[plots]' (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _label(layer: str, source) -> str:
    source = trusted_source(layer, source)
    user = (source.node or source.weight) if source is not None else None
    if not user:
        return layer
    if len(user) > _LABEL_CHARS - len(layer) - 3:
        user = "…" + user[-(_LABEL_CHARS - len(layer) - 4):]
    return f"{user} ({layer})"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _layers(qmodel) -> list:
    """Layer names in graph order (from the points where the model has no annotated module: an artefact)."""
    if getattr(qmodel, "annotated", None) is not None:
        return list(layers_of(qmodel.annotated))
    return list(dict.fromkeys(n.rsplit(":", 1)[0] for n in qmodel.qpoints))


def _sources(qmodel) -> dict:
    return layer_sources(qmodel.annotated) if getattr(qmodel, "annotated", None) is not None else {}


def layer_sqnr(qmodel, sens=None) -> tuple:
    """``(title, {layer: SQNR dB})`` in graph order: accumulated (sensitivity) or per point (check)."""
    names = _layers(qmodel)
    if sens is not None:
        vals = {r.layer: r.sqnr_db for r in sens.rows if r.sqnr_db is not None}
        return "accumulated SQNR at each layer's output (quantized vs float model)", \
            {n: vals[n] for n in names if n in vals}
    own = (qmodel.accuracy or {}).get("sqnr_db") or {}
    out = {}
    for n in names:
        for point in (f"{n}:out", f"{n}:w"):
            if point in own:
                out[n] = own[point]
                break
    return "SQNR of each layer's own quantization (output activation, else weights), accuracy check", out


def sqnr_chart(qmodel, sens=None, highlight: int = 5):
    """The per-layer SQNR bar chart as a matplotlib figure (horizontal bars, graph order top down)."""
    plt = _pyplot()
    title, vals = layer_sqnr(qmodel, sens)
    if not vals:
        return None, []
    sources = _sources(qmodel)
    names = list(vals)
    finite = np.array([v if np.isfinite(v) else np.nan for v in vals.values()], dtype=float)
    cap = np.nanmax(finite) if np.any(np.isfinite(finite)) else 1.0
    shown = np.where(np.isnan(finite), cap, finite)
    worst = set(np.array(names)[np.argsort(np.where(np.isnan(finite), np.inf, finite))[:highlight]])
    fig, ax = plt.subplots(figsize=(9, max(2.5, _ROW_INCHES * len(names) + 1.2)))
    y = np.arange(len(names))
    ax.barh(y, shown, color=[_WORST if n in worst else _BAR for n in names], height=0.75)
    ax.set_yticks(y)
    ax.set_yticklabels([_label(n, sources.get(n)) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB), higher is better")
    ax.set_title(title, fontsize=10)
    for yi, v, n in zip(y, shown, names):
        if n in worst:
            ax.text(v, yi, f" {v:.1f}", va="center", fontsize=8, color=_WORST)
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(len(names) - 0.5, -0.5)
    fig.tight_layout()
    return fig, [n for n in names if n in worst]


def _point_threshold(p):
    t = p.threshold
    if isinstance(t, tuple):
        return float(t[0]), float(t[1])
    t = float(np.max(t)) if np.ndim(t) else float(t)
    return -t, t


def histogram_chart(qmodel, layers_to_show: list):
    """Activation histograms (log counts) of the given layers' points, thresholds as dashed lines."""
    plt = _pyplot()
    stats = getattr(qmodel, "calibration_stats", None)
    sources = _sources(qmodel)
    panels = []
    for layer in layers_to_show:
        for suffix in (":out", ":in0", ":in1"):
            point = qmodel.qpoints.get(layer + suffix)
            hist = stats.compact_histogram(layer + suffix) if stats is not None and point is not None else None
            if hist is not None:
                panels.append((layer, point, hist))
                break
    if not panels:
        return None
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(10, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (layer, point, (counts, edges)) in zip(axes.ravel(), panels):
        centers = (edges[:-1] + edges[1:]) / 2
        nz = np.nonzero(counts)[0]
        # Only bins that hold values are drawn: an empty bin has no height on a log scale.
        ax.bar(centers[nz], counts[nz], width=edges[1] - edges[0], color=_BAR, log=True)
        lo, hi = _point_threshold(point)
        data_lo = float(edges[nz[0]]) if len(nz) else lo
        data_hi = float(edges[nz[-1] + 1]) if len(nz) else hi
        span = max(data_hi - data_lo, 1e-12)
        # The view is the data's range; a threshold far outside it (the unused negative half of a
        # symmetric code on ReLU outputs) is named in the title instead of squeezing the data.
        view_lo = min(data_lo, lo) if lo >= data_lo - 0.25 * span else data_lo
        view_hi = max(data_hi, hi) if hi <= data_hi + 0.25 * span else data_hi
        off = []
        for t in (lo, hi):
            if view_lo - 0.05 * span <= t <= view_hi + 0.05 * span:
                ax.axvline(t, color=_THRESH, linestyle="--", linewidth=1.5)
            else:
                off.append(f"{t:.3g}")
        clipped = counts[(centers < lo) | (centers > hi)].sum() / max(counts.sum(), 1)
        ax.set_title(f"{_label(layer, sources.get(layer))}\n{point.name}: {point.method} threshold "
                     f"[{lo:.3g}, {hi:.3g}], {point.bits} bits, {clipped:.2%} of values clipped"
                     + (f"\n(threshold {', '.join(off)} outside the data, not drawn)" if off else ""), fontsize=8)
        ax.set_xlabel("activation value (calibration data)", fontsize=8)
        ax.set_ylabel("count (log)", fontsize=8)
        ax.tick_params(labelsize=7)
        pad = 0.03 * (view_hi - view_lo)
        ax.set_xlim(view_lo - pad, view_hi + pad)
    fig.tight_layout()
    return fig


def delta_chart(qmodel, sens):
    """Bar charts of the sensitivity per layer (graph order): the metric's change, and the output cosine's
    change beside it (it still moves where a coarse metric such as top-1 agreement on few samples does not)."""
    plt = _pyplot()
    rows = [r for r in sens.rows if r.delta is not None]
    if not rows:
        return None
    sources = _sources(qmodel)
    agreement = "agreement" in sens.metric_name
    panels = [(np.array([r.delta for r in rows]) * (100 if agreement else 1),
               f"change of {sens.metric_name}" + (" (points)" if agreement else ""))]
    if sens.metric_name != "output cosine" and all(r.cosine is not None for r in rows):
        panels.append((np.array([r.cosine - sens.base_cosine for r in rows]), "change of output cosine"))
    fig, axes = plt.subplots(1, len(panels), sharey=True, squeeze=False,
                             figsize=(5.5 * len(panels) + 2.5, max(2.5, _ROW_INCHES * len(rows) + 1.4)))
    y = np.arange(len(rows))
    # Red marks the most sensitive layers: those float helps most (float mode), or lowering hurts most.
    sign = 1 if sens.change == "float" else -1
    for ax, (d, xlabel) in zip(axes[0], panels):
        order = np.argsort(-sign * d, kind="stable")
        top = {int(i) for i in order[:_SENSITIVE_SHOWN] if sign * d[i] > 0}
        ax.barh(y, d, color=[_WORST if i in top else _BAR for i in range(len(d))], height=0.75)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
        lo, hi = min(float(d.min()), 0.0), max(float(d.max()), 0.0)
        pad = 0.2 * (hi - lo) if hi > lo else 1.0
        ax.set_xlim(lo - (pad if lo < 0 else 0.05 * pad), hi + (pad if hi > 0 else 0.05 * pad))
        for yi, v in zip(y, d):
            ax.text(v, yi, f" {v:+.3g} " if v else " 0", va="center", ha="left" if v >= 0 else "right", fontsize=7)
    ax0 = axes[0][0]
    ax0.set_yticks(y)
    ax0.set_yticklabels([_label(r.layer, sources.get(r.layer)) for r in rows], fontsize=8)
    ax0.set_ylim(len(rows) - 0.5, -0.5)
    what = "kept float" if sens.change == "float" else f"weights at {sens.change[1:]} bits"
    fig.suptitle(f"each layer {what} in turn (red: the {_SENSITIVE_SHOWN} most sensitive); as quantized: {sens.metric_name} {sens.base_metric:.4f}, output cosine "
                 f"{sens.base_cosine:.4f} ({sens.samples} samples)", fontsize=10)
    fig.tight_layout()
    return fig


def _accuracy_html(acc) -> str:
    if not acc:
        return "<p>No accuracy check (QConfig.check_accuracy was off).</p>"
    if "skipped" in acc:
        return f"<p>Accuracy check skipped: {html.escape(str(acc['skipped']))}</p>"
    rows = [("output cosine (lowest output)", acc.get("cosine")), ("top-1 agreement with float", acc.get("top1_agreement")),
            ("samples", acc.get("samples")), ("calibration batches checked", acc.get("batches")),
            ("collapsed", acc.get("collapsed"))]
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{'' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)}"
                   f"</td></tr>" for k, v in rows)
    worst = ", ".join(f"{html.escape(k)} {v:.1f} dB" for k, v in acc.get("worst_points") or [])
    return f"<table>{body}<tr><td>lowest point SQNR</td><td>{worst}</td></tr></table>"


def _sensitivity_html(sens) -> str:
    head = ("<tr><th>layer</th><th>source</th><th>op</th><th>W/A bits</th><th>SQNR dB</th>"
            f"<th>{html.escape(sens.metric_name)} ({'float' if sens.change == 'float' else sens.change})</th>"
            "<th>delta</th></tr>")
    body = []
    for r in sens.rows:
        sq = "" if r.sqnr_db is None else ("inf" if not np.isfinite(r.sqnr_db) else f"{r.sqnr_db:.1f}")
        body.append(f"<tr><td>{r.layer}</td><td>{html.escape(r.source or '')}</td><td>{r.op}</td>"
                    f"<td>{r.weight_bits or '-'}/{r.act_bits or '-'}</td><td>{sq}</td>"
                    f"<td>{'' if r.metric is None else f'{r.metric:.4f}'}</td>"
                    f"<td>{'' if r.delta is None else f'{r.delta:+.4f}'}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _points_html(qmodel) -> str:
    rows = []
    for p in qmodel.qpoints.values():
        lo, hi = _point_threshold(p)
        rows.append(f"<tr><td>{html.escape(p.name)}</td><td>{p.role}</td><td>{p.bits}</td><td>{html.escape(str(p.method))}"
                    f"</td><td>[{lo:.4g}, {hi:.4g}]</td><td>{'per-channel' if np.ndim(p.scale) else 'per-tensor'}</td></tr>")
    return ("<table><tr><th>point</th><th>role</th><th>bits</th><th>method</th><th>range (max over channels)</th>"
            f"<th>scale</th></tr>{''.join(rows)}</table>")


def write_report(qmodel, path, sens=None, worst: int = 4) -> str:
    """Write the report (see the module docstring); returns ``path``.

    Example::

        write_report(qmodel, "report.html", sensitivity_result)
    """
    plt = _pyplot()
    path = str(path)
    stem = os.path.splitext(path)[0]
    files_dir = stem + "_files"
    os.makedirs(files_dir, exist_ok=True)
    figures = []
    fig, worst_layers = sqnr_chart(qmodel, sens, highlight=worst)
    if fig is not None:
        figures.append(("sqnr", "Per-layer SQNR", fig, layer_sqnr(qmodel, sens)[0] + "; the "
                        f"{len(worst_layers)} lowest in red"))
    hfig = histogram_chart(qmodel, worst_layers)
    if hfig is not None:
        figures.append(("histograms", "Activation histograms of the lowest-SQNR layers, with thresholds", hfig,
                        "calibration histograms (log counts); dashed: the chosen clipping thresholds"))
    if sens is not None:
        dfig = delta_chart(qmodel, sens)
        if dfig is not None:
            figures.append(("sensitivity", "Sensitivity", dfig,
                            f"the change of {sens.metric_name} with each layer changed in turn (positive: "
                            "that layer costs accuracy as quantized)"))
    parts = []
    for key, title, f, caption in figures:
        data = _png(f)
        plt.close(f)
        with open(os.path.join(files_dir, f"{key}.png"), "wb") as fh:
            fh.write(data)
        parts.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p><img alt='{key}' "
                     f"src='data:image/png;base64,{base64.b64encode(data).decode()}'/>")
    cfg = qmodel.config
    if cfg is None:
        scheme = ("read from an artefact: it keeps the integer model and its points, not the float model, so "
                  "there is no SQNR or histogram to show (they are in the report of the model as quantized)")
    else:
        scheme = (f"W{cfg.weight_bits}A{cfg.act_bits} {'per-channel' if cfg.per_channel else 'per-tensor'}, "
                  f"{'symmetric' if cfg.act_symmetric else 'asymmetric'} activations, calibration "
                  f"{qmodel.calibration!r}")
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>relayq report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}} img{{max-width:100%}}</style></head><body>
<h1>relayq quantization report</h1>
<p>{html.escape(scheme)}; {len(_layers(qmodel))} quantized layers, {len(qmodel.qpoints)} points.</p>
<h2>Accuracy check</h2>{_accuracy_html(qmodel.accuracy)}
{''.join(parts)}
{'<h2>Sensitivity table</h2>' + _sensitivity_html(sens) if sens is not None else ''}
<h2>Quantization points</h2>{_points_html(qmodel)}
</body></html>"""
    with open(path, "w") as f:
        f.write(page)
    return path
