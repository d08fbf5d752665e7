"""relayq: post-training quantization for Apache TVM (Relax).

    import relayq
    qmodel = relayq.quantize_model(mod, params, dataset, calibration="kl")
    lib = relayq.build(qmodel)

Importing the package is cheap: TVM (several seconds to import) is loaded on the first use of a name
that needs it, so that ``relayq --help`` and ``relayq --version`` answer at once.
"""
import importlib

# The one place the version is written (pyproject.toml reads it from here without importing TVM).
__version__ = "0.1.0"

#: Public name -> the submodule that defines it.
_LAZY = {
    **{name: "api" for name in ("CompiledModel", "QuantizedModel", "build", "finetune", "load", "load_quantized",
                                "quantize_model")},
    **{name: "config" for name in ("LayerConfig", "QConfig")},
    "auto_mixed_precision": "mixed_precision",
    **{name: "backend.rpc" for name in ("RemoteResult", "remote")},
    **{name: "errors" for name in ("AccuracyCollapseWarning", "BiasClampWarning", "BuildError", "CalibrationWarning",
                                   "ConfigError", "DatasetError", "FloatFallbackWarning", "FrontendError",
                                   "ModelError", "NothingQuantizedWarning", "OverflowRiskError", "RelayqError",
                                   "UnsupportedOpError", "RemoteError", "TrackerUnreachableError",
                                   "NoFreeDeviceError", "ArtefactError", "UnsupportedCPUError",
                                   "MissingDependencyError", "SlowKernelWarning")},
}
#: Subpackages and modules reachable as attributes (``relayq.frontend.from_onnx``) without an explicit import.
_SUBMODULES = ("analysis", "api", "artefact", "backend", "calibration", "cli", "config", "errors", "frontend",
               "mixed_precision", "onnx_export", "qmath", "runtime", "testing", "training", "transform", "utils")


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'relayq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["quantize_model", "finetune", "auto_mixed_precision", "build", "load", "load_quantized", "remote", "RemoteResult", "QuantizedModel", "CompiledModel", "QConfig", "LayerConfig",
           "frontend", "qmath", "transform", "RelayqError", "ConfigError", "DatasetError", "ModelError",
           "FrontendError", "UnsupportedOpError", "OverflowRiskError", "BuildError", "FloatFallbackWarning",
           "NothingQuantizedWarning", "BiasClampWarning", "CalibrationWarning", "AccuracyCollapseWarning",
           "RemoteError", "TrackerUnreachableError", "NoFreeDeviceError", "ArtefactError", "UnsupportedCPUError",
           "MissingDependencyError", "SlowKernelWarning"]
