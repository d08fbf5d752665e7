"""relayq_run, the C++ runner (relayq/, CMakeLists.txt): built with CMake against the wheel's TVM
runtime, it runs libraries written by CompiledModel.export on .npy files, and its outputs equal the
Python CompiledModel's bit for bit."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tvm
from tvm import relax

import relayq

from helpers import tiny_cnn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The tests' own CMake build tree (kept between sessions: a re-run only re-links what changed).
BUILD_DIR = os.path.join(ROOT, "build", "test-native")


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def runner():
    """Path of a freshly (incrementally) built relayq_run."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: relayq_run cannot be built")
    if _compiler() is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX): relayq_run cannot be built")
    steps = [["cmake", "-S", ROOT, "-B", BUILD_DIR, f"-DPython_EXECUTABLE={sys.executable}",
              "-DCMAKE_BUILD_TYPE=Release"],
             ["cmake", "--build", BUILD_DIR, "-j2"]]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    exe = os.path.join(BUILD_DIR, "relayq_run")
    assert os.access(exe, os.X_OK)
    return exe


def run(exe, *args, threads=None):
    cmd = [exe, *map(str, args)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    # No Python at run time: nothing from this interpreter's environment is needed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def outputs_of(out_dir):
    files = sorted(f for f in os.listdir(out_dir) if f.startswith("output_"))
    return [np.load(os.path.join(out_dir, f)) for f in sorted(files, key=lambda f: int(f[7:-4]))]


def assert_bitwise_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes()


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    """tiny_cnn quantized and built for the host preset, exported; with an input and the Python output."""
    mod, params = tiny_cnn()
    rng = np.random.RandomState(0)
    qmodel = relayq.quantize_model(mod, params, dataset=[rng.rand(2, 3, 8, 8).astype("float32") for _ in range(2)],
                                   calibration="naive")
    lib = relayq.build(qmodel)
    d = tmp_path_factory.mktemp("tiny")
    path = lib.export(str(d / "tiny_int8.so"))
    x = rng.rand(2, 3, 8, 8).astype("float32")
    np.save(d / "x.npy", x)
    return {"dir": d, "so": path, "x": d / "x.npy", "want": [lib(x)]}


def test_quantized_cnn_bit_exact(runner, tiny_int8, tmp_path):
    res = run(runner, tiny_int8["so"], "--input", tiny_int8["x"], "--output-dir", tmp_path / "out", "--repeat", 3)
    assert res.returncode == 0, res.stderr
    assert "output 0: (2, 10) float32" in res.stdout
    assert "latency: median" in res.stdout
    assert_bitwise_equal(outputs_of(tmp_path / "out"), tiny_int8["want"])


def test_threads_one_and_two_agree(runner, tiny_int8, tmp_path):
    got = []
    for t in (1, 2):
        res = run(runner, tiny_int8["so"], "--input", f"data={tiny_int8['x']}", "-o", tmp_path / str(t),
                  "--repeat", 2, threads=t)
        assert res.returncode == 0, res.stderr
        assert f"{t} threads" in res.stdout
        got.append(outputs_of(tmp_path / str(t)))
    assert_bitwise_equal(got[0], got[1])
    assert_bitwise_equal(got[0], tiny_int8["want"])


def test_multi_input_multi_output(runner, tmp_path):
    rng = np.random.RandomState(1)
    w = rng.randn(4, 3, 3, 3).astype("float32") * 0.3
    fc = rng.randn(6, 16).astype("float32") * 0.2
    bb = relax.BlockBuilder()
    a = relax.Var("image", relax.TensorType((1, 3, 6, 6), "float32"))
    b = relax.Var("features", relax.TensorType((1, 16), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(a, relax.const(w), padding=(1, 1))))
            z = bb.emit(relax.op.matmul(b, relax.op.permute_dims(relax.const(fc))))
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    calib = [{"image": rng.rand(1, 3, 6, 6).astype("float32"), "features": rng.rand(1, 16).astype("float32")}
             for _ in range(2)]
    lib = relayq.build(relayq.quantize_model(bb.get(), {}, dataset=calib, calibration="naive"))
    so = lib.export(str(tmp_path / "two.so"))
    image, features = rng.rand(1, 3, 6, 6).astype("float32"), rng.rand(1, 16).astype("float32")
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "features.npy", features)
    want = lib(image, features)
    # by name, in the other order
    res = run(runner, so, "--input", f"features={tmp_path / 'features.npy'}", "--input",
              f"image={tmp_path / 'image.npy'}", "--output-dir", tmp_path / "out", "--repeat", 1)
    assert res.returncode == 0, res.stderr
    assert "output 1: (1, 6) float32" in res.stdout
    assert_bitwise_equal(outputs_of(tmp_path / "out"), want)
    # positionally
    res = run(runner, so, "--input", tmp_path / "image.npy", "--input", tmp_path / "features.npy",
              "--output-dir", tmp_path / "pos", "--repeat", 0)
    assert res.returncode == 0, res.stderr
    assert_bitwise_equal(outputs_of(tmp_path / "pos"), want)


