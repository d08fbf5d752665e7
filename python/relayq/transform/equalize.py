"""Cross-layer equalization and high-bias absorption (Nagel et al. 2021, white paper section 4.3).

Per-tensor weight quantization suffers when the output channels of a layer have very different
ranges (common after BatchNorm folding, e.g. in depthwise convs). For two consecutive layers
``conv1 -> f -> conv2`` with ``f`` positive homogeneous (ReLU, identity: ``f(x / s) = f(x) / s`` for
``s > 0``), dividing output channel ``c`` of conv1 (weights and bias) by ``s_c`` and multiplying input
channel ``c`` of conv2 by ``s_c`` leaves the function unchanged. Choosing ``s_c = sqrt(r1_c / r2_c)``
(``r1_c = max |W1[c]|``, ``r2_c = max |W2[:, c]|``) makes both ranges ``sqrt(r1_c * r2_c)``; with longer
chains the scalings interact, so all chains are equalized again until the scales stop changing.

A depthwise conv's channel ``c`` is both its input and its output channel; grouped convs in general
are handled by their group structure. ReLU6 (``clip(x, 0, 6)``) is *not* positive homogeneous: its
chains are skipped unless ``replace_relu6`` (the white paper's choice for MobileNetV2, which changes
the float model) turns those clips into ReLU.

High-bias absorption (optional): after equalization a ReLU layer may have large positive biases that
inflate the next layer's input range. With the BatchNorm statistics folded into conv1 (output mean
``beta``, std ``|gamma|``), ``c = max(0, beta - 3 |gamma|)`` is below almost every pre-activation value,
so ``relu(y) = relu(y - c) + c`` and ``c`` moves into conv2's bias: ``b2 += W2 c``. That identity needs
conv2 to see ``c`` everywhere, so it is only done when conv2 has no padding.

Example::

    mod, report = equalize(prepared_mod)
    print(report["chains"], report["iterations"])
"""
from __future__ import annotations

import hashlib

import numpy as np
import tvm
from tvm import relax

from .common import bindings, const_value, is_const_expr, main_function, op_name

#: Equalization stops when no channel scale of a sweep differs from 1 by more than this.
CONVERGENCE_TOL = 1e-6
#: ... or after this many sweeps over all chains (one sweep suffices for isolated pairs).
MAX_SWEEPS = 200
#: High-bias absorption keeps this many standard deviations below the mean (the white paper's 3 sigma:
#: for a Gaussian pre-activation, 99.87% of the values are above ``beta - 3 gamma``).
ABSORB_SIGMAS = 3.0


def weight_key(w: np.ndarray) -> str:
    """A content key for a folded weight: BatchNorm statistics recorded at folding time are found again
    by it (constants are rebuilt by later passes, their values are not)."""
    w = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
    return hashlib.sha1(w.tobytes() + str(w.shape).encode()).hexdigest()


def _is_relu6(call) -> bool:
    if op_name(call) != "relax.clip":
        return False
    lo, hi = (float(a.value.value) if hasattr(a.value, "value") else float(a.value) for a in call.args[1:3])
    return lo == 0.0 and hi == 6.0


def _bias_of(call, channels: int):
    """The constant bias of ``add(x, b)`` with ``b`` of shape (1, C, 1, 1) or (C, 1, 1), else None."""
    if op_name(call) != "relax.add" or not is_const_expr(call.args[1]):
        return None
    b = const_value(call.args[1])
    if b.size != channels or b.ndim < 1 or b.shape[-3 if b.ndim >= 3 else 0] != channels or b.dtype != np.float32:
        return None
    return b


def _plain_conv(call) -> bool:
    a = call.attrs
    return a.data_layout == "NCHW" and a.kernel_layout == "OIHW" and is_const_expr(call.args[1]) \
        and str(call.args[1].ty.dtype) == "float32" and (a.out_layout in (None, "", "NCHW"))


