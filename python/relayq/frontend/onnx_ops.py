"""relayq's ONNX converters, installed over TVM's importer table for one import: op type -> converter.

* ``Clip`` with constant bounds becomes one ``relax.op.clip`` (TVM emits two opaque ``call_tir``
  kernels, so ReLU6 could not be quantized through);
* ``Pad`` in constant mode with constant pads becomes ``relax.op.nn.pad`` (TVM emits an opaque
  ``call_tir`` of ``topi.nn.pad``); reflect / edge / wrap modes stay on TVM's converter;
* ``LSTM`` and ``GRU`` (absent from TVM 0.27's importer) are unrolled over the static sequence length
  into ``matmul`` / ``add`` / ``sigmoid`` / ``tanh`` / ``multiply`` / ``stack``. Each direction does
  one input projection for every time step (``[T*B, I] x [I, G*H]``) and one recurrent ``matmul``
  per step (``[B, H] x [H, G*H]``); the weights are sliced and transposed from the ONNX initializers,
  so they keep their names in ``params`` and become 2-D constants (quantizable dense layers) once
  ``prepare`` binds and folds them.

A converter is a class with ``get_converter(opset) -> fn(bb, inputs, attr, params)``, the protocol of
TVM's ``OnnxOpConverter``. A variant relayq does not convert raises ``NotImplementedError``, which
:func:`relayq.frontend.onnx.from_onnx` reports as an ``UnsupportedOpError`` naming the node.

Example::

    from relayq.frontend.onnx_ops import CONVERTERS
    sorted(CONVERTERS)          # ['Clip', 'GRU', 'LSTM', 'Pad']
"""
from __future__ import annotations

import numpy as np

from ..errors import FrontendError


class _Converter:
    """Base: one ``_impl(bb, inputs, attr, params, opset)`` for every opset."""

    @classmethod
    def get_converter(cls, opset):
        return lambda bb, inputs, attr, params: cls._impl(bb, inputs, attr, params, opset)


def _get_constant(expr, params):
    """The ``GenericConst`` behind an input (an initializer), or None when it is computed at run time."""
    import tvm
    from tvm.relax.frontend.onnx.onnx_frontend import get_constant

    if expr is None:
        return None
    c = get_constant(expr, params)
    return c if isinstance(c, tvm.ir.GenericConst) else None


def _attr_str(attr, name, default):
    v = attr.get(name, default)
    return v.decode("utf-8") if isinstance(v, bytes) else v


# ----------------------------------------------------------------------------------------------- Clip

class ClipToRelax(_Converter):
    """Clip with attribute bounds as ``relax.op.clip`` (one visible op).

    :func:`relayq.frontend.onnx._clip_bounds_to_attrs` first moves constant bound inputs into the
    ``min``/``max`` attributes.
    """

    @staticmethod
    def _impl(bb, inputs, attr, params, opset):
        from tvm import relax

        if len(inputs) > 1 and any(i is not None for i in inputs[1:]):
            raise FrontendError("its min/max bounds are computed at run time; relayq needs constant "
                                "Clip bounds")
        # An absent bound stays infinite: the quantizer and the backend treat the clip as open there.
        lo = float(attr.get("min", -np.inf))
        hi = float(attr.get("max", np.inf))
        return relax.op.clip(inputs[0], lo, hi)


# ------------------------------------------------------------------------------------------------ Pad

class PadToRelax(_Converter):
    """Constant-mode Pad with constant, non-negative pads as ``relax.op.nn.pad``; other Pads go to TVM."""

    @staticmethod
    def _impl(bb, inputs, attr, params, opset):
        from tvm import relax
        from tvm.relax.frontend.onnx import onnx_frontend

        mode = _attr_str(attr, "mode", "constant")
        parsed = PadToRelax._constant_pads(inputs, attr, params, opset) if mode == "constant" else None
        if parsed is None:
            return onnx_frontend.Pad.get_converter(opset)(bb, inputs, attr, params)
        before, after, value = parsed
        width = [int(p) for pair in zip(before, after) for p in pair]    # relax: (b0, a0, b1, a1, ...)
        return relax.op.nn.pad(inputs[0], width, "constant", float(value))

    @staticmethod
    def _constant_pads(inputs, attr, params, opset):
        """``(before, after, value)``, or None when the pads are computed or negative (cropping)."""
        from tvm.relax.frontend.onnx import onnx_frontend

        if opset < 11:
            pads = list(attr.get("pads", []))
            half = len(pads) // 2
            before, after, value = pads[:half], pads[half:], float(attr.get("value", 0.0))
        else:
            if _get_constant(inputs[1], params) is None:
                return None
            if len(inputs) > 2 and inputs[2] is not None and _get_constant(inputs[2], params) is None:
                return None
            if len(inputs) > 3 and inputs[3] is not None and _get_constant(inputs[3], params) is None:
                return None
            before, after, value = onnx_frontend.Pad._parse_pads_and_axes(inputs, params)
        if any(int(p) < 0 for p in list(before) + list(after)):
            return None
        return before, after, value


