"""The public entry points: :func:`quantize_model`, :func:`build`, :func:`load`.

Example::

    import relayq
    mod, params = relayq.frontend.from_onnx("mobilenet_v2.onnx")
    qmodel = relayq.quantize_model(mod, params, dataset=calib_batches, calibration="kl")
    print(qmodel.summary())
    lib = relayq.build(qmodel)
    logits = lib(image_batch)
    lib.export("mobilenet_v2_int8.so")
    same = relayq.load("mobilenet_v2_int8.so")
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any

import numpy as np
import tvm

from .analysis.check import HeldBatches, check_accuracy
from .config import CALIBRATION_METHODS, DEFAULT_CALIBRATION, QConfig, as_config, check_layer_names, closest
from .errors import BuildError, ConfigError, DatasetError, ModelError, NothingQuantizedWarning, RelayqError
from .runtime import CompiledModel, host_target, splittable_batch
from .runtime import load as _load_compiled
from .transform.annotate import annotate, layer_aliases, layers
from .transform.calibrate import CalibrationStats, QPoint, calibrate, input_specs
from .transform.prepare import prepare
from .transform.realize import realize
from .utils.progress import stage


@dataclasses.dataclass
class QuantizedModel:
    """What :func:`quantize_model` returns: every stage's module, the thresholds and the integer model.

    Attributes:
        realized: the integer IRModule (``main`` takes the float inputs, returns float outputs).
        params: the integer weights and biases by point name (they are also bound in ``realized``).
        prepared / annotated / simulated: the modules after each earlier stage.
        qpoints: point name -> :class:`~relayq.transform.calibrate.QPoint`.
        calibration: the method's name; calibration_seconds: the time calibration took.
        accuracy: the quantized model against the float model on the last calibration batches (output
            cosine, top-1 agreement, per-point SQNR: see :mod:`relayq.analysis.check`), or None when
            ``QConfig.check_accuracy`` is off.
    """

    realized: tvm.IRModule
    params: dict
    prepared: tvm.IRModule
    annotated: tvm.IRModule
    simulated: tvm.IRModule
    qpoints: dict
    calibration: str
    config: QConfig
    calibration_seconds: float = 0.0
    quantized: bool = True
    accuracy: dict | None = None
    #: After :func:`finetune`: the loss, steps, seconds and per-epoch losses of the training.
    training: dict | None = None
    #: Compact calibration statistics (:class:`~relayq.transform.calibrate.CalibrationStats`): the
    #: activation histograms (256 bins a point) and input means, for reports and re-quantization.
    calibration_stats: Any = dataclasses.field(default=None, repr=False)
    #: The ONNX model the float model was imported from, when ``quantize_model`` imported it (for export_onnx).
    source_model: Any = dataclasses.field(default=None, repr=False)

    @property
    def thresholds(self) -> list:
        """``[(point name, method, threshold)]`` for every quantization point."""
        return [(p.name, p.method, p.threshold) for p in self.qpoints.values()]

    @property
    def layers(self) -> dict:
        """Quantized layer name -> op type."""
        return layers(self.annotated)

    def save(self, path: str) -> dict:
        """Write the integer model with bit-packed weights (see :mod:`relayq.artefact`); returns sizes.

        Example::

            qmodel.save("model_w4a8.rqz")      # {'packed_weights': ..., 'int8_weights': ..., 'file': ...}
            lib = relayq.build(relayq.load_quantized("model_w4a8.rqz"))
        """
        from .artefact import save

        return save(self, path)

    @property
    def layer_sources(self) -> dict:
        """Quantized layer name -> the user's names of it (``LayerSource``: ONNX node, weight, torch module)."""
        from .transform.annotate import layer_sources

        return layer_sources(self.annotated)

    def export_onnx(self, path: str, onnx_model=None, exact: bool = False) -> str:
        """Write the source ONNX graph with QuantizeLinear / DequantizeLinear pairs carrying relayq's scales.

        ``onnx_model``: the ONNX model (ModelProto or path) the float model was imported from; by default
        the one ``quantize_model`` imported itself. See :mod:`relayq.onnx_export`.

        ``exact=True`` writes relayq's integer program instead (integer convolutions, int64
        requantization; :mod:`relayq.onnx_exact`): ONNX Runtime then computes relayq's codes bit for bit,
        which a QDQ model cannot promise (the runtime requantizes in float32). It needs no source model.

        Example::

            qmodel = relayq.quantize_model("mobilenet_v2.onnx", None, calib, "kl")
            qmodel.export_onnx("mobilenet_v2_qdq.onnx")       # runs in ONNX Runtime
            qmodel.export_onnx("mobilenet_v2_int.onnx", exact=True)   # relayq's codes, bit for bit
        """
        if exact:
            from .onnx_exact import export_exact, onnx_input_names

            return export_exact(self.realized, path, onnx_input_names(onnx_model or self.source_model))
        from .onnx_export import export_onnx

        return export_onnx(self, path, onnx_model)

    def sensitivity(self, data, metric=None, bits=None, **kwargs):
        """Per-layer SQNR and metric deltas (see :func:`relayq.analysis.sensitivity`); the result is kept
        for :meth:`report`.

        Example::

            print(qmodel.sensitivity(batches).table())
        """
        from .analysis.sensitivity import sensitivity

        self._sensitivity = sensitivity(self, data, metric=metric, bits=bits, **kwargs)
        return self._sensitivity

    def report(self, path: str, sensitivity=None, worst: int = 4) -> str:
        """Write an HTML report with plots (needs matplotlib: ``pip install relayq[plots]``).

        Per-layer SQNR, the activation histograms of the ``worst`` layers with their thresholds, the
        accuracy check and the sensitivity table (``sensitivity``, or the last :meth:`sensitivity`).
        See :mod:`relayq.analysis.report`.

        Example::

            qmodel.report("report.html")
        """
        from .analysis.report import write_report

        return write_report(self, path, sensitivity or getattr(self, "_sensitivity", None), worst=worst)

    def summary(self) -> str:
        """A short text report: layers (with the source model's names), points and calibration time."""
        from .utils.names import describe

        lines = [f"relayq quantized model: {len(self.layers)} quantized layers, {len(self.qpoints)} points, "
                 f"calibration {self.calibration!r} in {self.calibration_seconds:.2f} s"]
        if self.accuracy:
            from .analysis.check import describe as describe_check

            lines.append(f"  check: {describe_check(self.accuracy)}")
        sources = self.layer_sources
        for name, op in self.layers.items():
            lines.append(f"  layer {describe(name, sources.get(name))}: {op}")
        for p in self.qpoints.values():
            lines.append(f"  {p!r}")
        return "\n".join(lines)


