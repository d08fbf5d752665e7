"""relayq: post-training quantization for Apache TVM (Relax).

    import relayq
    qmodel = relayq.quantize_model(mod, params, dataset, calibration="kl")
    lib = relayq.build(qmodel)
"""
from . import analysis, frontend, qmath, transform
from .api import CompiledModel, QuantizedModel, build, load, load_quantized, quantize_model
from .config import LayerConfig, QConfig
from .mixed_precision import auto_mixed_precision
from .errors import (AccuracyCollapseWarning, BiasClampWarning, BuildError, CalibrationWarning, ConfigError,
                     DatasetError, FloatFallbackWarning, FrontendError, ModelError, NothingQuantizedWarning,
                     OverflowRiskError, RelayqError, UnsupportedOpError)

__version__ = "0.1.0"
__all__ = ["quantize_model", "auto_mixed_precision", "build", "load", "load_quantized", "QuantizedModel", "CompiledModel", "QConfig", "LayerConfig",
           "analysis", "frontend", "qmath", "transform", "RelayqError", "ConfigError", "DatasetError", "ModelError",
           "FrontendError", "UnsupportedOpError", "OverflowRiskError", "BuildError", "FloatFallbackWarning",
           "NothingQuantizedWarning", "BiasClampWarning", "CalibrationWarning", "AccuracyCollapseWarning"]
