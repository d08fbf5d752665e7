"""The ``relayq`` command: quantize, build, run and report, from a float model file to a deployed library.

Example::

    relayq quantize mobilenet_v2.onnx --calib images/ --per-channel -o mobilenet_v2.rqz
    relayq build mobilenet_v2.rqz --target arm-dotprod -o mobilenet_v2_arm64.so
    relayq run mobilenet_v2.so --input x.npy --output-dir out/ --repeat 20
    relayq report mobilenet_v2.rqz -o report.html

Nothing heavy is imported before the arguments are parsed: ``relayq --help`` and ``relayq --version``
answer without loading TVM (which takes seconds). Errors a user can cause (a missing file, data that
does not fit the model, an unknown option value) print one line on stderr and exit with status 2;
other failures exit with 1. ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

#: Presets of ``relayq build --target`` (relayq.backend.presets.PRESETS; a test keeps the two equal).
TARGETS = ("x86-avx2", "x86-vnni", "arm-dotprod", "arm-neon", "cuda-dp4a", "generic")
CALIBRATIONS = ("naive", "kl", "percentile", "mse")
#: Exit statuses.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

_QUANTIZE_EXAMPLE = """\
examples:
  relayq quantize mobilenet_v2.onnx --calib calib_images/ --per-channel -o mobilenet_v2.rqz
  relayq quantize model.tflite --calib calib.npy --calibration percentile -o model.rqz
  relayq quantize resnet-symbol.json --params resnet-0000.params \\
      --input-shape data=1,3,224,224 --calib calib_images/ -o resnet.rqz

The model format is read from the file's content: ONNX, TFLite (float32) or an MXNet symbol (JSON,
with --params). Calibration data is a folder of images (resized, centre-cropped and normalized with
--resize/--mean/--std, ImageNet defaults) or a .npy array of samples (first axis) cut into batches of
the model's batch size. Writes the bit-packed quantized model (.rqz) and prints its summary.
"""
_BUILD_EXAMPLE = """\
examples:
  relayq build model.rqz -o model.so                              # this CPU's best preset
  relayq build model.rqz --target x86-avx2 --tune-trials 200 --tuning-log tuning/ -o model.so
  relayq build model.rqz --target arm-dotprod -o model_arm64.so   # links with aarch64-linux-gnu-g++

Writes the library and MODEL.so.json (its input shapes), which `relayq run` and relayq_run read.
"""
_RUN_EXAMPLE = """\
examples:
  relayq run model.so --input x.npy --output-dir out/ --repeat 20 --threads 2
  relayq run model.so --input image=x.npy --runner cpp           # the C++ runner relayq_run

Writes each output as DIR/output_<i>.npy and prints the median latency of --repeat runs. The C++
runner is found as --runner-path, $RELAYQ_RUN, relayq_run in PATH, or build/relayq_run (built with
`cmake -S . -B build && cmake --build build`); with it, the exit status is relayq_run's (1: the model
or an input cannot be used, 2: usage).
"""
_REPORT_EXAMPLE = """\
examples:
  relayq report model.rqz                   # the per-layer text summary
  relayq report model.rqz -o report.html    # and the HTML report
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        tvm = f", apache-tvm {version('apache-tvm')}"
    except PackageNotFoundError:
        tvm = ""
    return f"relayq {__version__}{tvm}"


