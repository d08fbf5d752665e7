"""Quantization configuration: frozen dataclasses, validated when built.

Precedence for a layer's settings: the global :class:`QConfig` values, then an entry of
``op_overrides`` matching the layer's op type (``"conv2d"``, ``"dense"``, ``"add"`` ...), then an entry
of ``layer_overrides`` matching the layer's name exactly or as a regular expression (full match).

Example::

    >>> from relayq.config import QConfig, LayerConfig
    >>> cfg = QConfig(per_channel=True, layer_overrides={"conv2d_0": LayerConfig(weight_bits=8, act_bits=8)},
    ...               skip_layers=("dense_.*",))
    >>> cfg.layer("conv2d_3", "conv2d").weight_bits
    8
    >>> cfg.layer("dense_0", "dense").skip
    True
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from .errors import ConfigError

#: Bit widths relayq can realize as integer graphs (storage int8 up to 8 bits, int16 up to 16).
MIN_BITS, MAX_BITS = 2, 16
#: Op types a user may name in ``op_overrides`` / ``skip_ops``.
OP_TYPES = ("conv2d", "dense", "add", "concat", "max_pool2d", "avg_pool2d", "global_avg_pool")
#: Calibration method names known to relayq (a calibrator object may be passed instead).
CALIBRATION_METHODS = ("naive", "kl", "percentile", "mse")
#: Weight range setting methods.
WEIGHT_METHODS = ("max", "mse")


def _check_bits(name: str, bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{name} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


@dataclass(frozen=True)
class LayerConfig:
    """Settings of one layer; ``None`` fields inherit from the level below (global, then op type).

    >>> LayerConfig(weight_bits=4).weight_bits
    4
    """

    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None
    per_channel: Optional[bool] = None
    skip: Optional[bool] = None

    def __post_init__(self):
        if self.weight_bits is not None:
            _check_bits("weight_bits", self.weight_bits)
        if self.act_bits is not None:
            _check_bits("act_bits", self.act_bits)


@dataclass(frozen=True)
class ResolvedLayer:
    """A layer's effective settings after applying the precedence rules."""

    weight_bits: int
    act_bits: int
    per_channel: bool
    skip: bool


@dataclass(frozen=True)
class QConfig:
    """Global quantization settings.

    Attributes:
        weight_bits / act_bits: code widths (2..16); 8 by default.
        per_channel: per-output-channel weight scales (conv output channels, dense output features).
        weight_method: ``"max"`` (per-tensor or per-channel max |w|) or ``"mse"``.
        percentile: the percentile used by the ``"percentile"`` calibrator.
        op_overrides: op type -> :class:`LayerConfig`.
        layer_overrides: layer name or regex -> :class:`LayerConfig`.
        skip_layers / skip_ops: layers (names or regexes) and op types kept in float.
        keep_first_last_bits: when set, the first and the last conv/dense layers use this many bits for
            weights and activations (they are the most sensitive ones), whatever the global setting.
        power_of_two_scale: round every scale up to a power of two, so that requantization is a pure
            rounding shift (for accelerators without multipliers).
        act_symmetric: symmetric signed activation codes (zero point 0, the default) or, when False,
            asymmetric unsigned codes ``[0, 2^bits - 1]`` with a zero point (ONNX Runtime's U8 scheme); the
            zero-point terms are folded into the int32 bias at realize time.
        bias_correction: subtract the expected output shift that weight quantization causes,
            ``E[(W_q - W) x]`` per output channel (x's channel means measured during calibration), from
            each conv / dense bias before it is quantized.
        show_progress: print calibration progress to stderr.
        check_accuracy: after calibration, compare the quantized model with the float model on the
            last calibration batches (:mod:`relayq.analysis.check`), store the result as
            ``QuantizedModel.accuracy`` and warn (``AccuracyCollapseWarning``) when it collapses.

    >>> QConfig(weight_bits=4).weight_bits
    4
    """

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = False
    weight_method: str = "max"
    percentile: float = 99.99
    op_overrides: Mapping[str, LayerConfig] = field(default_factory=dict)
    layer_overrides: Mapping[str, LayerConfig] = field(default_factory=dict)
    skip_layers: tuple = ()
    skip_ops: tuple = ()
    keep_first_last_bits: Optional[int] = None
    power_of_two_scale: bool = False
    act_symmetric: bool = True
    bias_correction: bool = True
    show_progress: bool = True
    check_accuracy: bool = True

    def __post_init__(self):
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        if self.keep_first_last_bits is not None:
            _check_bits("keep_first_last_bits", self.keep_first_last_bits)
        if self.weight_method not in WEIGHT_METHODS:
            raise ConfigError(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile!r}")
        for op in tuple(self.op_overrides) + tuple(self.skip_ops):
            if op not in OP_TYPES:
                raise ConfigError(f"unknown op type {op!r} in op_overrides/skip_ops; known: {OP_TYPES}")
        for key in tuple(self.layer_overrides) + tuple(self.skip_layers):
            try:
                re.compile(key)
            except re.error as e:
                raise ConfigError(f"layer pattern {key!r} is not a valid regular expression: {e}") from None
        for name, lc in list(self.op_overrides.items()) + list(self.layer_overrides.items()):
            if not isinstance(lc, LayerConfig):
                raise ConfigError(f"override for {name!r} must be a LayerConfig, got {type(lc).__name__}")
        # Freeze the mappings so that a QConfig really is immutable.
        object.__setattr__(self, "op_overrides", MappingProxyType(dict(self.op_overrides)))
        object.__setattr__(self, "layer_overrides", MappingProxyType(dict(self.layer_overrides)))
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        object.__setattr__(self, "skip_ops", tuple(self.skip_ops))

    def replace(self, **changes) -> "QConfig":
        """A copy with some fields changed. ``QConfig().replace(per_channel=True).per_channel`` is True."""
        return dataclasses.replace(self, **changes)

    def layer(self, name: str, op_type: str) -> ResolvedLayer:
        """Resolve the settings of layer ``name`` of type ``op_type`` (global -> op type -> name)."""
        vals = {"weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "per_channel": self.per_channel, "skip": op_type in self.skip_ops
                or any(_matches(p, name) for p in self.skip_layers)}
        layers = []
        if op_type in self.op_overrides:
            layers.append(self.op_overrides[op_type])
        # Exact names win over regexes: apply regex matches first, the exact entry last.
        layers += [lc for key, lc in self.layer_overrides.items() if key != name and _matches(key, name)]
        if name in self.layer_overrides:
            layers.append(self.layer_overrides[name])
        for lc in layers:
            for k in vals:
                v = getattr(lc, k)
                if v is not None:
                    vals[k] = v
        return ResolvedLayer(**vals)


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or re.fullmatch(pattern, name) is not None
