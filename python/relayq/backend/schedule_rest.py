"""Schedules for every TIR function relayq's own kernels do not cover ("the rest" of a network).

TVM 0.27's CPU pipeline legalizes each Relax op to a plain loop nest and schedules nothing (no dlight
for CPU): a layer norm, a softmax, a GELU or an attention matmul then runs as one serial scalar loop,
seconds per image on a transformer. :func:`schedule_function` gives each such PrimFunc (after FuseOps /
FuseTIR, so an elementwise chain is one function) a CPU schedule, chosen by the function's shape:

=================  ========================================================================================
function kind      schedule
=================  ========================================================================================
matmul             ``C[b.., i, j] += A[b.., i, k] * B[b.., k, j]`` (any operand layout, fp32 or int):
                   register tile ``MATMUL_ROWS x lanes``, parallel over (batch, row tiles), the tile
                   accumulated in a local buffer, B repacked per tile when its ``j`` is not contiguous
row reduction      softmax, layer norm, mean, RMS norm: TVM's ``dlight.cpu.Reduction`` (parallel rows,
                   every block computed per row, injective blocks vectorized)
injective          elementwise chains, transposes, reshapes, resize, the int8 lookup tables and
                   requantizations: cheap producers inlined, outer loops fused and parallel, the
                   innermost loop vectorized
other reductions   pooling, reductions over outer axes: leading spatial loops fused and parallel
=================  ========================================================================================

Every schedule keeps the function's arithmetic: integer results are bit-exact; float results differ
from the unscheduled loops only by the order LLVM contracts multiply-adds (ulps, checked in tests to
1e-5 relative). A function marked ``tirx.is_scheduled`` (relayq's own kernels) is left alone; a
function whose schedule fails is left unscheduled with a debug log line, never a failed build.

:func:`relax_pipeline` is TVM's CPU pipeline with this pass after FuseTIR; ``relayq.build`` and
calibration compile through it.

Example::

    >>> import tvm
    >>> from relayq.backend import presets
    >>> target = presets.target_from_preset("x86-avx2")
    >>> pipeline = relax_pipeline(target)           # ex = tvm.compile(mod, target, relax_pipeline=pipeline)
"""
from __future__ import annotations

import logging

import tvm
from tvm import relax, s_tir, tirx

from .fast_math import fast_math
from .generic import PARALLEL_MIN_ELEMENTS
from .presets import X86_MCPUS, mcpu_of

_log = logging.getLogger("relayq")
ScheduleError = s_tir.schedule.ScheduleError
#: What a schedule primitive or TVM analysis raises on a function it cannot handle (TVM's FFI errors are
#: RuntimeError/ValueError/TypeError subclasses; a shape this module did not foresee may raise the others).
#: Such a function is left unscheduled, never a failed build.
_SCHEDULE_FAILURES = (RuntimeError, ValueError, TypeError, IndexError, AttributeError, KeyError)

#: Rows of the matmul register tile (times ``lanes`` columns): 4 x 16 fp32 accumulators fit the 16 ymm
#: registers of AVX2 with room for the broadcast A values and the B vector.
MATMUL_ROWS = 4
#: Vector registers per matmul tile row: two ymm (16 fp32 columns) per A broadcast.
MATMUL_VECTORS = 2
#: Below this many multiply-adds a matmul gets the plain injective/reduction schedule (a tile would
#: cost more in loop overhead than it saves).
MATMUL_MIN_MACS = 4096
# Loop nests with fewer iterations than PARALLEL_MIN_ELEMENTS (imported from .generic, which holds the
# rule for relayq's own kernels too) run serially: a parallel launch costs a few microseconds, about what
# one core needs for this many simple elements.
#: relax_pipeline rewrites float exp / erf / tanh into vectorizable polynomials (relayq.backend.fast_math).
FAST_MATH = True
#: Calls that make a producer expensive to recompute: such a block is inlined only into a single
#: injective consumer (each of its elements is then computed once).
EXPENSIVE_CALLS = ("tirx.exp", "tirx.exp2", "tirx.erf", "tirx.tanh", "tirx.sigmoid", "tirx.log", "tirx.log2",
                   "tirx.log1p", "tirx.sqrt", "tirx.rsqrt", "tirx.pow", "tirx.sin", "tirx.cos", "tirx.atan",
                   "tirx.fmod")
