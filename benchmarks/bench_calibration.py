"""Calibration speed and memory: relayq's KL calibration vs ONNX Runtime's entropy calibrator.

Model: ResNet-18 with seeded random weights (``relayq.testing.zoo.resnet18``), batch 8. Data: the
ai-benchmark photos (``relayq.testing.data``; the 100 photos, then their mirror images for more), or
seeded random images where the photos are not installed.

1. Speed, side by side in one process: relayq ``calibrate(annotated, data, "kl")`` vs ONNX Runtime's
   ``create_calibrator(..., CalibrationMethod.Entropy, extra_options={"num_bins": 2048,
   "num_quantized_bins": 128})`` + ``collect_data`` + ``compute_data``, both on the same model and the
   same 32 images. ORT calibrates the model after its recommended ``quant_pre_process`` (BatchNorm
   folded into Conv, as relayq's ``prepare`` does). relayq's time is split into: compiling the tap
   module, running it (the float model with every activation point as an extra output), streaming the
   tapped tensors into histograms, choosing thresholds (KL search) and the rest (weights, the simulated
   module). The split is measured from outside calibrate.py by wrapping ``compile_host`` and the
   calibrator; parts that cannot be separated are reported together.
2. Memory: peak RSS growth of relayq's calibration with 32 vs 128 images, each in a fresh child process
   (the data is generated batch by batch, so only the calibration's own memory counts). Histograms
   are of bounded size, so the growth must not depend on the number of images.

    PYTHONPATH=python python3 benchmarks/bench_calibration.py                 # ~1 min on 2 cores
    PYTHONPATH=python python3 benchmarks/bench_calibration.py --memory-images 8,32 --images 16   # quick

Writes ``benchmarks/results/calibration.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import relayq  # noqa: E402

#: The issue's reference: ONNX Runtime's entropy calibration of ResNet-18 with 32 images took 10.7 s.
ORT_REFERENCE_SECONDS = 10.7
TARGET_SPEEDUP = 3.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_peak_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_now_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def source_images():
    """(array of base images (N, 3, 224, 224) float32, description)."""
    from relayq.testing import data

    if data.has_calibration_photos():
        return data.calibration_photos(100), "ai-benchmark photos (then their mirror images)"
    rng = np.random.default_rng(0)
    return rng.standard_normal((16, 3, 224, 224)).astype(np.float32), "seeded random images (photos not installed)"


def batches(base: np.ndarray, n_images: int, batch: int):
    """Generate ``n_images`` images in batches, made on the fly (photos, then mirrored, then shifted)."""
    n = len(base)
    for start in range(0, n_images, batch):
        idx = [(start + j) for j in range(min(batch, n_images - start))]
        imgs = []
        for i in idx:
            img, variant = base[i % n], i // n
            if variant % 2 == 1:
                img = img[:, :, ::-1]
            if variant >= 2:
                img = np.roll(img, 8 * (variant // 2), axis=2)
            imgs.append(img)
        yield np.ascontiguousarray(np.stack(imgs))


class _Dataset:
    """A re-iterable, sized dataset of generated batches (nothing kept between batches)."""

    def __init__(self, base, n_images, batch):
        self.base, self.n, self.batch = base, n_images, batch

    def __iter__(self):
        return batches(self.base, self.n, self.batch)

    def __len__(self):
        return -(-self.n // self.batch)


def annotated_resnet18(batch: int):
    from relayq.testing import zoo
    from relayq.transform import annotate, prepare

    mod, params = relayq.frontend.from_onnx(zoo.resnet18(batch=batch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return annotate(prepare(mod, params), relayq.QConfig(show_progress=False))


def timed_kl_calibration(annotated, dataset) -> dict:
    """relayq's calibrate(..., "kl") with its time split into parts (measured from the outside)."""
    import importlib

    from relayq.calibration.methods import HistogramCalibrator

    # The module (relayq.transform re-exports a function of the same name).
    C = importlib.import_module("relayq.transform.calibrate")

    t = {"compile": 0.0, "tap_run": 0.0, "histograms": 0.0, "thresholds": 0.0}
    seen = {"compile_calls": 0, "run_calls": 0}

    class TimedKL(HistogramCalibrator):
        def __init__(self):
            super().__init__("kl")
            self.name = "kl"

        def observe(self, name, value):
            t0 = time.perf_counter()
            super().observe(name, value)
            t["histograms"] += time.perf_counter() - t0

        def threshold(self, name, bits, signed=True):
            t0 = time.perf_counter()
            r = super().threshold(name, bits, signed)
            t["thresholds"] += time.perf_counter() - t0
            return r

    original = C.compile_host

    def compile_host(mod, target=None):
        t0 = time.perf_counter()
        fn = original(mod, target)
        t["compile"] += time.perf_counter() - t0
        seen["compile_calls"] += 1
        call = fn.__call__

        class Timed:
            def __getattr__(self, k):
                return getattr(fn, k)

            def __call__(self, *args):
                t1 = time.perf_counter()
                out = call(*args)
                t["tap_run"] += time.perf_counter() - t1
                seen["run_calls"] += 1
                return out

        return Timed()

    # The tap module is lowered to relayq's float kernels (_fast_float) before compile_host: count both.
    original_lower = getattr(C, "_fast_float", None)

    def fast_float(*a, **k):
        t0 = time.perf_counter()
        r = original_lower(*a, **k)
        t["compile"] += time.perf_counter() - t0
        return r

    C.compile_host = compile_host
    if original_lower is not None:
        C._fast_float = fast_float
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, qpoints = C.calibrate(annotated, dataset, TimedKL(), relayq.QConfig(show_progress=False))
        total = time.perf_counter() - t0
    finally:
        C.compile_host = original
        if original_lower is not None:
            C._fast_float = original_lower
    split_known = seen["compile_calls"] > 0 and seen["run_calls"] > 0
    res = {"total_s": total, "points": len(qpoints),
           "act_points": sum(1 for p in qpoints.values() if p.role == "act"),
           "histograms_s": t["histograms"], "thresholds_s": t["thresholds"], "split_measured": split_known}
    if split_known:
        res.update(tap_compile_s=t["compile"], tap_run_s=t["tap_run"],
                   other_s=total - t["compile"] - t["tap_run"] - t["histograms"] - t["thresholds"])
    else:
        # calibrate.py no longer goes through compile_host: compile and run are reported together.
        res.update(tap_compile_s=None, tap_run_s=None,
                   tap_compile_and_run_s=total - t["histograms"] - t["thresholds"])
    res["thresholds"] = {n: float(p.threshold) for n, p in qpoints.items() if p.role == "act"}
    return res