def test_integer_dtypes_round_trip(runner, tmp_path):
    """int8/uint8 inputs and int32/int64/float64 outputs pass through the .npy reader and writer."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((3, 5), "int8"))
    b = relax.Var("b", relax.TensorType((3, 5), "uint8"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            s = bb.emit(relax.op.add(relax.op.astype(a, "int32"), relax.op.astype(b, "int32")))
            p = bb.emit(relax.op.multiply(relax.op.astype(s, "int64"), relax.const(3, "int64")))
            f = bb.emit(relax.op.divide(relax.op.astype(s, "float64"), relax.const(7.0, "float64")))
            out = bb.emit_output(relax.Tuple([s, p, f]))
        bb.emit_func_output(out)
    # relayq.build takes a float model's extra inputs for weights: compile this two-input one directly.
    target = relayq.runtime.host_target()
    lib = relayq.CompiledModel(tvm.compile(bb.get(), target=target), [("a", (3, 5), "int8"), ("b", (3, 5), "uint8")],
                               target)
    so = lib.export(str(tmp_path / "ints.so"))
    rng = np.random.RandomState(2)
    xa = rng.randint(-128, 128, (3, 5)).astype("int8")
    xb = rng.randint(0, 256, (3, 5)).astype("uint8")
    np.save(tmp_path / "a.npy", xa)
    np.save(tmp_path / "b.npy", xb)
    res = run(runner, so, "-i", tmp_path / "a.npy", "-i", tmp_path / "b.npy", "-o", tmp_path / "out", "--repeat", 0)
    assert res.returncode == 0, res.stderr
    got = outputs_of(tmp_path / "out")
    assert [g.dtype for g in got] == [np.int32, np.int64, np.float64]
    assert_bitwise_equal(got, lib(xa, xb))


def test_bad_input_file(runner, tiny_int8, tmp_path):
    bad = tmp_path / "not_an_array.npy"
    bad.write_text("hello")
    res = run(runner, tiny_int8["so"], "--input", bad)
    assert res.returncode != 0
    assert str(bad) in res.stderr and "not a .npy file" in res.stderr

    missing = tmp_path / "missing.npy"
    res = run(runner, tiny_int8["so"], "--input", missing)
    assert res.returncode != 0
    assert str(missing) in res.stderr and "cannot open" in res.stderr

    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.zeros((2, 3, 8, 8), "float32"))
    truncated.write_bytes(truncated.read_bytes()[:200])
    res = run(runner, tiny_int8["so"], "--input", truncated)
    assert res.returncode != 0
    assert str(truncated) in res.stderr and "truncated" in res.stderr


def test_wrong_input_and_usage_errors(runner, tiny_int8, tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((1, 3, 8, 8), "float32"))
    res = run(runner, tiny_int8["so"], "--input", tmp_path / "small.npy")
    assert res.returncode == 1
    assert "input 'data' must be (2, 3, 8, 8) float32, got (1, 3, 8, 8) float32" in res.stderr

    res = run(runner, tiny_int8["so"], "--input", f"nope={tiny_int8['x']}")
    assert res.returncode == 1 and "no input called 'nope' (inputs: data)" in res.stderr

    res = run(runner, tiny_int8["so"])
    assert res.returncode == 1 and "missing input 'data'" in res.stderr

    res = run(runner, tmp_path / "absent.so", "--input", tiny_int8["x"])
    assert res.returncode == 1 and "absent.so: no such file" in res.stderr

    res = run(runner, tiny_int8["so"], "--repeat", "many")
    assert res.returncode == 2 and "--repeat expects an integer" in res.stderr