#: A producer whose element takes more TIR nodes than this is expensive too (fast_math's polynomials for
#: exp / erf / tanh have no call left): it is not inlined where its element would be computed twice.
EXPENSIVE_NODES = 32
#: Largest reduction window (product of the reduction loops) vectorized across outputs: pooling windows
#: are 4..49 taps; a longer reduction (a global mean) is better served by the row-reduction schedule.
MAX_WINDOW = 64
#: Without a known ``mcpu``: SSE2 (x86-64 baseline) and NEON are 128 bits.
DEFAULT_VECTOR_BITS = 128


def vector_bits(target: tvm.target.Target) -> int:
    """The vector register width relayq schedules for on ``target`` (:data:`relayq.backend.presets.X86_MCPUS`).

    >>> from relayq.backend import presets
    >>> vector_bits(presets.target_from_preset("x86-avx2"))
    256
    """
    known = X86_MCPUS.get(mcpu_of(target))
    return known[1] if known is not None else DEFAULT_VECTOR_BITS


# ----------------------------------------------------------------------------- block analysis
def _root(sch):
    func = sch.mod["main"]
    return sch.get_sblock(func.body.block.name_hint)


def _iter_kinds(sch, block) -> str:
    """``"S"`` / ``"R"`` per block iter (``"O"`` for anything else), e.g. ``"SSR"`` for a matmul."""
    kinds = []
    for iv in sch.get(block).iter_vars:
        kinds.append({0: "S", 2: "R"}.get(int(iv.iter_type), "O"))
    return "".join(kinds)


def _loop_kinds(sch, block) -> str:
    """Per loop of ``block``: ``"S"`` when its var feeds only spatial iters, ``"R"`` when only reduction
    iters, ``"X"`` when both or neither (unit loops count as spatial)."""
    stmt = sch.get(block)
    binds = list(_realize(sch, block).iter_values)
    kinds = []
    for loop in sch.get_loops(block):
        lv = sch.get(loop).loop_var
        used = set()
        for iv, val in zip(stmt.iter_vars, binds):
            if _uses(val, lv):
                used.add({0: "S", 2: "R"}.get(int(iv.iter_type), "O"))
        if not used:
            kinds.append("S")
        elif len(used) == 1:
            kinds.append(used.pop())
        else:
            kinds.append("X")
    return "".join(kinds)


def _realize(sch, block):
    """The SBlockRealize of ``block`` (it holds the iter bindings)."""
    return _GET_REALIZE(sch, block)


_GET_REALIZE = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")
# Fields through which :func:`_nodes` walks a TIR statement or expression.
_CHILD_FIELDS = ("a", "b", "value", "args", "indices", "condition", "true_value", "false_value", "base", "body",
                 "seq", "then_case", "else_case", "block", "init")


def _nodes(node):
    """Every TIR node under ``node`` (statements and expressions), depth first."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None or isinstance(n, (int, float, str)):
            continue
        yield n
        for field in _CHILD_FIELDS:
            child = getattr(n, field, None) if not isinstance(n, (tvm.ir.Var, tirx.IntImm, tirx.FloatImm)) else None
            if child is None:
                continue
            if isinstance(child, (list, tuple, tvm.ir.Array)) or type(child).__name__ == "Array":
                stack.extend(child)
            else:
                stack.append(child)


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _calls(stmt) -> set:
    return {n.op.name for n in _nodes(stmt) if isinstance(n, tvm.ir.Call) and isinstance(n.op, tvm.ir.Op)}


def _size(stmt) -> int:
    """How many TIR nodes ``stmt`` holds."""
    return sum(1 for _ in _nodes(stmt))


def _loads_of(stmt, buf) -> int:
    """How many loads of ``buf`` ``stmt``'s expression holds."""
    return sum(1 for n in _nodes(stmt) if _is_load(n) and n.source.same_as(buf))


def _is_load(n) -> bool:
    return isinstance(n, tvm.ir.TensorLoad)


def _extent(sch, loop):
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _is_param(func, buf) -> bool:
    """Whether ``buf`` is one of the function's parameters (an input or an output tensor)."""
    return any(p.same_as(buf) for p in func.params)


def _readers(sch, root, buf):
    return [b for b in sch.get_child_blocks(root) if any(r.source.same_as(buf) for r in sch.get(b).reads)]


