"""relayq: post-training quantization for Apache TVM (Relax).

    import relayq
    qmodel = relayq.quantize_model(mod, params, dataset, calibration="kl")
    lib = relayq.build(qmodel)
"""
from . import frontend, qmath, transform
from .api import CompiledModel, QuantizedModel, build, finetune, load, load_quantized, quantize_model
from .config import LayerConfig, QConfig
from .errors import (AccuracyCollapseWarning, BiasClampWarning, BuildError, CalibrationWarning, ConfigError,
                     DatasetError, FloatFallbackWarning, FrontendError, MissingDependencyError, ModelError,
                     NothingQuantizedWarning,
                     OverflowRiskError, RelayqError, UnsupportedOpError)

__version__ = "0.1.0"
__all__ = ["quantize_model", "finetune", "build", "load", "load_quantized", "QuantizedModel", "CompiledModel", "QConfig", "LayerConfig",
           "frontend", "qmath", "transform", "RelayqError", "ConfigError", "DatasetError", "ModelError",
           "FrontendError", "UnsupportedOpError", "MissingDependencyError", "OverflowRiskError", "BuildError", "FloatFallbackWarning",
           "NothingQuantizedWarning", "BiasClampWarning", "CalibrationWarning", "AccuracyCollapseWarning"]
