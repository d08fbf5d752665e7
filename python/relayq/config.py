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
import math
import numbers
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping, Optional

import numpy as np

from .errors import ConfigError

#: Bit widths relayq can realize as integer graphs (storage int8 up to 8 bits, int16 up to 16).
MIN_BITS, MAX_BITS = 2, 16
#: Op types a user may name in ``op_overrides`` / ``skip_ops``.
OP_TYPES = ("conv2d", "dense", "add", "concat", "max_pool2d", "avg_pool2d", "global_avg_pool", "elementwise", "affine",
            "multiply")
#: Calibration method names known to relayq (a calibrator object may be passed instead).
CALIBRATION_METHODS = ("naive", "kl", "percentile", "mse")
#: The calibrator of ``quantize_model``, the CLI and the zoo when none is named. The entropy method (with
#: rounding-true levels and its squared-error guard, see :func:`relayq.calibration.methods.kl_threshold`)
#: was never below ``naive`` and was at or near the top on MobileNetV2 (real weights) and the hardswish
#: networks (issue 7 item 4; numbers in the README's calibrator section).
DEFAULT_CALIBRATION = "kl"
#: Weight range setting methods.
WEIGHT_METHODS = ("max", "mse")
#: Where AdaRound takes each layer's inputs from (see QConfig.adaround_inputs).
ADAROUND_INPUTS = ("quantized", "float")
#: The percentile calibrator keeps the top (100 - p)% of |x| out of range: below the median it would
#: clip most of the distribution, which is never what a user means (a fraction like 0.9999 is the
#: usual mistake, caught here rather than silently clipping everything).
MIN_PERCENTILE = 50.0


#: How many closest names an error message suggests.
_SUGGESTIONS = 3


def closest(name, candidates, n: int = _SUGGESTIONS) -> list:
    """The ``n`` candidates closest to ``name`` (difflib ratio), best first; [] when none is close.

    >>> closest("conv2d_9", ["conv2d_0", "dense_0"])
    ['conv2d_0']
    """
    import difflib

    return difflib.get_close_matches(str(name), [str(c) for c in candidates], n=n, cutoff=0.5)


def _suggest(name, candidates) -> str:
    near = closest(name, candidates)
    return f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""


def _check_bits(name: str, bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{name} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def _check_bool(name: str, value, optional: bool = False):
    """A real boolean (Python or numpy); the strings "False" / "0" and ints are refused, not guessed."""
    if optional and value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(f"{name} must be True or False{' (or None)' if optional else ''}, got "
                      f"{value!r} ({type(value).__name__})")


def _check_choice(name: str, value, choices) -> None:
    """One of ``choices``, spelled exactly: names are lower case everywhere (reports, saved models), so
    ``"MSE"`` is refused with a suggestion rather than silently folded."""
    if not isinstance(value, str) or value not in choices:
        hint = _suggest(value.lower(), choices) if isinstance(value, str) else ""
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}{hint}")


def _name_tuple(name: str, value) -> tuple:
    """A skip list as a tuple of non-empty strings.

    A bare string is taken as ONE name (``skip_layers="conv2d_1"`` skips conv2d_1): iterating it as
    characters never means anything, and a user who writes one name expects that name to be skipped.
    A dict or a non-iterable is refused.
    """
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list, set, frozenset)):
        raise ConfigError(f"{name} must be a tuple of names, got {value!r} ({type(value).__name__})")
    for item in value:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{name} must contain non-empty strings, got {item!r} in {name}={value!r}")
    return tuple(value)


def _layer_config(field_name: str, key, value) -> "LayerConfig":
    if isinstance(value, LayerConfig):
        return value
    if isinstance(value, Mapping):
        return LayerConfig.from_dict(value, where=f"{field_name}[{key!r}]")
    raise ConfigError(f"{field_name}[{key!r}] must be a LayerConfig (or a dict of its fields), "
                      f"got {value!r} ({type(value).__name__})")


def _overrides(field_name: str, value) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field_name} must be a dict name -> LayerConfig, got {value!r} ({type(value).__name__})")
    out = {}
    for key, lc in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{field_name} keys must be non-empty strings, got {key!r}")
        out[key] = _layer_config(field_name, key, lc)
    return out