def ort_entropy(model_path: str, dataset, tmp: str) -> dict:
    """ONNX Runtime's 2048-bin entropy calibration on ``dataset``; time split collect / compute."""
    import logging

    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.ERROR)
    pre = os.path.join(tmp, "resnet18_pre.onnx")
    quant_pre_process(model_path, pre, skip_symbolic_shape=True)

    class Reader:
        def __init__(self):
            self.it = iter(dataset)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"input": b}

    t0 = time.perf_counter()
    cal = create_calibrator(pre, None, augmented_model_path=os.path.join(tmp, "aug.onnx"),
                            calibrate_method=CalibrationMethod.Entropy,
                            extra_options={"num_bins": 2048, "num_quantized_bins": 128})
    t1 = time.perf_counter()
    cal.collect_data(Reader())
    t2 = time.perf_counter()
    ranges = cal.compute_data()
    t3 = time.perf_counter()
    n = len(ranges.data) if hasattr(ranges, "data") else None
    return {"total_s": t3 - t0, "setup_s": t1 - t0, "collect_s": t2 - t1, "compute_s": t3 - t2, "tensors": n}


class _RssSampler:
    """Samples this process's current RSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval, self.peak, self._stop = interval, rss_now_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_now_mb())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_now_mb())


def memory_child(n_images: int, batch: int) -> dict:
    """In a fresh process: RSS before, peak RSS during (sampled) and RSS after relayq's KL calibration.

    ``ru_maxrss`` is not usable here: importing and preparing the model already peaks above what the
    calibration needs, so the peak of the current RSS is sampled during the calibration instead.
    """
    import gc

    base, _ = source_images()
    annotated = annotated_resnet18(batch)
    next(iter(batches(base, batch, batch)))  # touch the generator path once
    gc.collect()
    before = rss_now_mb()
    with _RssSampler() as sampler:
        r = timed_kl_calibration(annotated, _Dataset(base, n_images, batch))
    after = rss_now_mb()
    return {"images": n_images, "batch": batch, "rss_before_mb": before, "peak_during_mb": sampler.peak,
            "rss_after_mb": after, "peak_growth_mb": sampler.peak - before, "retained_mb": after - before,
            "ru_maxrss_mb": rss_peak_mb(), "calibration_s": r["total_s"], "tap_run_s": r.get("tap_run_s")}


def run_memory(n_images: int, batch: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", str(n_images), "--batch", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"images": n_images, "status": "failed", "error": (out.stderr.strip().splitlines() or [""])[-1]}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "status": "ok"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images for the speed comparison")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--memory-images", default="32,128", help="image counts for the memory runs ('' to skip)")
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "calibration.json"))
    args = ap.parse_args()

    if args.child_memory:
        print(json.dumps(memory_child(args.child_memory, args.batch)))
        return

    from relayq.testing import zoo

    base, data_desc = source_images()
    dataset = _Dataset(base, args.images, args.batch)
    log(f"relayq: KL calibration of ResNet-18, {args.images} images, batch {args.batch}")
    annotated = annotated_resnet18(args.batch)
    rq = timed_kl_calibration(annotated, dataset)
    log(f"  {rq['total_s']:.1f} s")
    ort_res = None
    if not args.no_ort:
        log(f"onnxruntime: entropy calibration (2048 bins), {args.images} images, batch {args.batch}")
        with tempfile.TemporaryDirectory(prefix="relayq_calib_") as tmp:
            import onnx

            path = os.path.join(tmp, "resnet18.onnx")
            onnx.save(zoo.resnet18(batch=args.batch), path)
            try:
                ort_res = ort_entropy(path, dataset, tmp)
                log(f"  {ort_res['total_s']:.1f} s")
            except Exception as e:  # noqa: BLE001
                ort_res = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:300]}
    mem = []
    for n in [int(v) for v in args.memory_images.split(",") if v.strip()]:
        log(f"memory: relayq KL calibration with {n} images (child process)")
        mem.append(run_memory(n, args.batch))

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [f"Calibration of ResNet-18 (random weights), {args.images} images, batch {args.batch}, "
             f"{os.cpu_count()} cores; data: {data_desc}",
             f"{'':44s}{'seconds':>10s}"]
    lines.append(f"{'relayq KL, total':44s}{rq['total_s']:10.2f}")
    if rq["split_measured"]:
        lines.append(f"{'  lower + compile tap module':44s}{rq['tap_compile_s']:10.2f}")
        lines.append(f"{'  run tap module':44s}{rq['tap_run_s']:10.2f}")
    else:
        lines.append(f"{'  compile + run tap module (not separable)':44s}{rq['tap_compile_and_run_s']:10.2f}")
    lines.append(f"{'  stream into histograms':44s}{rq['histograms_s']:10.2f}")
    lines.append(f"{'  thresholds (KL search, %d points)' % rq['act_points']:44s}{rq['thresholds_s']:10.2f}")
    if rq["split_measured"]:
        lines.append(f"{'  other (weights, simulated module)':44s}{rq['other_s']:10.2f}")
    speedup = None
    if ort_res and "total_s" in ort_res:
        lines.append(f"{'ONNX Runtime entropy (2048 bins), total':44s}{ort_res['total_s']:10.2f}")
        lines.append(f"{'  create calibrator (augmented model)':44s}{ort_res['setup_s']:10.2f}")
        lines.append(f"{'  collect_data (run, keep outputs)':44s}{ort_res['collect_s']:10.2f}")
        lines.append(f"{'  compute_data (histograms + entropy)':44s}{ort_res['compute_s']:10.2f}")
        speedup = ort_res["total_s"] / rq["total_s"]
        lines.append(f"relayq speed-up over ONNX Runtime: {speedup:.2f}x (target >= {TARGET_SPEEDUP:.0f}x: "
                     f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'})")
        if rq["split_measured"]:
            warm = rq["total_s"] - rq["tap_compile_s"]
            lines.append(f"  excluding relayq's one-off tap compile: {ort_res['total_s'] / warm:.2f}x")
    elif ort_res:
        lines.append(f"ONNX Runtime failed: {ort_res['error']}")
    lines.append(f"relayq vs the issue's ORT reference ({ORT_REFERENCE_SECONDS} s): "
                 f"{ORT_REFERENCE_SECONDS / rq['total_s']:.2f}x")
    if mem:
        lines += ["", "RSS of relayq's KL calibration (fresh process each; peak sampled every 5 ms during calibrate)",
                  f"{'images':>8s}{'RSS before MB':>15s}{'peak during MB':>16s}{'peak growth MB':>16s}"
                  f"{'retained MB':>13s}{'seconds':>10s}"]
        for m in mem:
            if m.get("status") != "ok":
                lines.append(f"{m['images']:8d}  FAILED: {m.get('error')}")
                continue
            lines.append(f"{m['images']:8d}{m['rss_before_mb']:15.0f}{m['peak_during_mb']:16.0f}"
                         f"{m['peak_growth_mb']:16.1f}{m['retained_mb']:13.1f}{m['calibration_s']:10.1f}")
        ok = [m for m in mem if m.get("status") == "ok"]
        if len(ok) >= 2:
            d = ok[-1]["peak_growth_mb"] - ok[0]["peak_growth_mb"]
            lines.append(f"growth difference {ok[-1]['images']} vs {ok[0]['images']} images: {d:+.1f} MB "
                         f"({'flat' if abs(d) <= 32 else 'GROWS with the dataset'}; tolerance 32 MB)")
    text = "\n".join(lines)
    print(text)

    import onnxruntime
    import tvm

    result = {"meta": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
                       "model": "ResNet-18, seeded random weights (relayq.testing.zoo.resnet18)",
                       "images": args.images, "batch": args.batch, "data": data_desc},
              "relayq_kl": {k: v for k, v in rq.items() if k != "thresholds"},
              "onnxruntime_entropy": ort_res, "speedup": speedup, "target_speedup": TARGET_SPEEDUP,
              "target_met": None if speedup is None else bool(speedup >= TARGET_SPEEDUP),
              "ort_reference_seconds": ORT_REFERENCE_SECONDS, "memory": mem, "table": text}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
