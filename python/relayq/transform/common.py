"""Small helpers shared by the passes: reading constants, walking ``main``'s bindings, op names."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..errors import ModelError

#: The packed function name of relayq's simulated-quantize marker in annotated modules.
SIMQ = "relayq.simulated_quantize"


def main_function(mod: tvm.IRModule) -> relax.Function:
    """The module's ``main`` Relax function, or a ModelError."""
    names = [gv.name_hint for gv in mod.get_global_vars()]
    if "main" not in names or not isinstance(mod["main"], relax.Function):
        raise ModelError(f"the module has no Relax function 'main' (functions: {names})")
    return mod["main"]


def map_functions(mod: tvm.IRModule, fn) -> tvm.IRModule:
    """Apply ``fn`` to every Relax function of ``mod`` and return the new module."""
    funcs = {gv: (fn(f) if isinstance(f, relax.Function) else f) for gv, f in mod.functions_items()}
    return tvm.IRModule(funcs, attrs=mod.attrs)


def is_const_expr(e) -> bool:
    """True for a Relax constant (``GenericConst``)."""
    return isinstance(e, tvm.ir.GenericConst)


def const_value(e) -> np.ndarray:
    """The numpy value of a Relax constant."""
    return e.value.numpy()


def op_name(e) -> str | None:
    """``"relax.nn.conv2d"`` for a call to that op, ``None`` for anything else."""
    if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
        return e.op.name
    return None


def shape_of(e) -> tuple:
    """Static shape of a tensor expression as a tuple of ints."""
    return tuple(int(s) for s in e.ty.shape.values)


def dtype_of(e) -> str:
    """dtype string of a tensor expression."""
    return str(e.ty.dtype)


def is_tensor(e) -> bool:
    """True when ``e`` has a static tensor type."""
    ty = getattr(e, "ty", None)
    return isinstance(ty, relax.TensorType) and ty.shape is not None and hasattr(ty.shape, "values")


def bindings(func: relax.Function) -> list:
    """All variable bindings of ``func``'s body, in order (one dataflow block after prepare)."""
    out = []
    for block in func.body.blocks:
        out.extend(block.bindings)
    return out


def simq_info(e):
    """If ``e`` is a simulated-quantize marker, return ``(input, name, role, bits, axis)``, else None."""
    if isinstance(e, relax.Call) and op_name(e) == "relax.call_pure_packed":
        f = e.args[0]
        if isinstance(f, relax.ExternFunc) and f.global_symbol == SIMQ:
            x, name, role, bits, axis = e.args[1:6]
            return x, name.value, role.value, int(bits.value), int(axis.value)
    return None


def vars_of(e) -> list:
    """The variables an expression reads, in order (through calls, tuples and tuple items)."""
    if isinstance(e, relax.Var):
        return [e]
    out = []
    if isinstance(e, relax.Tuple):
        for f in e.fields:
            out += vars_of(f)
    elif isinstance(e, relax.Call):
        for a in e.args:
            out += vars_of(a)
    elif isinstance(e, relax.TupleGetItem):
        out += vars_of(e.tuple_value)
    return out


def substitute(expr, remap: dict):
    """Rebuild ``expr`` with the variables in ``remap`` replaced (one level: calls, tuples, items)."""
    if isinstance(expr, relax.Var):
        return remap.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([substitute(f, remap) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(substitute(expr.tuple_value, remap), expr.index)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [substitute(a, remap) for a in expr.args], expr.attrs, expr.ty_args)
    return expr