# ----------------------------------------------------------------------------- inlining
def _inline(sch) -> None:
    """Inline every spatial block that is not a function output into its consumers, unless that would
    compute an expensive element (exp, erf, ..., or a long expression) more than once or feed a matmul."""
    root = _root(sch)
    changed = True
    while changed:
        changed = False
        for block in reversed(sch.get_child_blocks(root)):
            stmt = sch.get(block)
            if len(stmt.writes) != 1 or _is_param(sch.mod["main"], stmt.writes[0].source) or \
                    "R" in _iter_kinds(sch, block):
                continue
            readers = _readers(sch, root, stmt.writes[0].source)
            if not readers:
                continue
            if any(_is_matmul(sch, r) is not None for r in readers):
                continue
            if _calls(stmt.body) & set(EXPENSIVE_CALLS) or _size(stmt.body) > EXPENSIVE_NODES:
                # one injective reader that loads each element once: inlined, every element is still
                # computed once (a polynomial read three times by the next one, in a chain of 60 tanh,
                # would grow as 3^60)
                if len(readers) != 1 or "R" in _iter_kinds(sch, readers[0]) or \
                        _loads_of(sch.get(readers[0]).body, stmt.writes[0].source) > 1:
                    continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except ScheduleError:
                continue


# ----------------------------------------------------------------------------- matmul
class _Matmul:
    """The roles of a matmul block's loops: batch (in A, B and C), i (A and C), j (B and C), k (A, B)."""

    def __init__(self, batch, i, j, k, a, b):
        self.batch, self.i, self.j, self.k, self.a, self.b = batch, i, j, k, a, b


def _is_matmul(sch, block):
    """A ``C[...] += A[...] * B[...]`` block with one reduction iter, as :class:`_Matmul`; else None."""
    stmt = sch.get(block)
    kinds = _iter_kinds(sch, block)
    if kinds.count("R") != 1 or "O" in kinds or len(stmt.reads) < 2 or len(stmt.writes) != 1:
        return None
    body = stmt.body
    if not isinstance(body, tirx.BufferStore):
        return None
    value = body.value
    if not isinstance(value, tirx.Add):
        return None
    prod = value.b if _is_load(value.a) and value.a.source.same_as(body.buffer) else value.a
    while isinstance(prod, tirx.Cast):
        prod = prod.value
    if not isinstance(prod, tirx.Mul):
        return None
    loads = []
    for side in (prod.a, prod.b):
        while isinstance(side, tirx.Cast):
            side = side.value
        if not _is_load(side):
            return None
        loads.append(side)
    ivs = [iv.var for iv in stmt.iter_vars]
    red = ivs[kinds.index("R")]

    def used(load):
        return {n for n, v in enumerate(ivs) if any(_uses(ix, v) for ix in load.indices)}

    ua, ub = used(loads[0]), used(loads[1])
    out = {n for n, v in enumerate(ivs) if any(_uses(ix, v) for ix in body.indices)}
    k = kinds.index("R")
    if k not in ua or k not in ub:
        return None
    batch = sorted(ua & ub & out)
    i = sorted((ua - ub) & out)
    j = sorted((ub - ua) & out)
    if len(i) != 1 or len(j) != 1 or set(batch) | set(i) | set(j) != out:
        return None
    del red
    return _Matmul(batch, i[0], j[0], k, loads[0], loads[1])


def _read_index(sch, block, load) -> int | None:
    for n, region in enumerate(sch.get(block).reads):
        if region.source.same_as(load.source):
            return n
    return None


def _pack_b(sch, block, mm: _Matmul, lanes: int) -> None:
    """Copy B into a layout whose ``j`` axis is the contiguous one, when it is not already (Q @ K^T):
    the tile's vector loads then read consecutive memory instead of gathering ``lanes`` rows."""
    ivs = [iv.var for iv in sch.get(block).iter_vars]
    jvar, kvar = ivs[mm.j], ivs[mm.k]
    idx = list(mm.b.indices)
    if idx and idx[-1].same_as(jvar):
        return
    if not all(isinstance(ix, tvm.ir.Var) for ix in idx):
        return              # a computed index (an inlined reshape): no simple transposition exists
    pj = [n for n, ix in enumerate(idx) if ix.same_as(jvar)]
    if len(pj) != 1 or not any(ix.same_as(kvar) for ix in idx):
        return
    n_read = _read_index(sch, block, mm.b)
    if n_read is None:
        return
    order = [d for d in range(len(idx)) if d != pj[0]] + [pj[0]]
    copy = sch.cache_read(block, n_read, "global")
    sch.transform_layout(copy, ("write", 0), lambda *ax: [ax[d] for d in order])
    _schedule_nest(sch, copy, lanes)


