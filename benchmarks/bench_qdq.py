"""Why ONNX Runtime's run of relayq's QDQ export differs from relayq, and what the exact export gives.

MobileNetV2 (real weights) W8A8 per-channel, kl. Three measurements:

1. **Per point, chained and isolated.** ONNX Runtime runs the QDQ export with every QuantizeLinear as a
   graph output. *Chained*: the plain run. *Isolated*: every activation DequantizeLinear reads relayq's
   codes (fed as graph inputs), so each layer sees relayq's input and only its own arithmetic can
   differ. Each column: the fraction of codes that differ from relayq's integer reference
   (:func:`relayq.analysis.reference.reference_run`).
2. **Flip sensitivity.** relayq's own integer reference with a random +-1 flip of a code at rate r at
   every activation point, against the clean run: top-1 agreement and logit cosine.
3. **The two exports against relayq's compiled model** on the 120 photos: top-1 agreement and cosine
   (``--exports``).

    PYTHONPATH=python python3 benchmarks/bench_qdq.py [--calib 100] [--images 4] [--flip-images 20] [--exports]

Writes ``benchmarks/results/qdq.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import relayq  # noqa: E402
from relayq import qmath  # noqa: E402
from relayq.analysis import reference  # noqa: E402


def cosine(a, b) -> float:
    a, b = np.ravel(a), np.ravel(b)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def tapped_models(qdq_path: str, tmp: str) -> tuple:
    """(chained model path, isolated model path, {Q output tensor: point name}, {tensor: element type})."""
    import onnx

    model = onnx.load(qdq_path)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    point_of, elem = {}, {}
    for n in g.node:
        # An average pool's pair reuses its input's point name: not a point of relayq's own.
        if n.op_type == "QuantizeLinear" and not (n.input[0] in producer and producer[n.input[0]].op_type in
                                                  ("GlobalAveragePool", "AveragePool")):
            point_of[n.output[0]] = n.doc_string.replace("relayq point ", "")
            elem[n.output[0]] = inits[n.input[2]].data_type
            g.output.append(onnx.helper.make_empty_tensor_value_info(n.output[0]))
    chained = os.path.join(tmp, "chained.onnx")
    onnx.save(model, chained)
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in point_of:
            fed = n.input[0] + "_relayq"
            if fed not in {i.name for i in g.input}:
                g.input.append(onnx.helper.make_tensor_value_info(fed, elem[n.input[0]], None))
            n.input[0] = fed
    isolated = os.path.join(tmp, "isolated.onnx")
    onnx.save(model, isolated)
    return chained, isolated, point_of, elem


def per_point(q, images, tmp) -> dict:
    import onnx
    import onnxruntime as ort

    qdq = q.export_onnx(os.path.join(tmp, "qdq.onnx"))
    chained, isolated, point_of, elem = tapped_models(qdq, tmp)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s_chain, s_iso = ort.InferenceSession(chained, so), ort.InferenceSession(isolated, so)
    names = [o.name for o in s_chain.get_outputs()]
    fed = {i.name for i in s_iso.get_inputs()}
    stats = {p: {"chained": 0, "isolated": 0, "codes": 0} for p in point_of.values()}
    for x in images:
        x = x[None]
        _, codes = reference.reference_run(q.annotated, q.qpoints, x, return_codes=True)
        feed = {"input": x}
        for t, p in point_of.items():
            if t + "_relayq" in fed:
                feed[t + "_relayq"] = codes[p].astype(np.int8 if elem[t] == onnx.TensorProto.INT8 else np.uint8)
        outs = {"chained": dict(zip(names, s_chain.run(None, {"input": x}))),
                "isolated": dict(zip(names, s_iso.run(None, feed)))}
        for t, p in point_of.items():
            ref = codes[p].astype(np.int64).ravel()
            for kind in ("chained", "isolated"):
                stats[p][kind] += int((outs[kind][t].astype(np.int64).ravel() != ref).sum())
            stats[p]["codes"] += ref.size
    return stats


def flips(q, images, rates) -> list:
    """relayq's reference with random +-1 flips at ``rate`` at every activation point vs the clean run."""
    original = reference._finalize
    rng = np.random.RandomState(0)
    state = {"rate": 0.0}

    def flipped(val, scale, bits, zp=0, signed=True):
        out = original(val, scale, bits, zp, signed)
        if state["rate"] and not isinstance(val, np.ndarray):       # not the input's quantization
            c = out.codes.copy()
            mask = rng.rand(*c.shape) < state["rate"]
            lo, hi = qmath.qrange(bits, signed)
            c[mask] = np.clip(c[mask] + rng.choice([-1, 1], int(mask.sum())), lo, hi)
            out = out.like(c)
        return out

    reference._finalize = flipped
    try:
        clean = [reference.reference_run(q.annotated, q.qpoints, x[None]) for x in images]
        rows = []
        for rate in rates:
            state["rate"] = rate
            outs = [reference.reference_run(q.annotated, q.qpoints, x[None]) for x in images]
            cos = [cosine(a, b) for a, b in zip(outs, clean)]
            rows.append({"rate": rate, "agreement": float(np.mean([a.argmax() == b.argmax() for a, b in zip(outs, clean)])),
                         "mean_cosine": float(np.mean(cos)), "min_cosine": float(np.min(cos))})
            print(f"flip rate {rate:g}: top-1 agreement with the clean run {rows[-1]['agreement'] * 100:.1f}%, "
                  f"cosine mean {rows[-1]['mean_cosine']:.4f}, min {rows[-1]['min_cosine']:.4f}", flush=True)
        return rows
    finally:
        reference._finalize = original


