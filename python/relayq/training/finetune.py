"""Quantization-aware fine-tuning of a calibrated annotated graph (the numerics behind ``relayq.finetune``).

The torch twin of the annotated graph (:mod:`relayq.training.graph`) is trained with Adam and a cosine
learning-rate decay: its float weights and fused biases (straight-through rounding) and, LSQ-style,
the scale of every quantization point. The loss is the user's ``loss(outputs, batch)``, or by default
distillation from the float model on unlabelled data (``"mse"`` between the float and the quantized
outputs, or ``"kl"`` between their softmaxes). The result is a new annotated module (the trained
weights and biases as its constants) and new :class:`~relayq.transform.calibrate.QPoint` records (the
learned scales; zero points and bit widths unchanged): realize, the simulated module and the numpy
reference take them like any calibration's, so they stay bit-exact with each other.

This module sits beside :mod:`relayq.analysis` (it reads transform's modules and records, and knows
nothing of the api): :func:`relayq.finetune` wraps it into a :class:`~relayq.api.QuantizedModel`.

Example::

    result = finetune_graph(qmodel.annotated, qmodel.qpoints, batches, epochs=3)
    realized = realize(result.annotated, result.qpoints)
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time

import numpy as np
import tvm
from tvm import relax

from ..errors import ConfigError, DatasetError, RelayqError
from ..runtime import batch_to_arrays
from ..transform.common import bindings, dtype_of, main_function, op_name, shape_of, simq_info
from ..utils.progress import Progress
from .graph import _key, build_torch_graph, require_torch

LOG = logging.getLogger("relayq.finetune")


def _mse(student, teacher, F):
    return F.mse_loss(student, teacher)


def _kl(student, teacher, F):
    # KL(softmax(teacher) || softmax(student)) over the last axis: the classifier's distribution.
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True)


#: Distillation losses by name: fn(student output, teacher output, torch.nn.functional) -> scalar.
DISTILL_LOSSES = {"mse": _mse, "kl": _kl}
#: The scales' learning rate relative to the weights' when ``scale_lr`` is not given: a scale is
#: learned as a log ratio, where a step of lr * SCALE_LR_FACTOR is a small relative change.
SCALE_LR_FACTOR = 10.0


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune_graph` returns.

    Attributes:
        annotated: the annotated module with the trained weights and biases.
        qpoints: point name -> QPoint with the learned scales.
        history: one dict per epoch: ``epoch``, ``loss`` (mean over its steps), ``steps``, ``seconds``.
        steps / seconds: totals; loss: what the loss was.
    """

    annotated: tvm.IRModule
    qpoints: dict
    history: list
    steps: int
    seconds: float
    loss: str

    def summary(self) -> dict:
        """A JSON-able record (kept as ``QuantizedModel.training``)."""
        return {"loss": self.loss, "steps": self.steps, "seconds": round(self.seconds, 2), "history": self.history}


def _check_options(epochs, steps, lr, scale_lr, distill, loss, inputs, teacher, log_every, weight_decay,
                   bias_lr=None, temperature=1.0, feature_weight=0.0):
    def positive_int(name, v, optional=False):
        if optional and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"finetune: {name} must be a positive int{' or None' if optional else ''}, got {v!r}")

    def positive_float(name, v, optional=False):
        if optional and v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not v > 0 \
                or not math.isfinite(float(v)):
            raise ConfigError(f"finetune: {name} must be a positive number{' or None' if optional else ''}, got {v!r}")

    positive_int("epochs", epochs)
    positive_int("steps", steps, optional=True)
    positive_int("log_every", log_every, optional=True)
    positive_float("lr", lr)
    positive_float("scale_lr", scale_lr, optional=True)
    positive_float("bias_lr", bias_lr, optional=True)
    positive_float("temperature", temperature)
    if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or feature_weight < 0 \
            or not math.isfinite(float(feature_weight)):
        raise ConfigError(f"finetune: feature_weight must be a number >= 0, got {feature_weight!r}")
    if float(temperature) != 1.0 and (distill != "kl" or loss is not None):
        raise ConfigError(f"finetune: temperature={temperature} softens the softmaxes of distill='kl'; it means "
                          f"nothing with {'a user loss' if loss is not None else f'distill={distill!r}'}")
    if feature_weight and (loss is not None or teacher is not None):
        raise ConfigError("finetune: feature_weight matches the activations of relayq's own float graph, so it "
                          "cannot be combined with a user loss or a user teacher")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ConfigError(f"finetune: weight_decay must be a number >= 0, got {weight_decay!r}")
    if distill not in DISTILL_LOSSES:
        raise ConfigError(f"finetune: unknown distillation loss {distill!r}; known: {sorted(DISTILL_LOSSES)}")
    for name, fn in (("loss", loss), ("inputs", inputs), ("teacher", teacher)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"finetune: {name} must be callable, got {type(fn).__name__}")