def find_chains(func: relax.Function, replace_relu6: bool = False) -> tuple[list, list]:
    """The ``conv1 -> [bias] -> [relu | relu6] -> conv2`` chains of ``func`` whose intermediate values
    have no other reader. Returns ``(chains, skipped)``; each chain is a dict of the binding vars."""
    binds = bindings(func)
    producer = {b.var: b.value for b in binds}
    uses = {}
    for b in binds:
        for a in _vars(b.value):
            uses[a] = uses.get(a, 0) + 1
    for a in _vars(func.body.body):
        uses[a] = uses.get(a, 0) + 2            # a function output is never private
    chains, skipped = [], []
    for b in binds:
        c2 = b.value
        if op_name(c2) != "relax.nn.conv2d" or not _plain_conv(c2):
            continue
        v = c2.args[0]
        act, act_var = "identity", None
        if op_name(producer.get(v)) == "relax.nn.relu":
            act, act_var, v = "relu", v, producer[v].args[0]
        elif op_name(producer.get(v)) == "relax.clip":
            if not _is_relu6(producer[v]):
                continue
            act, act_var, v = "relu6", v, producer[v].args[0]
        bias_var = None
        call = producer.get(v)
        if op_name(call) == "relax.add":
            bias_var, v = v, call.args[0]
        c1 = producer.get(v)
        if op_name(c1) != "relax.nn.conv2d" or not _plain_conv(c1) or not isinstance(v, relax.Var):
            continue
        channels = int(c1.args[1].ty.shape.values[0])
        if bias_var is not None and _bias_of(producer[bias_var], channels) is None:
            continue
        private = [x for x in (v, bias_var, act_var) if x is not None and not x.same_as(c2.args[0])]
        if any(uses.get(x, 0) != 1 for x in private) or uses.get(c2.args[0], 0) != 1:
            continue
        chain = {"conv1": v, "bias1": bias_var, "act": act, "act_var": act_var, "conv2": b.var}
        if act == "relu6" and not replace_relu6:
            skipped.append((chain, "ReLU6 is not positive homogeneous (QConfig(cle_replace_relu6=True) "
                                   "replaces it by ReLU, changing the float model)"))
            continue
        chains.append(chain)
    return chains, skipped


def _vars(e) -> list:
    from .common import vars_of
    return vars_of(e)


def _in_channel_view(w2: np.ndarray, groups: int) -> np.ndarray:
    """conv2's OIHW weight viewed as (groups, out per group, in per group, kh*kw)."""
    o, cg = w2.shape[:2]
    return w2.reshape(groups, o // groups, cg, -1)


def in_channel_ranges(w2: np.ndarray, groups: int) -> np.ndarray:
    """``max |W2[:, c]|`` for every input channel ``c`` of a (grouped) OIHW conv weight."""
    return np.abs(_in_channel_view(w2, groups)).max(axis=(1, 3)).reshape(-1)


def out_channel_ranges(w1: np.ndarray) -> np.ndarray:
    """``max |W1[c]|`` for every output channel ``c`` of an OIHW conv weight."""
    return np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)


def equalize_pair(w1, b1, w2, groups2: int):
    """One equalization step of a pair (float64 arrays, modified copies returned) and its scales."""
    r1, r2 = out_channel_ranges(w1), in_channel_ranges(w2, groups2)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    w1 = w1 / s[:, None, None, None]
    b1 = None if b1 is None else b1 / s
    o, cg = w2.shape[:2]
    w2 = (_in_channel_view(w2, groups2) * s.reshape(groups2, 1, cg, 1)).reshape(w2.shape)
    return w1, b1, w2, s