def exports(q, everything, tmp) -> dict:
    import onnxruntime as ort

    lib = relayq.build(q)
    ref = np.concatenate([lib(everything[i:i + 1]) for i in range(len(everything))])
    out = {}
    for kind, exact in (("qdq", False), ("exact", True)):
        sess = ort.InferenceSession(q.export_onnx(os.path.join(tmp, f"{kind}.onnx"), exact=exact))
        got = np.concatenate([sess.run(None, {"input": everything[i:i + 1]})[0] for i in range(len(everything))])
        cos = [cosine(a, b) for a, b in zip(got, ref)]
        out[kind] = {"agreement": float((got.argmax(1) == ref.argmax(1)).mean()), "mean_cosine": float(np.mean(cos)),
                     "min_cosine": float(np.min(cos)), "identical": bool(np.array_equal(got, ref))}
        print(f"{kind:5s} export in ONNX Runtime vs relayq: agreement {out[kind]['agreement'] * 100:.1f}%, cosine mean "
              f"{out[kind]['mean_cosine']:.5f}, min {out[kind]['min_cosine']:.5f}, identical {out[kind]['identical']}",
              flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=100, help="calibration photos (of the 100)")
    ap.add_argument("--images", type=int, default=4, help="photos for the per-point comparison")
    ap.add_argument("--flip-images", type=int, default=20, help="images (of the 120) for the flip sensitivity")
    ap.add_argument("--exports", action="store_true", help="also run both exports on the 120 photos")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "qdq.json"))
    args = ap.parse_args()
    from relayq.testing import data, zoo

    t0 = time.perf_counter()
    photos = data.calibration_photos(100)
    everything = np.concatenate([photos, data.imagenet_labelled()[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(zoo.mobilenet_v2(batch=1), None, [photos[i:i + 1] for i in range(args.calib)],
                                  "kl", relayq.QConfig(per_channel=True, show_progress=False, check_accuracy=False))
    result = {"meta": {"machine": platform.processor() or platform.machine(), "calibration_photos": args.calib,
                       "scheme": "W8A8 per-channel, kl"}}
    with tempfile.TemporaryDirectory() as tmp:
        stats = per_point(q, photos[50:50 + args.images], tmp)
        print(f"{'point':20s} {'chained':>10s} {'isolated':>10s}   (fraction of codes ONNX Runtime computes differently)")
        for p, s in stats.items():
            print(f"{p:20s} {s['chained'] / s['codes']:10.2e} {s['isolated'] / s['codes']:10.2e}")
        total = {k: sum(s[k] for s in stats.values()) for k in ("chained", "isolated", "codes")}
        print(f"{'all points':20s} {total['chained'] / total['codes']:10.2e} {total['isolated'] / total['codes']:10.2e}")
        result["per_point"], result["all_points"] = stats, total
        step = max(1, len(everything) // args.flip_images)
        result["flips"] = flips(q, everything[::step][:args.flip_images], [1e-7, 1e-6, 1e-5])
        if args.exports:
            result["exports"] = exports(q, everything, tmp)
    result["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