def _epoch_data(data, epoch: int):
    """The batches of one epoch: ``data`` itself (re-iterated), or ``data(epoch)`` for a callable."""
    if callable(data) and not hasattr(data, "__iter__"):
        try:
            batches = data(epoch)
        except RelayqError:
            raise
        except Exception as e:
            raise DatasetError(f"finetune: data({epoch}) failed: {type(e).__name__}: {e}") from e
    else:
        batches = data
    if isinstance(batches, np.ndarray) or isinstance(batches, dict) or \
            (hasattr(batches, "shape") and hasattr(batches, "detach")):
        return [batches]                    # one array or one dict is one batch, as in quantize_model
    if not hasattr(batches, "__iter__") or isinstance(batches, (str, bytes)):
        raise DatasetError(f"finetune: the data must be an iterable of batches (or a callable epoch -> batches), "
                           f"got {type(batches).__name__}")
    if epoch > 0 and iter(batches) is batches:
        raise DatasetError("finetune: the data is an iterator, used up after one epoch: pass a list, a "
                           "re-iterable loader, or a callable epoch -> batches for several epochs")
    return batches


def _to_tensors(torch, x, specs: list, where: str, any_size: bool = False) -> list:
    """The model inputs of one batch as float32 tensors, checked as every relayq batch is
    (:func:`relayq.runtime.batch_to_arrays`: names, shapes, numeric float data without NaN or Inf; an
    int array is refused as not preprocessed); the batch dimension may differ from the module's, and
    with ``any_size`` the dimensions after the second (an image's height and width) too."""
    if any_size:
        given = x if isinstance(x, (list, tuple)) else [x.get(s[0]) for s in specs] if isinstance(x, dict) else [x]
        free = []
        for spec, a in zip(specs, list(given) + [None] * len(specs)):
            shape = getattr(a, "shape", None)
            if shape is not None and len(shape) == len(spec[1]) >= 3:
                spec = (spec[0], tuple(spec[1][:2]) + tuple(int(d) for d in shape[2:]), spec[2])
            free.append(spec)
        specs = free
    arrays = batch_to_arrays(x, specs, where=where, free_batch=True)
    return [torch.from_numpy(a).float() for a in arrays]


def _as_outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _distill(torch, F, fn, student, teacher, where, temperature=1.0):
    s, t = _as_outputs(student), _as_outputs(teacher)
    if len(s) != len(t):
        raise ConfigError(f"{where}: the teacher returned {len(t)} outputs, the model {len(s)}")
    total = 0.0
    for a, b in zip(s, t):
        if not isinstance(b, torch.Tensor):
            b = torch.as_tensor(np.asarray(b), dtype=torch.float32)
        if tuple(a.shape) != tuple(b.shape):
            raise ConfigError(f"{where}: the teacher's output has shape {tuple(b.shape)}, the model's {tuple(a.shape)}")
        b = b.detach().float()
        if temperature != 1.0:
            # Hinton et al.: soften both distributions; T^2 keeps the gradients' size independent of T.
            total = total + fn(a / temperature, b / temperature, F) * temperature ** 2
        else:
            total = total + fn(a, b, F)
    return total


def _float_vars(annotated: tvm.IRModule, float_module) -> dict:
    """Each ``relax.Var`` of ``annotated`` -> the Var holding the same value in the float module (names
    can repeat, so Vars, not names). Annotation renames the quantized layers' outputs but keeps every
    other binding in order, so the bindings are paired by position when the op sequences and shapes
    match, and by unique name otherwise."""
    ann = main_function(annotated)
    if float_module is None:
        return {v: v for v in list(ann.params) + [b.var for b in bindings(ann)]}
    flt = main_function(float_module)
    a = [b for b in bindings(ann) if simq_info(b.value) is None]
    f = list(bindings(flt))
    out = dict(zip(ann.params, flt.params))

    def kind(b):
        return op_name(b.value) or type(b.value).__name__, str(getattr(b.var, "ty", None))

    if len(a) == len(f) and all(kind(x) == kind(y) for x, y in zip(a, f)):
        out.update({x.var: y.var for x, y in zip(a, f)})
    else:
        counts = {}
        for b in f:
            counts[b.var.name] = counts.get(b.var.name, 0) + 1
        by_name = {b.var.name: b.var for b in f if counts[b.var.name] == 1}
        out.update({b.var: by_name[b.var.name] for b in a if b.var.name in by_name})
    return out