class _VersionAction(argparse.Action):
    """``--version``: the versions are looked up only when asked (package metadata is slow to scan)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default,
                         help=help or "print relayq's and TVM's versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def _shape_arg(text: str):
    """``name=1,3,224,224`` -> ``("name", (1, 3, 224, 224))`` (argparse type)."""
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if sep and name else None
    except ValueError:
        shape = None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,... with positive integers, got {text!r}")
    return name, shape


def _floats_arg(text: str):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 numbers, got {len(values)} in {text!r}")
    return values


def _positive_int(text: str):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter

    def flags(default):
        # Accepted before or after the command; the subcommands' copies must not reset a value given
        # before the command, hence SUPPRESS there.
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug messages")
        p.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="no progress, only warnings and errors")
        return p

    common = flags(argparse.SUPPRESS)
    ap = argparse.ArgumentParser(
        prog="relayq", formatter_class=fmt, parents=[flags(False)],
        description="Post-training quantization for Apache TVM: quantize a float model, build it for a "
                    "target, run it, report on it.",
        epilog="examples:\n"
               "  relayq quantize model.onnx --calib images/ --per-channel -o model.rqz\n"
               "  relayq build model.rqz --target x86-avx2 -o model.so\n"
               "  relayq run model.so --input x.npy --output-dir out/\n"
               "  relayq report model.rqz\n\n"
               "`relayq COMMAND --help` shows each command's options and examples.")
    ap.add_argument("--version", action=_VersionAction)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    q = sub.add_parser("quantize", parents=[common], formatter_class=fmt, epilog=_QUANTIZE_EXAMPLE,
                       help="quantize a float model with calibration data (writes .rqz)",
                       description="Quantize a float model (ONNX, TFLite, MXNet) with post-training calibration.")
    q.add_argument("model", help="the float model file (.onnx, .tflite, MXNet -symbol.json)")
    q.add_argument("--calib", required=True, metavar="DIR_OR_NPY",
                   help="calibration data: a folder of images or a .npy array of samples")
    q.add_argument("-o", "--output", required=True, metavar="MODEL.rqz", help="where to write the quantized model")
    q.add_argument("--params", metavar="FILE", help="MXNet weights (.params); default: PREFIX-0000.params beside "
                                                    "PREFIX-symbol.json when there is exactly one")
    q.add_argument("--calibration", default="kl", choices=CALIBRATIONS,
                   help="how activation ranges are chosen (default: kl)")
    q.add_argument("--per-channel", action="store_true", help="one weight scale per output channel")
    q.add_argument("--asymmetric", action="store_true",
                   help="unsigned activations with a zero point (runs on TVM's generic lowering: slower)")
    q.add_argument("--weight-bits", type=int, default=8, metavar="N", help="weight bits, 2..16 (default 8)")
    q.add_argument("--act-bits", type=int, default=8, metavar="N", help="activation bits, 2..16 (default 8)")
    q.add_argument("--input-shape", type=_shape_arg, action="append", default=[], metavar="NAME=D1,D2,...",
                   help="an input's shape (repeatable); needed for MXNet and dynamic dimensions")
    q.add_argument("--num-calib", type=_positive_int, default=None, metavar="N",
                   help="use at most N calibration samples (default: all)")
    q.add_argument("--resize", type=_positive_int, default=None, metavar="PIXELS",
                   help="images: short side before the centre crop (default: crop size / 0.875, 256 for 224)")
    q.add_argument("--mean", type=_floats_arg, default=None, metavar="R,G,B",
                   help="images: per-channel mean on [0, 1] pixels (default ImageNet 0.485,0.456,0.406)")
    q.add_argument("--std", type=_floats_arg, default=None, metavar="R,G,B",
                   help="images: per-channel std (default ImageNet 0.229,0.224,0.225)")
    q.add_argument("--layout", choices=("NCHW", "NHWC"), default=None,
                   help="images: the input's layout (default: read from its shape)")

    b = sub.add_parser("build", parents=[common], formatter_class=fmt, epilog=_BUILD_EXAMPLE,
                       help="compile a quantized model for a target (writes .so)",
                       description="Compile a quantized model (.rqz) for a target and export a shared library.")
    b.add_argument("model", metavar="MODEL.rqz", help="a model written by `relayq quantize`")
    b.add_argument("-o", "--output", required=True, metavar="MODEL.so", help="where to write the library")
    b.add_argument("--target", default=None, choices=TARGETS,
                   help="target preset (default: this CPU's best, x86-vnni or x86-avx2)")
    b.add_argument("--tune-trials", type=_positive_int, default=0, metavar="N",
                   help="MetaSchedule trials for what relayq's kernels leave to TVM (default 0: no tuning)")
    b.add_argument("--tuning-log", default=None, metavar="DIR",
                   help="keep tuning records here and reuse them in later builds")
    b.add_argument("--cross-compile", default=None, metavar="CXX",
                   help="the compiler that links the library (default: the host's, or aarch64-linux-gnu-g++ "
                        "for ARM presets)")

    r = sub.add_parser("run", parents=[common], formatter_class=fmt, epilog=_RUN_EXAMPLE,
                       help="run a compiled library on .npy inputs and time it",
                       description="Run a library written by `relayq build` on .npy inputs.")
    r.add_argument("model", metavar="MODEL.so", help="a library written by `relayq build`")
    r.add_argument("-i", "--input", action="append", required=True, metavar="[NAME=]X.npy",
                   help="an input, in order or by name (repeatable)")
    r.add_argument("--output-dir", default=None, metavar="DIR", help="write output_<i>.npy here")
    r.add_argument("--runner", choices=("python", "cpp"), default="python",
                   help="the Python CompiledModel (default) or the C++ relayq_run")
    r.add_argument("--runner-path", default=None, metavar="PATH", help="the relayq_run executable (--runner cpp)")
    r.add_argument("--repeat", type=_positive_int, default=10, metavar="N",
                   help="timed runs; the median latency is printed (default 10; 0: no timing)")
    r.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="TVM worker threads (default: TVM_NUM_THREADS, else TVM's default)")

    p = sub.add_parser("report", parents=[common], formatter_class=fmt, epilog=_REPORT_EXAMPLE,
                       help="the per-layer report of a quantized model",
                       description="Print the per-layer summary of a quantized model (.rqz); -o writes the "
                                   "HTML report.")
    p.add_argument("model", metavar="MODEL.rqz", help="a model written by `relayq quantize`")
    p.add_argument("-o", "--output", default=None, metavar="REPORT.html", help="write the HTML report here")
    return ap


# --------------------------------------------------------------------------- quantize

def _import_model(args, shapes):
    """``(mod, params)`` of the model file, with the frontend its content calls for."""
    from .errors import FrontendError
    from .frontend.detect import detect_format

    fmt = detect_format(args.model)
    from . import frontend

    if fmt == "onnx":
        return frontend.from_onnx(args.model, shapes or None)
    if fmt == "tflite":
        return frontend.from_tflite(args.model, shapes or None)
    params = args.params or _mxnet_params(args.model)
    if not shapes:
        raise FrontendError(f"{args.model} is an MXNet symbol, which has no input shapes: give them with "
                            "--input-shape NAME=D1,D2,... (e.g. data=1,3,224,224)")
    return frontend.from_mxnet(args.model, params, None, shapes)


def _mxnet_params(symbol_path: str) -> str:
    """``PREFIX-NNNN.params`` beside ``PREFIX-symbol.json`` when exactly one exists."""
    from .errors import FrontendError

    folder, name = os.path.split(os.path.abspath(symbol_path))
    prefix = name[:-len("-symbol.json")] if name.endswith("-symbol.json") else os.path.splitext(name)[0]
    found = sorted(f for f in os.listdir(folder) if f.startswith(prefix + "-") and f.endswith(".params"))
    if len(found) != 1:
        raise FrontendError(f"{symbol_path} is an MXNet symbol: pass its weights with --params FILE "
                            f"({'several candidates: ' + ', '.join(found) if found else 'no ' + prefix + '-*.params beside it'})")
    return os.path.join(folder, found[0])


def _calibration_data(args, specs):
    from .errors import DatasetError
    from .utils import images

    if len(specs) != 1:
        raise DatasetError(f"the model has {len(specs)} inputs ({', '.join(s[0] for s in specs)}): the command "
                           "line calibrates single-input models; use relayq.quantize_model for several")
    name, shape, dtype = specs[0]
    shape = tuple(int(d) for d in shape)
    if os.path.isdir(args.calib):
        return images.image_batches(args.calib, shape, args.num_calib, args.resize,
                                    args.mean or images.IMAGENET_MEAN, args.std or images.IMAGENET_STD,
                                    args.layout)
    return images.npy_batches(args.calib, shape, dtype, args.num_calib)


def cmd_quantize(args, log) -> int:
    import relayq

    from .errors import DatasetError
    from .transform.calibrate import input_specs
    from .utils.progress import stage

    if not os.path.exists(args.calib):       # before the import, which takes seconds
        raise DatasetError(f"calibration data not found: {args.calib} (a folder of images or a .npy file)")
    shapes = dict(args.input_shape)
    with stage(f"importing {args.model}", not args.quiet):
        mod, params = _import_model(args, shapes)
    # main's parameters are the data inputs followed by the weights (bound by quantize_model).
    data = _calibration_data(args, [s for s in input_specs(mod) if s[0] not in (params or {})])
    config = relayq.QConfig(per_channel=args.per_channel, act_symmetric=not args.asymmetric,
                            weight_bits=args.weight_bits, act_bits=args.act_bits, show_progress=not args.quiet)
    qmodel = relayq.quantize_model(mod, params, data, args.calibration, config)
    sizes = qmodel.save(args.output)
    print(qmodel.summary())
    print(f"wrote {args.output}: {sizes['file']} bytes (weights {sizes['packed_weights']} bytes packed, "
          f"{sizes['fp32_weights']} as float32)")
    return EXIT_OK


# --------------------------------------------------------------------------- build

def cmd_build(args, log) -> int:
    import relayq

    qmodel = relayq.load_quantized(args.model)
    lib = relayq.build(qmodel, target=args.target, tune_trials=args.tune_trials, tuning_log=args.tuning_log)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    lib.export(args.output, cross_compile=args.cross_compile)
    print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes, target {args.target or 'this CPU'}) and "
          f"{args.output}.json")
    return EXIT_OK


# --------------------------------------------------------------------------- run

def _named_inputs(values) -> list:
    """``["x.npy", "name=y.npy"]`` -> ``[(None, "x.npy"), ("name", "y.npy")]``."""
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        out.append((name, path) if sep and not os.path.exists(v) else (None, v))
    return out


def _find_runner(explicit: str | None) -> str:
    import shutil

    from .errors import ModelError

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [explicit] if explicit else [os.environ.get("RELAYQ_RUN"), shutil.which("relayq_run"),
                                              os.path.join(root, "build", "relayq_run"),
                                              os.path.join(root, "build", "test-native", "relayq_run")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    if explicit:
        raise ModelError(f"--runner-path {explicit}: no such executable")
    raise ModelError("relayq_run not found (looked at $RELAYQ_RUN, PATH, build/relayq_run): build it with "
                     "`cmake -S . -B build && cmake --build build` or pass --runner-path")


def _run_cpp(args, log) -> int:
    import subprocess

    from .utils.log import filter_tvm_chatter

    exe = _find_runner(args.runner_path)
    cmd = [exe, args.model, "--repeat", str(args.repeat)]
    for v in args.input:
        cmd += ["--input", v]
    if args.output_dir:
        cmd += ["--output-dir", os.path.normpath(args.output_dir)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log.debug("running %s", " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(res.stdout)
    err = filter_tvm_chatter(res.stderr)
    if err:
        sys.stderr.write(err)
    return res.returncode


def _run_python(args, log) -> int:
    import numpy as np

    import relayq

    from .errors import DatasetError

    lib = relayq.load(args.model)
    names = lib.input_names
    arrays = {}
    for i, (name, path) in enumerate(_named_inputs(args.input)):
        if name is None:
            if i >= len(names):
                raise DatasetError(f"{len(args.input)} inputs given, the model takes {len(names)} ({', '.join(names)})")
            name = names[i]
        elif name not in names:
            raise DatasetError(f"no input called {name!r} (inputs: {', '.join(names)})")
        if not os.path.isfile(path):
            raise DatasetError(f"input file not found: {path}")
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path} is not a .npy array file: {e}") from None
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DatasetError(f"missing input {missing[0]!r} (inputs: {', '.join(names)})")
    outs = lib(**arrays)
    outs = outs if isinstance(outs, list) else [outs]
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    for i, o in enumerate(outs):
        where = ""
        if args.output_dir:
            path = os.path.join(args.output_dir, f"output_{i}.npy")
            np.save(path, o)
            where = f" -> {path}"
        print(f"output {i}: {tuple(o.shape)} {o.dtype}{where}")
    if args.repeat:
        t = lib.benchmark(*[arrays[n] for n in names], number=1, repeat=args.repeat)
        threads = os.environ.get("TVM_NUM_THREADS", "TVM's default")
        print(f"latency: median {t['median_ms']:.3f} ms, min {t['min_ms']:.3f} ms over {args.repeat} runs, "
              f"{threads} threads")
    return EXIT_OK


def cmd_run(args, log) -> int:
    if args.runner == "cpp":
        return _run_cpp(args, log)
    if args.threads:
        # TVM sizes its thread pool from this variable when the first model runs.
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    return _run_python(args, log)


# --------------------------------------------------------------------------- report

def _text_summary(qmodel) -> str:
    """QuantizedModel.summary(), or the points alone where a loaded model cannot give more."""
    try:
        return qmodel.summary()
    except AttributeError:
        # A model read back from .rqz carries no annotated module (layer names), only its points.
        lines = [f"relayq quantized model: {len(qmodel.qpoints)} points (read from an artefact: no layer list)"]
        lines += [f"  {p!r}" for p in qmodel.qpoints.values()]
        return "\n".join(lines)


def cmd_report(args, log) -> int:
    import html

    import relayq

    qmodel = relayq.load_quantized(args.model)
    text = _text_summary(qmodel)
    print(text)
    if args.output:
        if hasattr(qmodel, "report"):
            qmodel.report(args.output)
        else:
            # Until QuantizedModel.report (plots) exists: the same summary as a page.
            with open(args.output, "w") as f:
                f.write(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>relayq report: "
                        f"{html.escape(os.path.basename(args.model))}</title></head>\n<body><pre>"
                        f"{html.escape(text)}</pre></body></html>\n")
        print(f"wrote {args.output}")
    return EXIT_OK


COMMANDS = {"quantize": cmd_quantize, "build": cmd_build, "run": cmd_run, "report": cmd_report}


@contextlib.contextmanager
def _logging_for(args):
    """The relayq logger's level from --debug / --quiet, and warnings as one log line each, for one command
    (restored afterwards: ``main`` may be called in a process that goes on, e.g. a test)."""
    import logging
    import warnings

    from .utils.log import get_logger

    root = get_logger()
    level, showwarning = root.level, warnings.showwarning
    root.setLevel(logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO)

    def show(message, category, filename, lineno, file=None, line=None):
        # One line per warning, as relayq's messages: the source line of warnings.warn means nothing here.
        root.warning("%s: %s", category.__name__, message)

    if not args.debug:
        warnings.showwarning = show
    try:
        yield get_logger("cli")
    finally:
        root.setLevel(level)
        warnings.showwarning = showwarning


def main(argv=None) -> int:
    """Run the ``relayq`` command line; returns the exit status.

    Example::

        main(["quantize", "model.onnx", "--calib", "calib.npy", "-o", "model.rqz"])
    """
    args = _parser().parse_args(argv)
    from .errors import BuildError, RelayqError

    try:
        with _logging_for(args) as log:
            return COMMANDS[args.command](args, log)
    except KeyboardInterrupt:
        print("relayq: interrupted", file=sys.stderr)
        return 130
    except RelayqError as e:
        if args.debug:
            raise
        print(f"relayq {args.command}: error: {e}", file=sys.stderr)
        # A build or export that fails on valid input is relayq's (or the toolchain's) failure, not a usage error.
        return EXIT_FAILURE if isinstance(e, BuildError) else EXIT_USAGE
    except OSError as e:
        if args.debug:
            raise
        print(f"relayq {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback; --debug shows it
        if args.debug:
            raise
        print(f"relayq {args.command}: error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