def equalize(mod: tvm.IRModule, replace_relu6: bool = False, absorb_bias: bool = False,
             bn_stats: dict | None = None) -> tuple[tvm.IRModule, dict]:
    """Cross-layer equalization of ``main``'s conv chains (and high-bias absorption when asked).

    ``bn_stats`` maps :func:`weight_key` of a folded conv weight to ``(beta, |gamma|)``, the output
    mean and std per channel of the BatchNorm folded into it (see ``prepare``). Returns the new module
    and a report: ``chains`` (equalized), ``skipped`` (with reasons), ``sweeps``, ``absorbed``.

    Example::

        mod, report = equalize(prepare(mod, params))
    """
    func = main_function(mod)
    chains, skipped = find_chains(func, replace_relu6)
    report = {"chains": len(chains), "skipped": [(c["conv1"].name, c["conv2"].name, why) for c, why in skipped],
              "sweeps": 0, "absorbed": 0}
    if not chains:
        return mod, report
    producer = {b.var: b.value for b in bindings(func)}
    weights, biases, stats = {}, {}, {}
    for ch in chains:
        for key in ("conv1", "conv2"):
            v = ch[key]
            if v not in weights:
                w = const_value(producer[v].args[1])
                weights[v] = w.astype(np.float64)
                if bn_stats and weight_key(w) in bn_stats:
                    stats[v] = [np.asarray(a, np.float64).copy() for a in bn_stats[weight_key(w)]]
        if ch["bias1"] is not None and ch["bias1"] not in biases:
            biases[ch["bias1"]] = const_value(producer[ch["bias1"]].args[1]).astype(np.float64).reshape(-1)
    for sweep in range(MAX_SWEEPS):
        worst = 0.0
        for ch in chains:
            c1, c2 = ch["conv1"], ch["conv2"]
            b1 = biases.get(ch["bias1"]) if ch["bias1"] is not None else None
            w1, b1, w2, s = equalize_pair(weights[c1], b1, weights[c2], int(producer[c2].attrs.groups))
            weights[c1], weights[c2] = w1, w2
            if b1 is not None:
                biases[ch["bias1"]] = b1
            if c1 in stats:
                stats[c1] = [a / s for a in stats[c1]]
            worst = max(worst, float(np.max(np.abs(s - 1.0))))
        report["sweeps"] = sweep + 1
        if worst < CONVERGENCE_TOL:
            break
    new_values = {}
    if absorb_bias:
        report["absorbed"] = _absorb(chains, func, producer, weights, biases, stats, new_values)
    for ch in chains:
        for key in ("conv1", "conv2"):
            call = producer[ch[key]]
            new_values[ch[key]] = relax.Call(call.op, [call.args[0], relax.const(weights[ch[key]].astype("float32"))],
                                             call.attrs, call.ty_args)
        if ch["bias1"] is not None:
            call = producer[ch["bias1"]]
            shape = const_value(call.args[1]).shape
            new_values[ch["bias1"]] = relax.Call(
                call.op, [call.args[0], relax.const(biases[ch["bias1"]].reshape(shape).astype("float32"))],
                call.attrs, call.ty_args)
        if ch["act"] == "relu6":
            new_values[ch["act_var"]] = relax.op.nn.relu(producer[ch["act_var"]].args[0])
    return _rebind(mod, func, new_values), report


def _absorb(chains, func, producer, weights, biases, stats, new_values) -> int:
    """High-bias absorption on the equalized ReLU chains; returns how many chains absorbed a bias."""
    uses = {}
    for b in bindings(func):
        for a in _vars(b.value):
            uses[a] = uses.get(a, 0) + 1
    reader = {}
    for b in bindings(func):
        for a in _vars(b.value):
            reader[a] = b.var
    done = 0
    for ch in chains:
        c1, c2 = ch["conv1"], ch["conv2"]
        if ch["act"] not in ("relu", "relu6") or ch["bias1"] is None or c1 not in stats:
            continue
        call2 = producer[c2]
        if any(int(p) for p in call2.attrs.padding) or uses.get(c2, 0) != 1:
            continue
        add2 = reader.get(c2)
        channels2 = weights[c2].shape[0]
        if add2 is None or _bias_of(producer[add2], channels2) is None or not producer[add2].args[0].same_as(c2):
            continue
        beta, gamma = stats[c1]
        c = np.maximum(0.0, beta - ABSORB_SIGMAS * np.abs(gamma))
        if not np.any(c > 0):
            continue
        biases[ch["bias1"]] = biases[ch["bias1"]] - c
        groups = int(call2.attrs.groups)
        w2 = _in_channel_view(weights[c2], groups).sum(axis=3)           # (g, og, cg)
        g, og, cg = w2.shape
        shift = np.einsum("goc,gc->go", w2, c.reshape(g, cg)).reshape(-1)
        if add2 in biases:              # conv2's bias is itself equalized (conv2 starts the next chain)
            biases[add2] = biases[add2] + shift
        else:
            b2 = const_value(producer[add2].args[1])
            new_b2 = b2.astype(np.float64) + shift.reshape(b2.shape)
            new_values[add2] = relax.Call(producer[add2].op, [c2, relax.const(new_b2.astype("float32"))],
                                          producer[add2].attrs, producer[add2].ty_args)
        stats[c1] = [beta - c, gamma]
        done += 1
    return done


def _rebind(mod: tvm.IRModule, func: relax.Function, new_values: dict) -> tvm.IRModule:
    """``func`` with the values of some bindings replaced; the variables (names, types) are kept."""
    blocks = []
    for block in func.body.blocks:
        new = [relax.VarBinding(b.var, new_values.get(b.var, b.value)) for b in block.bindings]
        blocks.append(relax.DataflowBlock(new) if isinstance(block, relax.DataflowBlock) else relax.BindingBlock(new))
    body = relax.SeqExpr(blocks, func.body.body)
    out = tvm.IRModule({gv: f for gv, f in mod.functions_items()}, attrs=mod.attrs)
    out["main"] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
    return relax.transform.Normalize()(out)