def _from_dict(cls, d, where: str):
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a dict of {cls.__name__} fields, got {type(d).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in fields:
            raise ConfigError(f"unknown {cls.__name__} field {key!r} in {where}"
                              + (_suggest(key, fields) if isinstance(key, str) else "")
                              + f" (fields: {fields})")
    return cls(**d)


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
        object.__setattr__(self, "per_channel", _check_bool("per_channel", self.per_channel, optional=True))
        object.__setattr__(self, "skip", _check_bool("skip", self.skip, optional=True))

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "LayerConfig") -> "LayerConfig":
        """Build from a dict of fields; an unknown key is a :class:`ConfigError` naming the closest fields.

        >>> LayerConfig.from_dict({"weight_bits": 4}).weight_bits
        4
        """
        return _from_dict(cls, d, where)


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
        skip_layers / skip_ops: layers (names or regexes) and op types kept in float; a bare string is
            one name. :func:`check_layer_names` refuses (in ``quantize_model``) layer entries matching no layer.
        keep_first_last_bits: when set, the first and the last conv/dense layers use this many bits for
            weights and activations (they are the most sensitive ones), whatever the global setting.
        power_of_two_scale: round every scale up to a power of two, so that requantization is a pure
            rounding shift (for accelerators without multipliers).
        act_symmetric: symmetric signed activation codes (zero point 0, the default) or, when False,
            asymmetric unsigned codes ``[0, 2^bits - 1]`` with a zero point (ONNX Runtime's U8 scheme); the
            zero-point terms are folded into the int32 bias at realize time.
        unsigned_activations: with symmetric activations, a point that calibration never saw negative
            (after a ReLU, ReLU6, sigmoid, a raw image input) takes unsigned codes ``[0, 2^bits - 1]``
            with zero point 0 instead of the signed ``[0, 2^(bits-1) - 1]`` half it would use: one more
            bit of resolution and still no zero-point arithmetic (NNCF's and OpenVINO's symmetric scheme;
            ONNX Runtime's U8 activations give the same resolution). Off by default: on an AVX2 CPU
            without VNNI, full-range uint8 inputs cannot take the exact ``vpmaddubsw`` path (its int16
            pair sums could saturate), so those layers run on the slower exact int16 path.
        bias_correction: subtract the expected output shift that weight quantization causes,
            ``E[(W_q - W) x]`` per output channel, from each conv / dense bias before it is quantized.
            ``E[x]`` is measured during calibration: per input feature for a dense, per channel and
            kernel tap for a conv (zero padding and stride included, so the shift is exact on small
            feature maps too).
        empirical_bias_correction: with ``bias_correction``, correct each conv / dense layer by
            ``E[(W_q - W) x_q]`` with ``E[x_q]`` the channel means of the input the partly quantized model
            gives the layer (earlier layers already corrected), instead of the float model's input means.
            Runs layer by layer through relayq's torch twin of the graph (needs torch). On MobileNetV2
            W8A8 per-tensor + CLE it measured below the analytic default (95.8% vs 97.5% agreement).
        cross_layer_equalization: rescale the channels of every conv2d -> (ReLU | identity) -> conv2d
            chain (depthwise included) so that each channel's weight range is the same in both layers
            (Nagel et al. 2021, section 4.3), in ``prepare``. The float function is unchanged up to
            float rounding. ReLU6 (and any other clip) is not positive homogeneous: such chains are
            left alone unless ``cle_replace_relu6`` is set.
        cle_replace_relu6: with cross-layer equalization, replace ``clip(x, 0, 6)`` by ``relu`` in the
            chains it equalizes, as the white paper does for MobileNetV2. This CHANGES the float model
            (activations above 6 are no longer clipped), hence off by default.
        high_bias_absorption: with cross-layer equalization, move the part of a layer's bias that is
            (almost) always positive, ``max(0, beta - 3 * |gamma|)`` from the BatchNorm statistics
            folded into it, through the ReLU into the next layer's bias (section 4.3.2). Only where the
            BatchNorm statistics are known and the next conv has no padding (otherwise it is inexact at
            the borders); the float output changes only where an activation was below ``beta - 3 gamma``.
        adaround: learn the rounding of every conv / dense weight (up or down) by minimizing the layer's
            output error on calibration data (AdaRound, section 4.4), instead of rounding to nearest.
            Uses torch when installed (much faster), else numpy.
        adaround_iterations: optimization steps per layer.
        adaround_samples: calibration samples per layer (output pixels for a conv, rows for a dense),
            drawn at random from the dataset (spread evenly over the batches).
        adaround_batch: samples per optimization step, drawn at random from the layer's samples (the
            papers use 32 whole images per step on a GPU; a few hundred output pixels per step make
            thousands of steps affordable on a CPU).
        adaround_inputs: ``"quantized"`` (default): learn each layer on the input the *quantized* model
            gives it (every earlier layer already rounded and bias-corrected, activations quantized),
            against the float layer on the float input (the white paper's asymmetric reconstruction),
            with empirical bias correction after each layer; needs torch (relayq's torch twin of the
            graph). ``"float"``: every layer on the float model's inputs, one pass, torch or numpy.
        adaround_activation: put the layer's bias and ReLU / ReLU6 in the reconstruction loss where
            the layer is followed by one (errors the activation clips away do not count), as the paper.
        show_progress: print calibration progress to stderr.
        check_accuracy: after calibration, compare the quantized model with the float model on the
            last calibration batches (:mod:`relayq.analysis.check`), store the result as
            ``QuantizedModel.accuracy`` and warn (``AccuracyCollapseWarning``) when it collapses.

    Every field is validated when built (a :class:`ConfigError` names the field and the value): bools
    must be real booleans, bit widths ints, names members of their sets.

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
    unsigned_activations: bool = False
    bias_correction: bool = True
    empirical_bias_correction: bool = False
    cross_layer_equalization: bool = False
    cle_replace_relu6: bool = False
    high_bias_absorption: bool = False
    adaround: bool = False
    adaround_iterations: int = 1000
    adaround_samples: int = 1024
    adaround_batch: int = 256
    adaround_inputs: str = "quantized"
    adaround_activation: bool = True
    show_progress: bool = True
    check_accuracy: bool = True

    def __post_init__(self):
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        if self.keep_first_last_bits is not None:
            _check_bits("keep_first_last_bits", self.keep_first_last_bits)
        for name in ("per_channel", "power_of_two_scale", "act_symmetric", "unsigned_activations",
                     "bias_correction", "show_progress", "cross_layer_equalization", "cle_replace_relu6",
                     "high_bias_absorption", "adaround", "adaround_activation", "empirical_bias_correction"):
            object.__setattr__(self, name, _check_bool(name, getattr(self, name)))
        for name in ("adaround_iterations", "adaround_samples", "adaround_batch"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, (bool, np.bool_)) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r} ({type(v).__name__})")
            object.__setattr__(self, name, int(v))
        _check_choice("weight_method", self.weight_method, WEIGHT_METHODS)
        _check_choice("adaround_inputs", self.adaround_inputs, ADAROUND_INPUTS)
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(float(p)) \
                or not MIN_PERCENTILE < float(p) <= 100.0:
            raise ConfigError(f"percentile must be a number in ({MIN_PERCENTILE}, 100], got {p!r} ({type(p).__name__})")
        object.__setattr__(self, "percentile", float(p))
        op_overrides = _overrides("op_overrides", self.op_overrides)
        layer_overrides = _overrides("layer_overrides", self.layer_overrides)
        skip_layers = _name_tuple("skip_layers", self.skip_layers)
        skip_ops = _name_tuple("skip_ops", self.skip_ops)
        for field_name, ops in (("op_overrides", tuple(op_overrides)), ("skip_ops", skip_ops)):
            for op in ops:
                if op not in OP_TYPES:
                    raise ConfigError(f"unknown op type {op!r} in {field_name}{_suggest(op, OP_TYPES)} "
                                      f"(known: {list(OP_TYPES)})")
        for field_name, keys in (("layer_overrides", tuple(layer_overrides)), ("skip_layers", skip_layers)):
            for key in keys:
                try:
                    re.compile(key)
                except re.error as e:
                    raise ConfigError(f"{field_name}: layer pattern {key!r} is not a valid regular expression: "
                                      f"{e}") from None
        # Freeze the mappings so that a QConfig really is immutable.
        object.__setattr__(self, "op_overrides", MappingProxyType(op_overrides))
        object.__setattr__(self, "layer_overrides", MappingProxyType(layer_overrides))
        object.__setattr__(self, "skip_layers", skip_layers)
        object.__setattr__(self, "skip_ops", skip_ops)

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "config") -> "QConfig":
        """Build from a dict of fields (overrides may be dicts too); an unknown key is a
        :class:`ConfigError` naming it and the closest fields.

        >>> QConfig.from_dict({"per_channel": True, "layer_overrides": {"dense_0": {"weight_bits": 4}}}).per_channel
        True
        """
        return _from_dict(cls, d, where)

    def replace(self, **changes) -> "QConfig":
        """A copy with some fields changed. ``QConfig().replace(per_channel=True).per_channel`` is True."""
        fields = [f.name for f in dataclasses.fields(self)]
        for key in changes:
            if key not in fields:
                raise ConfigError(f"unknown QConfig field {key!r}{_suggest(key, fields)}")
        return dataclasses.replace(self, **changes)

    def layer(self, name: str, op_type: str, aliases=()) -> ResolvedLayer:
        """Resolve the settings of layer ``name`` of type ``op_type`` (global -> op type -> name).

        ``aliases`` are the user's names of the same layer (its ONNX node or weight initializer name,
        its torch module path): ``skip_layers`` and ``layer_overrides`` entries may match any of them.
        """
        names = (name,) + tuple(aliases)
        vals = {"weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "per_channel": self.per_channel, "skip": op_type in self.skip_ops
                or any(_matches(p, n) for p in self.skip_layers for n in names)}
        layers = []
        if op_type in self.op_overrides:
            layers.append(self.op_overrides[op_type])
        # Exact names win over regexes: apply regex matches first, the exact entries last.
        layers += [lc for key, lc in self.layer_overrides.items()
                   if key not in names and any(_matches(key, n) for n in names)]
        layers += [self.layer_overrides[n] for n in names if n in self.layer_overrides]
        for lc in layers:
            for k in vals:
                v = getattr(lc, k)
                if v is not None:
                    vals[k] = v
        return ResolvedLayer(**vals)


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or re.fullmatch(pattern, name) is not None