# --------------------------------------------------------------------------------------------- Expand

class ExpandToRelax(_Converter):
    """Expand whose target shape is an initializer (a folded ``Shape``, as ``F.normalize`` exports):
    TVM's converter reads it as a constant only when it is one, and the importer keeps initializers as
    parameters, which would leave a run-time shape (a symbolic ``broadcast_to``). Hand it the constant."""

    @staticmethod
    def _impl(bb, inputs, attr, params, opset):
        from tvm.relax.frontend.onnx import onnx_frontend

        shape = _get_constant(inputs[1], params)
        if shape is not None:
            inputs = [inputs[0], shape] + list(inputs[2:])
        return onnx_frontend.Expand.get_converter(opset)(bb, inputs, attr, params)


# ----------------------------------------------------------------------------------------- LSTM / GRU

class _Recurrent(_Converter):
    """Shared unrolling of ONNX LSTM / GRU; subclasses define the gates and the cell update."""

    #: Gates per cell (rows of W per direction, in units of hidden_size).
    GATES = 0
    #: Default activations, per direction (a model spelling out the defaults is accepted).
    ACTIVATIONS = ()
    #: The ONNX op type, for messages.
    OP = ""
    #: Input indices of the initial states (initial_h, and initial_c for LSTM).
    STATE_INPUTS = ()

    @classmethod
    def _impl(cls, bb, inputs, attr, params, opset):
        from tvm import relax

        x, w, r = inputs[0], inputs[1], inputs[2]
        get = lambda i: inputs[i] if len(inputs) > i else None      # noqa: E731 - optional inputs
        bias, seq_lens, init_h = get(3), get(4), get(5)
        direction = _attr_str(attr, "direction", "forward")
        if direction not in ("forward", "reverse", "bidirectional"):
            raise FrontendError(f"unknown direction {direction!r}")
        num_dir = 2 if direction == "bidirectional" else 1
        hidden = int(attr["hidden_size"]) if "hidden_size" in attr else int(w.ty.shape.values[1]) // cls.GATES
        layout = int(attr.get("layout", 0))
        cls._check_supported(attr, num_dir)

        if layout == 1:                  # [B, T, I] -> [T, B, I]; states [B, D, H] -> [D, B, H]
            x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        steps, batch, in_size = (int(v) for v in x.ty.shape.values)
        cls._check_sequence_lens(seq_lens, params, steps)
        states0 = cls._initial_states(bb, inputs, layout)

        ys, finals = [], []
        for d in range(num_dir):
            reverse = direction == "reverse" or d == 1
            init = [None if s is None else bb.emit(_take(s, d)) for s in states0]
            hs, last = cls._direction(bb, x, w, r, bias, d, hidden, steps, batch, in_size, reverse, init, attr)
            ys.append(bb.emit(relax.op.stack(hs, axis=0)))                 # [T, B, H]
            finals.append(last)
        y = bb.emit(relax.op.stack(ys, axis=1))                             # [T, D, B, H]
        outs = [relax.op.stack([f[k] for f in finals], axis=0) for k in range(len(finals[0]))]   # [D, B, H]
        if layout == 1:
            y = bb.emit(relax.op.permute_dims(y, [2, 0, 1, 3]))              # [B, T, D, H]
            outs = [relax.op.permute_dims(o, [1, 0, 2]) for o in outs]      # [B, D, H]
        return relax.Tuple([y] + [bb.emit(o) for o in outs])

    @classmethod
    def _check_supported(cls, attr, num_dir):
        if "clip" in attr:
            raise NotImplementedError(f"{cls.OP} with the 'clip' attribute is not supported by relayq")
        acts = attr.get("activations")
        if acts is not None:
            acts = [a.decode("utf-8") if isinstance(a, bytes) else a for a in acts]
            if [a.lower() for a in acts] != [a.lower() for a in cls.ACTIVATIONS * num_dir]:
                raise NotImplementedError(f"{cls.OP} with activations {acts} is not supported by relayq "
                                          f"(only the defaults {list(cls.ACTIVATIONS)})")

    @classmethod
    def _check_sequence_lens(cls, seq_lens, params, steps):
        if seq_lens is None:
            return
        c = _get_constant(seq_lens, params)
        if c is None or not np.all(c.value.numpy() == steps):
            raise NotImplementedError(
                f"{cls.OP} with sequence_lens is not supported by relayq: every sequence is run for the "
                f"full static length {steps} (export without packed / variable-length sequences)")

    @classmethod
    def _initial_states(cls, bb, inputs, layout):
        from tvm import relax

        states = []
        for i in cls.STATE_INPUTS:
            s = inputs[i] if len(inputs) > i else None
            if s is not None and layout == 1:
                s = bb.emit(relax.op.permute_dims(s, [1, 0, 2]))
            states.append(s)
        return states

    @classmethod
    def _input_projection(cls, bb, x, w, bias, d, num_gates_rows, steps, batch, in_size):
        """``[T, B, G*H]``: every step's ``x_t W^T + Wb``, one matmul for the whole sequence."""
        from tvm import relax

        wt = relax.op.permute_dims(_rows(w, d, 0, num_gates_rows))           # [I, G*H]
        xs = bb.emit(relax.op.reshape(x, (steps * batch, in_size)))
        proj = bb.emit(relax.op.matmul(xs, wt))
        if bias is not None:
            proj = bb.emit(relax.op.add(proj, _rows(bias, d, 0, num_gates_rows)))
        return bb.emit(relax.op.reshape(proj, (steps, batch, num_gates_rows)))