def _pad_to_tiles(sch, block, mm: _Matmul, rows: int, cols: int, lanes: int) -> None:
    """Pad i and j up to whole tiles (``pad_einsum``) so that no predicate reaches the vector loop; the
    padded copy of A is inlined (its guard is one scalar branch per broadcast), the other copies become
    parallel loop nests of their own."""
    root = _root(sch)
    before = {sch.get(b).name_hint for b in sch.get_child_blocks(root)}
    padding = [1] * len(sch.get(block).iter_vars)
    padding[mm.i], padding[mm.j] = rows, cols
    sch.pad_einsum(block, padding)
    a_name = mm.a.source.name
    for b in sch.get_child_blocks(root):
        stmt = sch.get(b)
        if stmt.name_hint in before or b == block:
            continue
        if stmt.reads and stmt.reads[0].source.name == a_name:
            try:
                sch.compute_inline(b)
                continue
            except ScheduleError:
                pass
        _schedule_nest(sch, b, lanes)


def _schedule_matmul(sch, block, mm: _Matmul, lanes: int) -> bool:
    """Register-tiled, vectorized, parallel schedule of a matmul block (after its producers were inlined).

    Loop order ``batch, j tiles | i tiles, k, tile rows, tile columns``: parallel over (batch, j tiles),
    so a B tile stays in cache while every row tile passes over it; the ``rows x cols`` accumulator tile
    lives in a local buffer (registers, once LLVM unrolls it) and is written back once per tile.
    """
    loops = sch.get_loops(block)
    if len(loops) != len(sch.get(block).iter_vars):
        return False
    exts = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in exts):
        return False
    macs = 1
    for e in exts:
        macs *= e
    if macs < MATMUL_MIN_MACS:
        return False
    _pack_b(sch, block, mm, lanes)
    ni, nj = exts[mm.i], exts[mm.j]
    rows = min(MATMUL_ROWS, ni)
    cols = lanes * MATMUL_VECTORS if nj >= lanes * MATMUL_VECTORS else lanes
    if ni % rows or nj % cols:
        _pad_to_tiles(sch, block, mm, rows, cols, lanes)
    loops = sch.get_loops(block)
    io, ii = sch.split(loops[mm.i], [None, rows])
    jo, ji = sch.split(loops[mm.j], [None, cols])
    jv_o, jv = sch.split(ji, [None, lanes])
    k = loops[mm.k]
    batch = [loops[n] for n in mm.batch]
    sch.reorder(*batch, jo, io, k, ii, jv_o, jv)
    outer = sch.fuse(*batch, jo) if batch else jo
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, io, preserve_unit_loops=True)
    if macs >= PARALLEL_MIN_ELEMENTS * 16:
        sch.parallel(outer)
    sch.unroll(ii)
    sch.unroll(jv_o)
    sch.vectorize(jv)
    init = sch.decompose_reduction(block, k)
    sch.vectorize(sch.get_loops(init)[-1])
    acc_loops = sch.get_loops(acc)
    inner = acc_loops[-1]
    ext = _extent(sch, inner)
    if ext is not None and ext > lanes and ext % lanes == 0:
        _, inner = sch.split(inner, [None, lanes])
    if ext is not None and ext >= 2:
        sch.vectorize(inner)
    return True