def _looks_like_mxnet(sym) -> bool:
    if hasattr(sym, "tojson"):
        return True
    if isinstance(sym, (str, os.PathLike)):
        s = str(sym)
        if s.endswith(".json"):
            return True
        return s.lstrip().startswith("{") and '"nodes"' in s
    return False


def _import(sym, params, shapes):
    """Turn any accepted model form into ``(IRModule, params)``; a model file's format is read from its content."""
    if isinstance(sym, tvm.IRModule):
        return sym, params
    try:
        import onnx
        is_onnx = isinstance(sym, onnx.ModelProto)
    except ImportError:  # pragma: no cover - onnx is a core dependency
        is_onnx = False
    fmt = "onnx" if is_onnx else None
    if fmt is None and isinstance(sym, (str, os.PathLike)) and not str(sym).lstrip().startswith("{"):
        from .frontend.detect import detect_format

        fmt = detect_format(sym)          # raises FrontendError naming a missing / unreadable path
    if fmt == "onnx":
        from .frontend.onnx import from_onnx

        mod, p = from_onnx(sym, shapes)
        if params:
            p = {**p, **params}
        return mod, p
    if fmt is None and isinstance(sym, (bytes, bytearray)) and bytes(sym[4:8]) == b"TFL3":
        fmt = "tflite"
    if fmt == "tflite":
        from .frontend.tflite import from_tflite

        mod, p = from_tflite(sym, shapes)
        return mod, {**p, **(params or {})}
    if fmt == "mxnet" or _looks_like_mxnet(sym):
        from .frontend.mxnet import from_mxnet

        arg, aux = params, None
        if isinstance(params, (tuple, list)) and len(params) == 2:
            arg, aux = params
        return from_mxnet(sym, arg, aux, shapes)
    raise ModelError(f"cannot quantize a {type(sym).__name__}: pass a Relax IRModule (with params), an ONNX "
                     "model or path, or an MXNet symbol (JSON path/string or mxnet.sym.Symbol)")