def _take(t, d):
    """``t[d]`` of a ``[D, ...]`` tensor."""
    from tvm import relax

    shape = [int(s) for s in t.ty.shape.values]
    sl = relax.op.strided_slice(t, axes=[0], begin=[d], end=[d + 1])
    return relax.op.reshape(sl, shape[1:])


def _rows(t, d, start, end):
    """``t[d, start:end]`` of a ``[D, N, ...]`` weight or ``[D, N]`` bias."""
    from tvm import relax

    shape = [int(s) for s in t.ty.shape.values]
    sl = relax.op.strided_slice(t, axes=[0, 1], begin=[d, start], end=[d + 1, end])
    return relax.op.reshape(sl, [end - start] + shape[2:])


def _step_input(bb, proj, t):
    """``proj[t]``: ``[B, G*H]`` from ``[T, B, G*H]``."""
    return bb.emit(_take(proj, t))


class LSTMToRelax(_Recurrent):
    """ONNX LSTM (gate order i, o, f, c; ``B`` = Wb then Rb), unrolled; peepholes and ``input_forget``
    are refused."""

    GATES = 4
    ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")
    OP = "LSTM"
    STATE_INPUTS = (5, 6)

    @classmethod
    def _check_supported(cls, attr, num_dir):
        super()._check_supported(attr, num_dir)
        if int(attr.get("input_forget", 0)):
            raise NotImplementedError("LSTM with input_forget=1 is not supported by relayq")

    @classmethod
    def _impl(cls, bb, inputs, attr, params, opset):
        if len(inputs) > 7 and inputs[7] is not None:
            raise NotImplementedError("LSTM with peephole weights (input P) is not supported by relayq")
        return super()._impl(bb, inputs, attr, params, opset)

    @classmethod
    def _direction(cls, bb, x, w, r, bias, d, hidden, steps, batch, in_size, reverse, init, attr):
        from tvm import relax

        g = 4 * hidden
        proj = cls._input_projection(bb, x, w, bias, d, g, steps, batch, in_size)
        rt = relax.op.permute_dims(_rows(r, d, 0, g))                         # [H, 4H]
        rb = None if bias is None else _rows(bias, d, g, 2 * g)              # Rb, [4H]
        h, c = init
        zeros = relax.const(np.zeros((batch, hidden), "float32"))
        h = zeros if h is None else h
        c = zeros if c is None else c
        hs = [None] * steps
        for t in (reversed(range(steps)) if reverse else range(steps)):
            gates = bb.emit(relax.op.add(_step_input(bb, proj, t), bb.emit(relax.op.matmul(h, rt))))
            if rb is not None:
                gates = bb.emit(relax.op.add(gates, rb))
            parts = bb.emit(relax.op.split(gates, 4, axis=1))
            i, o, f, cc = (relax.TupleGetItem(parts, k) for k in range(4))
            i = bb.emit(relax.op.sigmoid(i))
            o = bb.emit(relax.op.sigmoid(o))
            f = bb.emit(relax.op.sigmoid(f))
            cc = bb.emit(relax.op.tanh(cc))
            c = bb.emit(relax.op.add(relax.op.multiply(f, c), relax.op.multiply(i, cc)))
            h = bb.emit(relax.op.multiply(o, relax.op.tanh(c)))
            hs[t] = h
        return hs, (h, c)