# ----------------------------------------------------------------------------- generic loop nests
def _product(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _vector_width(ext: int, lanes: int) -> int:
    """How many iterations of a loop of ``ext`` to vectorize: ``lanes`` when it divides ``ext``, else the
    largest divisor of ``ext`` below it that is still worth a vector (4 or more), else 0. A ragged tail
    would need a predicate inside the vector loop."""
    if ext <= lanes:
        return ext if ext >= 2 else 0
    return next((d for d in range(lanes, 3, -1) if ext % d == 0), 0)


def _schedule_nest(sch, block, lanes: int) -> None:
    """A root-level loop nest: the loops above the innermost (and, for a spatial nest, the innermost's
    vector groups) fused and parallel when the nest is big enough, the innermost spatial loop vectorized."""
    loops = sch.get_loops(block)
    if not loops:
        return
    exts = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in exts):
        return
    work = _product(exts)
    kinds = _loop_kinds(sch, block)
    if _is_window_reduction(kinds, exts, lanes) and _writes_integers(sch, block) and \
            _innermost_reads_follow_outputs(sch, block):
        _schedule_window_reduction(sch, block, loops, exts, kinds.index("R"), lanes, work)
        return
    if "R" in kinds or "X" in kinds:
        lead = len(kinds) - len(kinds.lstrip("S"))
        if lead and work >= PARALLEL_MIN_ELEMENTS and _product(exts[:lead]) >= 2:
            sch.parallel(sch.fuse(*loops[:lead]) if lead > 1 else loops[0])
        return
    if len(loops) >= 2 and _schedule_padding(sch, block, loops, work):
        return
    width = _vector_width(exts[-1], lanes)
    par = list(loops[:-1])
    inner = loops[-1]
    if width and width < exts[-1]:
        groups, inner = sch.split(inner, [None, width])
        par.append(groups)
    elif not width:
        par.append(inner)
        inner = None
    if par and work >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(sch.fuse(*par) if len(par) > 1 else par[0])
    if inner is not None:
        sch.vectorize(inner)


def _schedule_padding(sch, block, loops, work: int) -> bool:
    """A constant pad (``if_then_else(in bounds, x[affine], value)``) as two vector loops per row: the fill,
    then the in-bounds copy without a test (TVM's ``decompose_padding``). The guarded loop does not
    vectorize (a per-lane test is scalarized): ResNet-18's int8 pool pad (64 x 114 x 114) took 0.30 ms
    that way, one thread. False (nothing changed) where the block is not such a pad."""
    try:
        if not sch.can_decompose_padding(block, loops[-1]):
            return False
    except _SCHEDULE_FAILURES:
        return False
    if work >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    fill = sch.decompose_padding(block, sch.get_loops(block)[-1])
    for b in (fill, block):
        sch.vectorize(sch.get_loops(b)[-1])
    return True


def _is_window_reduction(kinds: str, exts: list, lanes: int) -> bool:
    """Spatial loops, then a small reduction window innermost (max / average pooling, a depthwise
    reduction): the innermost spatial loop is long enough to vectorize across its outputs."""
    n_spatial = len(kinds) - len(kinds.lstrip("S"))
    return (n_spatial >= 1 and set(kinds[n_spatial:]) == {"R"} and _product(exts[n_spatial:]) <= MAX_WINDOW
            and _vector_width(exts[n_spatial - 1], lanes) >= 4)


def _writes_integers(sch, block) -> bool:
    """Integer output: the window schedule is for int8 / uint8 pools (measured 2.2x faster, 1 thread).
    LLVM turns the same schedule of an fp32 pool into slower code than the plain loop (0.66 -> 0.93 ms on
    ResNet's stem pool), so float pools keep the plain reduction schedule."""
    stmt = sch.get(block)
    return bool(stmt.writes) and str(stmt.writes[0].source.dtype).startswith(("int", "uint"))


def _innermost_reads_follow_outputs(sch, block) -> bool:
    """Whether every read's innermost index moves with the innermost output index (a pool's window slides
    along the row it writes), so that neighbouring outputs read neighbouring inputs; a reduction along
    the innermost axis (a layer norm's mean) does not."""
    stmt = sch.get(block)
    spatial = [iv.var for iv in stmt.iter_vars if int(iv.iter_type) == 0]
    out_last = stmt.writes[0].region[-1].min if stmt.writes else None
    if not spatial or out_last is None or not _uses(out_last, spatial[-1]):
        return False
    return all(r.region and _uses(r.region[-1].min, spatial[-1]) for r in stmt.reads
               if not r.source.same_as(stmt.writes[0].source))


def _schedule_window_reduction(sch, block, loops, exts, n_spatial: int, lanes: int, work: int) -> None:
    """Vectorize a window reduction across neighbouring outputs: the innermost spatial loop is split into
    vector groups and moved inside the window loops, so each window tap is one (strided) vector load and
    one vector max / add for ``width`` outputs at once; the accumulator's init becomes its own vector loop;
    the outer spatial loops are fused and parallel."""
    width = _vector_width(exts[n_spatial - 1], lanes)
    outer, inner = sch.split(loops[n_spatial - 1], [None, width])
    sch.reorder(outer, *loops[n_spatial:], inner)
    par = list(loops[:n_spatial - 1]) + [outer]
    if work >= PARALLEL_MIN_ELEMENTS:          # parallel and vectorize before the init is split off: both
        # want the whole reduction block under their loop
        sch.parallel(sch.fuse(*par) if len(par) > 1 else par[0])
    sch.vectorize(inner)
    init = sch.decompose_reduction(block, loops[n_spatial])
    sch.vectorize(sch.get_loops(init)[-1])