def _onnx_source(sym):
    """The ONNX model (a ModelProto or a path) ``sym`` is, or None: what export_onnx rewrites."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a core dependency
        return None
    if isinstance(sym, onnx.ModelProto):
        return sym
    if isinstance(sym, (str, os.PathLike)) and str(sym).lower().endswith(".onnx"):
        return os.path.abspath(str(sym))
    return None


def _check_calibration(calibration) -> None:
    from .calibration.methods import Calibrator

    if isinstance(calibration, Calibrator):
        return
    if not isinstance(calibration, str) or calibration not in CALIBRATION_METHODS:
        # Exact lower-case names only ("KL" is refused with a suggestion): the name is recorded in the
        # QuantizedModel and in reports, where one spelling per method keeps them comparable.
        near = closest(calibration.lower(), CALIBRATION_METHODS) if isinstance(calibration, str) else []
        raise ConfigError(f"unknown calibration method {calibration!r}"
                          + (f"; did you mean {near[0]!r}?" if near else "")
                          + f" known: {list(CALIBRATION_METHODS)} (or pass a relayq.calibration.Calibrator)")


def _check_shapes(shapes) -> None:
    """``shapes`` is None or a dict input name -> tuple of positive ints."""
    if shapes is None:
        return
    if not isinstance(shapes, dict):
        raise ConfigError(f"shapes must be a dict input name -> shape, got {shapes!r} ({type(shapes).__name__})")
    for name, shape in shapes.items():
        if not isinstance(name, str):
            raise ConfigError(f"shapes: input names must be strings, got {name!r}")
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
            raise ConfigError(f"shapes[{name!r}] must be a tuple of ints, got {shape!r}")
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d <= 0:
                raise ConfigError(f"shapes[{name!r}] must be a tuple of positive ints, got {tuple(shape)!r} "
                                  f"(bad dimension {d!r})")


def _check_module_shapes(mod, shapes) -> None:
    """A Relax module's input shapes are fixed: ``shapes`` may only restate them."""
    specs = {n: tuple(s) for n, s, _ in input_specs(mod)}
    for name, shape in shapes.items():
        if name not in specs:
            raise ConfigError(f"shapes names {name!r}, which is not an input of the module (inputs: {list(specs)})")
        if tuple(int(d) for d in shape) != specs[name]:
            raise ConfigError(f"shapes[{name!r}] = {tuple(shape)} but the module's input {name!r} has shape "
                              f"{specs[name]}: a Relax module's shapes are fixed when it is built")