def _feature_loss(student_values: dict, teacher_values: dict, pairs: list):
    """Mean over activation points of ||student - teacher||^2 / ||teacher||^2 (each point weighs the same
    whatever its range): the student's fake-quantized activation against the float model's."""
    total = 0.0
    for s_var, t_var in pairs:
        s, t = student_values[s_var], teacher_values[t_var].detach()
        total = total + (s - t).pow(2).mean() / (t.pow(2).mean() + 1e-12)
    return total / len(pairs)


def _rebind(mod: tvm.IRModule, new_values: dict) -> tvm.IRModule:
    """``mod`` with the values of some bindings of ``main`` replaced; variables (names, types) kept."""
    func = main_function(mod)
    blocks = []
    for block in func.body.blocks:
        new = [relax.VarBinding(b.var, new_values.get(b.var, b.value)) for b in block.bindings]
        blocks.append(relax.DataflowBlock(new) if isinstance(block, relax.DataflowBlock) else relax.BindingBlock(new))
    out = tvm.IRModule({gv: f for gv, f in mod.functions_items()}, attrs=mod.attrs)
    out["main"] = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure,
                                 func.attrs)
    return relax.transform.Normalize()(out)


def export(student, annotated: tvm.IRModule, qpoints: dict, learned_scales: bool) -> tuple:
    """The trained twin's weights, biases and scales as ``(annotated module, qpoints)``.

    Weight points lose their AdaRound codes (the twin started from weights that round to them) and,
    where the layer's bias was trained, their bias correction (folded into the bias at the start).

    Example::

        annotated, qpoints = export(student, qmodel.annotated, qmodel.qpoints, learned_scales=True)
    """
    new_values, new_points = {}, dict(qpoints)
    by_name = {b.var.name: b for b in bindings(main_function(annotated))}
    for b in bindings(main_function(annotated)):
        info = simq_info(b.value)
        if info is None or info[2] != "weight":
            continue
        key = _key(info[1])
        w = student.weights[key].detach().cpu().numpy().astype(np.float32)
        args = list(b.value.args)
        args[1] = relax.const(w)
        new_values[b.var] = relax.Call(b.value.op, args, b.value.attrs, b.value.ty_args)
    for key, vname in student.bias_binding.items():
        b = by_name[vname]
        old = b.value.args[1]
        bias = student.biases[key].detach().cpu().numpy().astype(np.float32).reshape(old.value.numpy().shape)
        new_values[b.var] = relax.Call(b.value.op, [b.value.args[0], relax.const(bias)], b.value.attrs, b.value.ty_args)
    folded = set(student.folded_bias_points)
    for key, fq in student.quantizers.items():
        p = qpoints[fq.name]
        changes = {"method": f"{p.method}+finetune"}
        if p.role == "weight":
            changes["codes"] = None
            if fq.name in folded:
                changes["bias_corr"] = None
        if learned_scales or fq.pow2:
            s = fq.scale().detach().cpu().numpy().astype(np.float32).astype(np.float64)
            changes["scale"] = float(s) if s.ndim == 0 else s
            if p.role == "act" and not p.signed:
                levels = p.qmax - p.qmin
                changes["threshold"] = (float(-p.zero_point * s), float((levels - p.zero_point) * s))
            else:
                changes["threshold"] = changes["scale"] * p.qmax
        new_points[fq.name] = dataclasses.replace(p, **changes)
    return _rebind(annotated, new_values), new_points