def as_config(config) -> QConfig:
    """``None`` -> the defaults, a dict -> :meth:`QConfig.from_dict`, a QConfig -> itself.

    >>> as_config({"weight_bits": 4}).weight_bits
    4
    """
    if config is None:
        return QConfig()
    if isinstance(config, QConfig):
        return config
    if isinstance(config, Mapping):
        return QConfig.from_dict(config)
    raise ConfigError(f"config must be a QConfig or a dict of its fields, got {config!r} ({type(config).__name__})")


def check_layer_names(config: QConfig, layer_names: Iterable[str]) -> None:
    """Every ``skip_layers`` / ``layer_overrides`` entry must match at least one of ``layer_names``.

    ``layer_names`` is every name a layer may be matched by (relayq's ``conv2d_3`` and, where a
    frontend supplies them, the source model's names). An entry that matches nothing -- an exact name
    that does not exist or a regex that matches no layer -- is a :class:`ConfigError` naming the entry
    and the closest existing names, instead of being silently ignored.

    >>> check_layer_names(QConfig(skip_layers=("dense_.*",)), ["conv2d_0", "dense_0"])
    >>> check_layer_names(QConfig(skip_layers=("conv2d_9",)), ["conv2d_0", "dense_0"])
    Traceback (most recent call last):
    ...
    relayq.errors.ConfigError: skip_layers entry 'conv2d_9' matches no layer of the model; closest: ['conv2d_0'] ...
    """
    names = sorted(set(layer_names))
    for field_name, keys in (("skip_layers", config.skip_layers), ("layer_overrides", tuple(config.layer_overrides))):
        for key in keys:
            if any(_matches(key, n) for n in names):
                continue
            near = closest(key, names)
            shown = near if near else names[:10]
            raise ConfigError(f"{field_name} entry {key!r} matches no layer of the model; "
                              f"{'closest' if near else 'layers'}: {shown}"
                              + ("" if near or len(names) <= 10 else f" (and {len(names) - 10} more)")
                              + " (a layer name, or a regular expression matching whole names)")