class _CheckedDataset:
    """Iterates a dataset once, turning an error raised by the user's iterator into a DatasetError
    naming the batch it was producing (the original error is chained)."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        try:
            it = iter(self.data)
        except Exception as e:
            raise DatasetError(f"cannot iterate the calibration dataset ({type(self.data).__name__}): {e}") from e
        i = 0
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RelayqError:
                raise
            except Exception as e:
                raise DatasetError(f"reading calibration batch {i} failed: {type(e).__name__}: {e}") from e
            yield batch
            i += 1


class _SizedCheckedDataset(_CheckedDataset):
    def __len__(self):
        return len(self.data)


def _check_dataset(dataset):
    """The dataset as an iterable of batches, or a DatasetError saying what is wrong with it.

    One array (numpy, torch) or one dict of arrays is ONE batch, as a user who passes a single batch
    means (iterating an array would split it into samples, iterating a dict would give its keys); a
    dict whose keys are not all input names (strings) is refused with a hint to pass a list.
    """
    if dataset is None:
        raise DatasetError("a calibration dataset is required (an iterable of input batches)")
    if isinstance(dataset, np.ndarray) or (hasattr(dataset, "shape") and hasattr(dataset, "numpy")):
        return [dataset]
    if isinstance(dataset, dict):
        if not dataset or not all(isinstance(k, str) for k in dataset):
            raise DatasetError(f"the dataset is a dict with keys {list(dataset)[:5]}: pass a list of batches, each "
                               "an array, a tuple of arrays or a dict input name -> array")
        return [dataset]
    if isinstance(dataset, (str, bytes, os.PathLike)):
        raise DatasetError(f"the dataset is a {type(dataset).__name__} ({str(dataset)[:60]!r}), not batches: load "
                           "the data and pass a list of arrays (or dicts input name -> array)")
    if not hasattr(dataset, "__iter__"):
        raise DatasetError(f"the dataset must be an iterable of batches (a list, a generator, a DataLoader), got "
                           f"{dataset!r} ({type(dataset).__name__})")
    if hasattr(dataset, "__len__"):
        try:
            n = len(dataset)
        except TypeError:
            return _CheckedDataset(dataset)
        if n == 0:
            raise DatasetError("the calibration dataset is empty: pass at least one batch")
        return _SizedCheckedDataset(dataset)
    return _CheckedDataset(dataset)


def _param_names(mod) -> list:
    from .transform.common import main_function

    return [p.name for p in main_function(mod).params]


def _apply_param_overrides(mod, merged: dict, user: dict) -> dict:
    """Check that every key of the user's ``params`` names a parameter of ``main``.

    An ONNX initializer name is accepted too: TVM's importer drops the ``onnx::`` prefix that the
    PyTorch exporter puts on folded weights (``onnx::Conv_21`` becomes the parameter ``Conv_21``).
    """
    names = _param_names(mod)
    known = set(names)
    out = dict(merged)
    for key, value in user.items():
        if key in known:
            continue
        alt = key.removeprefix("onnx::") if isinstance(key, str) else key
        if alt in known:
            out.pop(key, None)
            out[alt] = value
            continue
        near = closest(alt, names)
        raise ModelError(f"params entry {key!r} matches no parameter of the model"
                         + (f"; closest: {near}" if near else f"; parameters: {names[:10]}")
                         + (" (ONNX initializers are named without their 'onnx::' prefix)" if "::" in str(key) else ""))
    return out


def _all_layer_names(prepared, annotated, config: QConfig) -> set:
    """Every layer name a skip/override entry may match: the layers of the model with nothing skipped."""
    def with_aliases(mod) -> set:
        return set(layers(mod)) | {a for names in layer_aliases(mod).values() for a in names}

    names = with_aliases(annotated)
    if config.skip_layers or config.skip_ops or any(lc.skip for lc in config.layer_overrides.values()) \
            or any(lc.skip for lc in config.op_overrides.values()):
        plain = config.replace(skip_layers=(), skip_ops=(), layer_overrides={}, op_overrides={})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names |= with_aliases(annotate(prepared, plain))
    return names


def _adaround_twin(config: QConfig):
    """The torch twin AdaRound (``adaround_inputs="quantized"``) and empirical bias correction run the
    partly quantized model with,
    or None when it is not needed or torch is missing (calibrate then warns and uses float inputs)."""
    from .transform.calibrate import needs_twin

    if not needs_twin(config):
        return None
    from .calibration.adaround import torch_available

    if not torch_available():
        return None
    from .training.graph import build_torch_graph

    return lambda mod, qpoints: build_torch_graph(mod, qpoints, learn_scales=False, train_weights=False)


def quantize_model(sym, params=None, dataset=None, calibration=DEFAULT_CALIBRATION, config: QConfig | None = None, *,
                   shapes: dict | None = None) -> QuantizedModel:
    """Quantize a float model with post-training calibration.

    Args:
        sym: a Relax ``IRModule``, an ONNX ``ModelProto`` or ``.onnx`` path, a float32 ``.tflite`` path
            (or its bytes), or an MXNet symbol (JSON path or string, or ``mxnet.sym.Symbol``).
        params: weights by name (dict of numpy arrays); for MXNet a ``.params`` path, a dict, or
            ``(arg_params, aux_params)``.
        dataset: an iterable of input batches (numpy arrays, tuples, or dicts name -> array).
        calibration: ``"naive"``, ``"kl"`` (the default), ``"percentile"``, ``"mse"``, or a Calibrator object.
        config: a :class:`~relayq.config.QConfig` (or a dict of its fields).
        shapes: input shapes for frontends that need them (MXNet, dynamic ONNX inputs, TFLite overrides).

    Example::

        qmodel = quantize_model(mod, params, dataset=[x[i:i + 8] for i in range(0, 64, 8)], calibration="kl")
        lib = build(qmodel)
    """
    config = as_config(config)
    _check_calibration(calibration)
    _check_shapes(shapes)
    dataset = _check_dataset(dataset)
    user_params = None
    if not _looks_like_mxnet(sym):
        if params is not None and not isinstance(params, dict):
            raise ModelError(f"params must be a dict name -> array, got {type(params).__name__}")
        user_params = params
    mod, params = _import(sym, params, shapes)
    if isinstance(sym, tvm.IRModule) and shapes:
        _check_module_shapes(mod, shapes)
    if user_params:
        params = _apply_param_overrides(mod, params, user_params)
    prepared = prepare(mod, params, config)
    annotated = annotate(prepared, config)
    if config.skip_layers or config.layer_overrides:
        check_layer_names(config, _all_layer_names(prepared, annotated, config))
    start = time.perf_counter()
    held = HeldBatches() if config.check_accuracy else None
    stats = CalibrationStats()
    simulated, qpoints = calibrate(annotated, dataset, calibration, config, record=held, stats=stats,
                                   twin=_adaround_twin(config))
    seconds = time.perf_counter() - start
    method = calibration if isinstance(calibration, str) else type(calibration).__name__
    if not layers(annotated):
        warnings.warn("relayq: the model has no quantizable op; the float model is returned",
                      NothingQuantizedWarning, stacklevel=2)
        return QuantizedModel(prepared, {}, prepared, annotated, simulated, {}, method, config, seconds, False)
    realized, int_params = realize(annotated, qpoints, return_params=True)
    qmodel = QuantizedModel(realized, int_params, prepared, annotated, simulated, qpoints, method, config, seconds,
                            calibration_stats=stats.compact(), source_model=_onnx_source(sym))
    if held is not None:
        # The check runs the host build; build(qmodel) for the host reuses it (see _host_build).
        qmodel.accuracy = check_accuracy(annotated, realized, qpoints, held, lambda: build(qmodel))
    return qmodel


def finetune(qmodel: QuantizedModel, data, *, loss=None, inputs=None, teacher=None, epochs: int = 1,
             steps: int | None = None, lr: float = 1e-4, scale_lr: float | None = None, bias_lr: float | None = None,
             learn_scales: bool = True, learn_weights: bool = True, distill: str = "mse", temperature: float = 1.0,
             feature_weight: float = 0.0, weight_decay: float = 0.0, any_input_size: bool = False,
             log_every: int | None = None,
             show_progress: bool | None = None, seed: int = 0) -> QuantizedModel:
    """Quantization-aware fine-tuning: train the weights and scales of a quantized model (needs torch).

    The annotated graph is turned into a trainable torch twin with fake quantization at every point
    (rounding as :mod:`relayq.qmath`, straight-through gradients, scales learned LSQ-style; see
    :mod:`relayq.training.graph`) and trained with Adam and a cosine decay, against ``loss(outputs,
    batch)`` or by default a distillation loss from the float model on unlabelled ``data``. The trained
    weights and scales go through relayq's own simulate and realize, so the returned model's realized,
    simulated and reference graphs agree bit for bit, as after any calibration. ``prepared`` stays the
    float model it started from; ``training`` records the losses.

    Args:
        data: batches of model inputs (arrays, tuples or dicts; any batch size), re-iterated every epoch,
            or a callable ``epoch -> batches`` (fresh augmentation each epoch). With ``inputs`` a batch
            can be anything: ``inputs(batch)`` returns the model inputs.
        loss: ``loss(outputs, batch) -> scalar torch tensor`` (outputs: a tensor, or a tuple for several).
        teacher: the distillation target, a callable on the input tensors (e.g. the original
            ``torch.nn.Module``); by default the float model relayq imported (``qmodel.prepared``), so
            that fine-tuning a fine-tuned model again still learns from the float model.
        epochs / steps: passes over the data, or a number of optimizer steps (wins when given).
        lr / bias_lr / scale_lr: the weights' step, the fused biases' (default ``lr``) and the scales' (log
            ratio) step, default ``10 * lr``.
        learn_scales: learn the scales too (LSQ); False trains the weights only.
        learn_weights: False keeps the weights and trains the fused biases and the scales only.
        distill: ``"mse"`` (between outputs) or ``"kl"`` (between softmaxes: classifiers); ``temperature``
            softens both softmaxes of ``"kl"``.
        feature_weight: adds an intermediate-feature loss (every activation point's fake-quantized value
            against the float model's, relative squared error, averaged over points) with this weight.
        any_input_size: training inputs may have another height and width than the model's (fully
            convolutional networks: train on smaller views, faster; they are scored at the model's size).
        log_every: also print (and log to the ``relayq.finetune`` logger) the loss every N steps.
        show_progress: a progress line per epoch with its loss; default ``qmodel.config.show_progress``.

    Example::

        q = relayq.quantize_model(mod, params, calib, "mse", relayq.QConfig(weight_bits=4, act_bits=4))
        q4 = relayq.finetune(q, [x[i:i + 64] for i in range(0, 2048, 64)], epochs=3, lr=1e-4)
        labelled = relayq.finetune(q, list(zip(xs, ys)), inputs=lambda b: b[0],
                                   loss=lambda out, b: torch.nn.functional.cross_entropy(out, torch.as_tensor(b[1])))
        lib = relayq.build(q4)
    """
    from .training import finetune_graph
    from .transform.realize import simulate

    if not isinstance(qmodel, QuantizedModel):
        raise ConfigError(f"finetune expects the QuantizedModel quantize_model returned, got {type(qmodel).__name__}")
    if not qmodel.quantized or not qmodel.qpoints:
        raise ModelError("finetune: the model has no quantized layer, there is nothing to train")
    if qmodel.annotated is None:
        raise ModelError("finetune needs the annotated graph, which a model read by load_quantized does not keep: "
                         "fine-tune the model quantize_model returned, then save it")
    if show_progress is None:
        show_progress = qmodel.config.show_progress
    result = finetune_graph(qmodel.annotated, qmodel.qpoints, data, loss=loss, inputs=inputs, teacher=teacher,
                            epochs=epochs, steps=steps, lr=lr, scale_lr=scale_lr, bias_lr=bias_lr,
                            learn_scales=learn_scales, learn_weights=learn_weights, distill=distill,
                            temperature=temperature, feature_weight=feature_weight, any_input_size=any_input_size,
                            weight_decay=weight_decay, log_every=log_every,
                            show_progress=show_progress, seed=seed, pow2=qmodel.config.power_of_two_scale,
                            float_module=qmodel.prepared)
    simulated = simulate(result.annotated, result.qpoints)
    realized, int_params = realize(result.annotated, result.qpoints, return_params=True)
    return QuantizedModel(realized, int_params, qmodel.prepared, result.annotated, simulated, result.qpoints,
                          f"{qmodel.calibration}+finetune", qmodel.config, qmodel.calibration_seconds, True,
                          None, result.summary(), source_model=qmodel.source_model)


def _resolve_target(target):
    if target is None:
        return host_target(), "host"
    if isinstance(target, tvm.target.Target):
        return target, None
    if isinstance(target, str):
        from .backend import presets

        return presets.target_from_preset(target), target
    raise ConfigError(f"target must be a preset name or a tvm.target.Target, got {type(target).__name__}")


def build(model, target=None, *, params: dict | None = None, tune_trials: int = 0, tuning_log: str | None = None,
          lower: bool = True, rpc: str | None = None, device_key: str | None = None) -> CompiledModel:
    """Compile a :class:`QuantizedModel` (or a float IRModule, for baselines) for ``target``.

    ``target``: ``None`` (the host CPU's best preset), a preset name (``"x86-avx2"``, ``"x86-vnni"``,
    ``"cuda-dp4a"``, ``"arm-dotprod"``, ``"arm-neon"``, ``"generic"``) or a ``tvm.target.Target``.
    ``rpc="host:port"`` and ``device_key``: with ``tune_trials``, measure the tuning candidates on the
    devices of that key behind that TVM RPC tracker (see :mod:`relayq.backend.rpc`).

    Example::

        lib = build(qmodel)                      # int8 model for this CPU
        fp32 = build(mod, params=params)          # the float model, for comparison
        arm = build(qmodel, target="arm-dotprod", tune_trials=64, rpc="10.0.0.5:9190", device_key="rk3588")
    """
    if (rpc is not None or device_key is not None) and not tune_trials:
        raise ConfigError("rpc= and device_key= choose where tuning candidates are measured: pass tune_trials=N "
                          "too (to run a built model on a device, use relayq.remote)")
    host_build = getattr(model, "_host_build", None)     # (realized, executable) kept by an earlier host build
    if isinstance(model, QuantizedModel) and target is None and lower and not tune_trials:
        if host_build is not None and host_build[0] is model.realized:
            return CompiledModel(host_build[1], input_specs(model.realized), host_target(),
                                 batch=splittable_batch(model.realized))
    if isinstance(model, QuantizedModel):
        mod = model.realized
    elif isinstance(model, tvm.IRModule):
        mod = prepare(model, params)
    else:
        raise ConfigError(f"build expects a QuantizedModel or an IRModule, got {type(model).__name__}")
    tgt, preset = _resolve_target(target)
    specs = input_specs(mod)
    batch = splittable_batch(mod)         # before lowering: relayq's kernels are opaque calls
    from .backend import presets

    label = presets.preset_of(tgt) if tgt.kind.name == "llvm" else str(tgt.kind.name)
    if lower:
        with stage(f"lowering for {label}"):
            mod = presets.lower_for(mod, tgt, preset)
    try:
        if tune_trials:
            from .backend import tune

            ex = tune.tune_and_compile(mod, tgt, tune_trials, tuning_log, rpc=rpc, device_key=device_key)
        else:
            with stage(f"compiling for {label}"):
                ex = tvm.compile(mod, target=tgt, relax_pipeline=presets.relax_pipeline(tgt))
    except RelayqError:
        raise
    except Exception as e:
        raise BuildError(f"compiling for {tgt} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    from .backend import presets

    if tgt.kind.name != "llvm" or presets.is_cross(tgt):
        return presets.compiled_model(ex, specs, tgt, batch=batch)   # a GPU / ARM, or compile-only where none exists
    if isinstance(model, QuantizedModel) and target is None and lower and not tune_trials:
        model._host_build = (model.realized, ex)
    return CompiledModel(ex, specs, tgt, batch=batch)


def load_quantized(path: str) -> QuantizedModel:
    """Read a model written by :meth:`QuantizedModel.save` (weights unpacked from their bit width).

    Example::

        lib = relayq.build(relayq.load_quantized("model_w4a8.rqz"))
    """
    from .artefact import load as _load

    return _load(path)


def load(path: str) -> CompiledModel:
    """Load a model written by :meth:`CompiledModel.export` (checked first: see :func:`relayq.runtime.load`).

    Example::

        lib = relayq.load("model.so"); y = lib(x)
    """
    return _load_compiled(path)


__all__ = ["quantize_model", "finetune", "build", "load", "load_quantized", "QuantizedModel", "CompiledModel", "QPoint"]