def _dtype_bits(sch, block) -> int:
    stmt = sch.get(block)
    return tvm.runtime.DataType(str(stmt.writes[0].source.dtype)).bits if stmt.writes else 32


def schedule_function(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc | None:
    """A CPU schedule of one legalized (possibly fused) PrimFunc, or None when none applies.

    >>> # scheduled = schedule_function(mod["fused_reshape_add"], presets.target_from_preset("x86-avx2"))
    """
    bits = vector_bits(target)
    sch = s_tir.Schedule(func)
    try:
        root = _root(sch)
    except (RuntimeError, AttributeError):
        return None
    blocks = sch.get_child_blocks(root)
    if not blocks:
        return None
    _inline(sch)
    blocks = sch.get_child_blocks(root)
    mms = [(sch.get(b).name_hint, _is_matmul(sch, b)) for b in blocks]
    if any(mm is not None for _, mm in mms):
        try:
            rest = []
            for name, mm in mms:
                b = sch.get_sblock(name)
                tiled = mm is not None and _schedule_matmul(sch, b, mm, max(bits // _dtype_bits(sch, b), 4))
                if not tiled:
                    rest.append(name)
            # the epilogue / prologue nests (and a matmul too small for a tile)
            for name in rest:
                b = sch.get_sblock(name)
                _schedule_nest(sch, b, max(bits // _dtype_bits(sch, b), 2))
            return sch.mod["main"]
        except _SCHEDULE_FAILURES as e:
            _log.debug("matmul schedule failed (%s): %s", func.attrs.get("global_symbol", "?"), e)
            sch = s_tir.Schedule(func)             # start over with the generic nests
            _inline(sch)
            root = _root(sch)
    # dlight's rule parallelizes rows whatever their number: only worth it on enough work (on a loaded
    # machine each parallel launch may wait a whole time slice for a descheduled worker)
    if loop_summary(func)["iterations"] >= PARALLEL_MIN_ELEMENTS:
        reduction = _row_reduction(sch.mod["main"], target, bits)
        if reduction is not None:
            return reduction
    for b in sch.get_child_blocks(root):
        _schedule_nest(sch, b, max(bits // _dtype_bits(sch, b), 2))
    return sch.mod["main"]


def _row_reduction(func, target, bits):
    """dlight's CPU reduction rule (softmax, layer norm, mean with an epilogue), or None."""
    from tvm.s_tir.dlight.cpu import Reduction

    try:
        with target:
            sch = Reduction().apply(func, target, False)
    except _SCHEDULE_FAILURES:
        return None
    if sch is None:
        return None
    return sch.mod["main"]


# ----------------------------------------------------------------------------- the pass
def is_scheduled(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` carries a schedule (relayq's kernels, or this pass's output)."""
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def schedule_rest(target: tvm.target.Target):
    """Module pass: schedule every PrimFunc not marked ``tirx.is_scheduled`` (see the module docs).

    >>> # mod = schedule_rest(target)(fused_mod)
    """

    @tvm.transform.module_pass(opt_level=0, name="RelayqScheduleRest")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            try:
                new = schedule_function(func, target)
            except _SCHEDULE_FAILURES as e:
                _log.debug("no schedule for %s: %s", gv.name_hint, e)
                new = None
            if new is not None:
                updates[gv] = new.with_attr("tirx.is_scheduled", True)
        if updates:
            mod = mod.clone()                  # a pass must not change its input module
            for gv, func in updates.items():
                mod.update_func(gv, func)
        return mod

    return _pass


def loop_summary(func: tirx.PrimFunc) -> dict:
    """What a PrimFunc's loops do: ``{"parallel": n, "vectorized": n, "iterations": total}`` (``iterations``:
    the innermost-statement executions of the whole function, a measure of its work).

    >>> # loop_summary(mod["softmax"]) -> {"parallel": 1, "vectorized": 2, "iterations": 2048}
    """
    counts = {"parallel": 0, "vectorized": 0, "iterations": 0}

    def walk(node, trip):
        if isinstance(node, tirx.For):
            kind = int(node.kind)
            if kind == int(tirx.ForKind.PARALLEL):
                counts["parallel"] += 1
            elif kind == int(tirx.ForKind.VECTORIZED):
                counts["vectorized"] += 1
            ext = int(node.extent) if isinstance(node.extent, tirx.IntImm) else 1
            walk(node.body, trip * ext)
            return
        children = [getattr(node, f, None) for f in ("body", "block", "init", "then_case", "else_case")]
        seq = getattr(node, "seq", None)
        if seq is not None:
            children.extend(seq)
        children = [c for c in children if c is not None and not isinstance(c, (int, float, str))]
        if isinstance(node, tirx.BufferStore) or not children:
            counts["iterations"] += trip
            return
        for c in children:
            walk(c, trip)

    walk(func.body, 1)
    return counts


# ----------------------------------------------------------------------------- relax-level preparation
def _pool_pad_value(dtype: str) -> float:
    """The identity of max over an integer ``dtype``: its smallest value."""
    t = tvm.runtime.DataType(dtype)
    return float(-(1 << (t.bits - 1)) if t.type_code == tvm.runtime.DataTypeCode.INT else 0)


@relax.expr_functor.mutator
class _PoolPadding(relax.PyExprMutator):
    """Integer ``max_pool2d(x, padding=p)`` -> ``max_pool2d(pad(x, p, min of dtype))``: the pool's loop then
    reads without a bounds test on every tap, and the pad is one cheap copy (ResNet-18's int8 stem pool:
    0.76 -> 0.3 ms). Float pools keep the bounds test: their pad copy (4 bytes an element, rows of odd
    length that do not vectorize) costs what the test saves."""

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.max_pool2d"):
            return call
        a = call.attrs
        pads = [int(v) for v in a.padding]
        x = call.args[0]
        dtype = str(x.ty.dtype)
        if not any(pads) or a.layout != "NCHW" or a.ceil_mode or not dtype.startswith(("int", "uint")):
            return call
        top, left, bottom, right = pads
        padded = self.builder_.emit(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right],
                                                    pad_value=_pool_pad_value(dtype)))
        return relax.op.nn.max_pool2d(padded, a.pool_size, a.strides, (0, 0, 0, 0), a.dilation,
                                      False, a.count_include_pad, a.layout, a.out_layout)


def explicit_pool_padding():
    """Module pass: max-pool padding made an explicit ``nn.pad`` (see :class:`_PoolPadding`); exact, since the
    pad value is the identity of max.

    >>> # mod = explicit_pool_padding()(mod)
    """

    @tvm.transform.module_pass(opt_level=0, name="RelayqExplicitPoolPadding")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _PoolPadding(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return _pass


def fused_and_scheduled(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` after the CPU pipeline's legalization, fusion and :func:`schedule_rest`, before VM lowering:
    the TIR functions a build runs (for inspection and tests).

    >>> # [gv.name_hint for gv, f in fused_and_scheduled(mod, t).functions_items() if not is_scheduled(f)] == []
    """
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        seq = tvm.transform.Sequential([explicit_pool_padding()] + cpu.library_dispatch_passes(target)
                                       + cpu.legalize_passes(target) + [schedule_rest(target)])
        return seq(mod)


def relax_pipeline(target: tvm.target.Target):
    """TVM's default Relax pipeline for ``target`` with :func:`schedule_rest` after FuseTIR (CPU targets);
    other targets get TVM's own default pipeline (dlight on GPUs). On CPU targets float ``exp`` / ``erf`` /
    ``tanh`` first become vectorizable polynomials (:mod:`relayq.backend.fast_math`; off with
    ``FAST_MATH = False``).

    >>> # ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    """
    if target.kind.name != "llvm":
        return relax.get_default_pipeline(target)
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="RelayqCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential([explicit_pool_padding()] + ([fast_math()] if FAST_MATH else [])
                                           + cpu.library_dispatch_passes(target)
                                           + cpu.legalize_passes(target) + [schedule_rest(target)]
                                           + cpu.dataflow_lower_passes(target)
                                           + cpu.finalize_passes(target))
            return seq(mod)

    return _pipeline