def finetune_graph(annotated: tvm.IRModule, qpoints: dict, data, *, loss=None, inputs=None, teacher=None,
                   epochs: int = 1, steps: int | None = None, lr: float = 1e-4, scale_lr: float | None = None,
                   bias_lr: float | None = None, learn_scales: bool = True, learn_weights: bool = True,
                   distill: str = "mse", temperature: float = 1.0, feature_weight: float = 0.0,
                   weight_decay: float = 0.0, any_input_size: bool = False,
                   log_every: int | None = None, show_progress: bool = True, seed: int = 0, pow2: bool = False,
                   float_module: tvm.IRModule | None = None, stream=None) -> FinetuneResult:
    """Train the torch twin of ``annotated`` and return its weights and scales (see the module docstring).

    Args:
        data: an iterable of batches (re-iterated every epoch), or a callable ``epoch -> batches`` (for
            augmentation). A batch is the model's inputs (an array, a tuple, a dict) unless ``inputs``
            picks them out of it (``inputs=lambda b: b[0]`` for ``(x, label)`` batches).
        loss: ``loss(outputs, batch) -> scalar tensor``; by default distillation from the float model.
        teacher: for distillation, a callable on the input tensors (e.g. the original ``torch.nn.Module``);
            by default the float graph of ``annotated`` itself.
        epochs / steps: passes over the data, or a number of optimizer steps (which wins when given).
        lr / bias_lr / scale_lr: Adam's step for the weights, for the fused biases (default ``lr``) and
            for the scales' log ratios (default ``10 * lr``). A small ``lr`` with a larger ``bias_lr``
            keeps the (BatchNorm-folded) weights near the float model's while the biases and scales adapt.
        distill: ``"mse"`` or ``"kl"``; ``temperature`` softens both softmaxes of ``"kl"`` (loss times T^2).
        feature_weight: adds this times the intermediate-feature loss: at every activation point, the
            squared error between the student's fake-quantized activation and the float model's,
            relative to the float one's mean square, averaged over the points. It gives every layer its
            own target (many more constraints per image than the logits: less overfitting on few images).
        any_input_size: accept training inputs whose sizes after the channel axis differ from the
            module's (a fully convolutional network trained on smaller views, which is cheaper); an op
            of fixed size (a reshape of the spatial axes) then fails with the torch error.
        learn_weights: False keeps the weights and trains the fused biases and the scales only (few
            parameters: less overfitting on a small unlabelled set).
        float_module: the float model the default teacher runs (a prepared module: its twin has no
            markers); by default the float graph of ``annotated``. Pass the original one when
            ``annotated`` was itself fine-tuned, so that a second run still learns from the float model.

    Example::

        res = finetune_graph(q.annotated, q.qpoints, [x[i:i + 32] for i in range(0, 512, 32)], epochs=2)
    """
    torch = require_torch()
    import torch.nn.functional as F

    _check_options(epochs, steps, lr, scale_lr, distill, loss, inputs, teacher, log_every, weight_decay,
                   bias_lr, temperature, feature_weight)
    stream = stream or sys.stderr
    torch.manual_seed(seed)
    student = build_torch_graph(annotated, qpoints, learn_scales=learn_scales, train_weights=learn_weights,
                                train_biases=True, pow2=pow2)
    teacher_fn = teacher
    if loss is None and teacher is None:
        float_graph = build_torch_graph(float_module if float_module is not None else annotated, qpoints,
                                        quantize=False, learn_scales=False, train_weights=False)
        float_graph.eval()
        teacher_fn = float_graph
    pairs = []
    if feature_weight:
        in_teacher = _float_vars(annotated, float_module)
        # The marker's output in the student, its input (the float activation) in the teacher.
        pairs = [(m, in_teacher[x]) for m, x in student.act_points.values() if x in in_teacher]
        if not pairs:
            raise ConfigError("finetune: feature_weight: no activation point of the quantized graph is found by "
                              "name in the float model")
    student_record = {m for m, _ in pairs}
    teacher_record = {x for _, x in pairs}
    scale_params = [q.log_ratio for q in student.quantizers.values() if q.log_ratio.requires_grad]
    weights = [p for p in student.weights.values() if p.requires_grad]
    biases = [p for p in student.biases.values() if p.requires_grad]
    groups = [{"params": weights, "lr": float(lr), "weight_decay": float(weight_decay)}] if weights else []
    if biases:
        groups.append({"params": biases, "lr": float(bias_lr or lr), "weight_decay": float(weight_decay)})
    if not weights and not biases and not scale_params:
        raise ConfigError("finetune: nothing to train (learn_weights=False, learn_scales=False and no layer "
                          "has a fused bias)")
    if scale_params:
        groups.append({"params": scale_params, "lr": float(scale_lr or lr * SCALE_LR_FACTOR), "weight_decay": 0.0})
    opt = torch.optim.Adam(groups)
    per_epoch = len(data) if hasattr(data, "__len__") and not callable(data) else None
    total = steps or (epochs * per_epoch if per_epoch else None)
    # Cosine decay to zero over the run (constant when its length is unknown).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))) if total else (lambda t: 1.0))
    specs = [(p.name, shape_of(p), dtype_of(p)) for p in main_function(annotated).params]
    loss_name = "user loss" if loss is not None else (
        f"distillation ({distill}{f', T={temperature:g}' if temperature != 1.0 else ''}"
        f"{f', features x{feature_weight:g} at {len(pairs)} points' if pairs else ''}, "
        f"{'user teacher' if teacher else 'float graph'})")
    history, step, start = [], 0, time.perf_counter()
    max_epochs = epochs if steps is None else sys.maxsize
    epoch = 0
    if show_progress:
        stream.write(f"relayq: finetune: {sum(p.numel() for g in groups for p in g['params'])} parameters "
                     f"({len(student.weights) if learn_weights else 0} weights, {len(student.biases)} biases, "
                     f"{len(scale_params)} scales), "
                     f"loss: {loss_name}, {f'{steps} steps' if steps else f'{epochs} epoch(s)'}\n")
        stream.flush()
    while epoch < max_epochs and (steps is None or step < steps):
        t0, losses = time.perf_counter(), []
        label = f"finetune epoch {epoch + 1}" + (f"/{epochs}" if steps is None else "") + ", step"
        with Progress(label, total=per_epoch, enabled=show_progress, stream=stream) as prog:
            for i, batch in enumerate(_epoch_data(data, epoch)):
                if steps is not None and step >= steps:
                    break
                where = f"finetune epoch {epoch + 1} batch {i}"
                try:
                    x = inputs(batch) if inputs is not None else batch
                except Exception as e:
                    raise DatasetError(f"{where}: inputs(batch) failed: {type(e).__name__}: {e}") from e
                tensors = _to_tensors(torch, x, specs, where, any_input_size)
                if pairs:
                    out, student_values = student(*tensors, record=student_record)
                else:
                    out = student(*tensors)
                if loss is not None:
                    try:
                        value = loss(out, batch)
                    except RelayqError:
                        raise
                    except Exception as e:
                        raise ConfigError(f"{where}: the loss function failed: {type(e).__name__}: {e}") from e
                    if not isinstance(value, torch.Tensor) or value.numel() != 1:
                        raise ConfigError(f"{where}: the loss must return a scalar torch tensor, got "
                                          f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}")
                else:
                    with torch.no_grad():
                        try:
                            if pairs:
                                target, teacher_values = teacher_fn(*tensors, record=teacher_record)
                            else:
                                target = teacher_fn(*tensors)
                        except RelayqError:
                            raise
                        except Exception as e:
                            raise ConfigError(f"{where}: the teacher failed: {type(e).__name__}: {e}") from e
                    value = _distill(torch, F, DISTILL_LOSSES[distill], out, target, where, float(temperature))
                    if pairs:
                        value = value + float(feature_weight) * _feature_loss(student_values, teacher_values, pairs)
                value = value.reshape(())
                if not torch.isfinite(value):
                    raise ConfigError(f"{where}: the loss is {float(value)}: training diverged; lower lr "
                                      f"(now {lr}) or scale_lr")
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                sched.step()
                step += 1
                losses.append(float(value.detach()))
                prog.step(note=f"loss {np.mean(losses[-20:]):.4g}")
                if log_every and step % log_every == 0:
                    msg = f"finetune step {step}{f'/{total}' if total else ''}: loss {np.mean(losses[-log_every:]):.5g}"
                    LOG.info(msg)
                    if show_progress:
                        stream.write(f"\nrelayq: {msg}\n")
        if not losses:
            if epoch == 0:
                raise DatasetError("finetune: the data is empty: pass at least one batch")
            break
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "first_loss": losses[0], "last_loss": losses[-1],
               "steps": len(losses), "seconds": round(time.perf_counter() - t0, 2)}
        history.append(rec)
        msg = (f"finetune epoch {epoch + 1}: loss {rec['loss']:.5g} (first batch {rec['first_loss']:.5g}, last "
               f"{rec['last_loss']:.5g}), {rec['steps']} steps in {rec['seconds']:.1f} s")
        LOG.info(msg)
        if show_progress:
            stream.write(f"relayq: {msg}\n")
            stream.flush()
        epoch += 1
    new_annotated, new_points = export(student, annotated, qpoints, learn_scales)
    return FinetuneResult(new_annotated, new_points, history, step, time.perf_counter() - start, loss_name)