class GRUToRelax(_Recurrent):
    """ONNX GRU (gate order z, r, h; ``B`` = Wb then Rb; both ``linear_before_reset`` forms), unrolled."""

    GATES = 3
    ACTIVATIONS = ("Sigmoid", "Tanh")
    OP = "GRU"
    STATE_INPUTS = (5,)

    @classmethod
    def _direction(cls, bb, x, w, r, bias, d, hidden, steps, batch, in_size, reverse, init, attr):
        from tvm import relax

        H, g = hidden, 3 * hidden
        linear_before_reset = int(attr.get("linear_before_reset", 0))
        proj = cls._input_projection(bb, x, w, bias, d, g, steps, batch, in_size)
        if linear_before_reset:
            rt = relax.op.permute_dims(_rows(r, d, 0, g))                     # [H, 3H]
            rb = None if bias is None else _rows(bias, d, g, 2 * g)
        else:
            rt = relax.op.permute_dims(_rows(r, d, 0, 2 * H))                 # [H, 2H]: z, r
            rht = relax.op.permute_dims(_rows(r, d, 2 * H, g))                # [H, H]: h
            rb = None if bias is None else _rows(bias, d, g, g + 2 * H)
            rbh = None if bias is None else _rows(bias, d, g + 2 * H, 2 * g)
        (h,) = init
        h = relax.const(np.zeros((batch, H), "float32")) if h is None else h
        one = relax.const(1.0, "float32")
        hs = [None] * steps
        for t in (reversed(range(steps)) if reverse else range(steps)):
            xparts = bb.emit(relax.op.split(_step_input(bb, proj, t), 3, axis=1))
            xz, xr, xh = (relax.TupleGetItem(xparts, k) for k in range(3))
            hp = bb.emit(relax.op.matmul(h, rt))
            if rb is not None:
                hp = bb.emit(relax.op.add(hp, rb))
            hparts = bb.emit(relax.op.split(hp, 3 if linear_before_reset else 2, axis=1))
            z = bb.emit(relax.op.sigmoid(relax.op.add(xz, relax.TupleGetItem(hparts, 0))))
            rg = bb.emit(relax.op.sigmoid(relax.op.add(xr, relax.TupleGetItem(hparts, 1))))
            if linear_before_reset:
                hh = bb.emit(relax.op.multiply(rg, relax.TupleGetItem(hparts, 2)))
            else:
                hh = bb.emit(relax.op.matmul(bb.emit(relax.op.multiply(rg, h)), rht))
                if rbh is not None:
                    hh = bb.emit(relax.op.add(hh, rbh))
            cand = bb.emit(relax.op.tanh(relax.op.add(xh, hh)))
            # (1 - z) * h~ + z * h
            h = bb.emit(relax.op.add(relax.op.multiply(relax.op.subtract(one, z), cand),
                                     relax.op.multiply(z, h)))
            hs[t] = h
        return hs, (h,)


#: op type -> converter class; installed over TVM's table by :mod:`relayq.frontend.onnx`.
CONVERTERS = {
    "Clip": ClipToRelax,
    "Pad": PadToRelax,
    "Expand": ExpandToRelax,
    "LSTM": LSTMToRelax,
    "GRU": GRUToRelax,
}
