"""Compiling and running Relax modules on the host: shared by calibration, tests and ``build``.

:class:`CompiledModel` (what :func:`relayq.build` returns and :func:`load` reads back) lives here, below
``backend`` and ``api``, so that the backend can return one without importing the API.

Example::

    fn = compile_host(mod)              # a VM function of main
    outputs = fn(x)                      # numpy in, list of numpy out
    lib = relayq.build(qmodel)           # a CompiledModel
    lib.export("model.so"); same = load("model.so")
"""
from __future__ import annotations

import functools
import json
import os
import platform
import threading

import numpy as np
import tvm
from tvm import relax

from .errors import ArtefactError, BuildError, DatasetError, UnsupportedCPUError
from .utils.files import atomic_output, sha256_file
from .utils.log import tvm_chatter_filtered
from .utils.progress import stage

#: Version of the ``.json`` that :meth:`CompiledModel.export` writes beside a library: 2 added the format
#: version itself, the library's sha256, the instruction set it needs and its batch size. Version 1 (no
#: ``format`` field) carried only the input specs and the target and is refused: re-export the model.
EXPORT_FORMAT = 2

#: LLVM target feature -> the Linux ``/proc/cpuinfo`` flag of the same instructions, for the features
#: relayq's kernels (or LLVM's code for the preset's ``mcpu``) may use. A library built with one of these
#: features dies with SIGILL on a CPU whose cpuinfo lacks the flag. x86: ``flags`` line; AArch64:
#: ``Features`` line (``asimd`` is NEON, ``asimddp`` the sdot/udot dot product).
ISA_FEATURES = {
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "bmi2": "bmi2",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512cd": "avx512cd",
    "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "amx-int8": "amx_int8",
    "neon": "asimd",
    "dotprod": "asimddp",
    "i8mm": "i8mm",
    "sve": "sve",
}
#: Words that say what a cpuinfo flag is, in error messages.
_FLAG_NOTES = {"asimd": "NEON", "asimddp": "dot product sdot/udot", "avx512_vnni": "vpdpbusd"}
#: ``platform.machine()`` spellings -> the architecture name of target triples.
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


@functools.lru_cache(maxsize=None)
def host_cpu_flags() -> frozenset:
    """The CPU flags of this machine from /proc/cpuinfo (x86 ``flags``, AArch64 ``Features``; empty where
    the file does not exist).

    >>> isinstance(host_cpu_flags(), frozenset)
    True
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_arch() -> str:
    """This machine's architecture as target triples spell it (``x86_64``, ``aarch64``).

    >>> host_arch()                     # doctest: +SKIP
    'x86_64'
    """
    m = platform.machine().lower()
    return _ARCH_ALIASES.get(m, m)


def host_target() -> tvm.target.Target:
    """The best plain LLVM target for this CPU.

    TVM's ``"llvm"`` means generic x86-64 (SSE2 only) and LLVM 22 rejects ``mcpu=native``, so relayq
    names the CPU class itself: cascadelake where avx512_vnni exists, core-avx2 where AVX2 does.
    """
    flags = host_cpu_flags()
    cfg = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
    if "avx512_vnni" in flags:
        cfg["mcpu"] = "cascadelake"
    elif "avx2" in flags:
        cfg["mcpu"] = "core-avx2"
    return tvm.target.Target(cfg)


def required_isa(target) -> dict | None:
    """What a CPU needs to run code built for ``target``: ``{"arch": ..., "features": [cpuinfo flags]}``.

    The features are LLVM's for the target's ``mcpu`` / ``mattr`` (the instructions LLVM and relayq's
    kernels may emit), translated to cpuinfo flags through :data:`ISA_FEATURES`. For a GPU target, its
    host code. None when ``target`` is not a TVM target (nothing known).

    >>> required_isa(tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"}))["features"]
    ['avx', 'avx2', 'bmi2', 'f16c', 'fma']
    """
    if isinstance(target, str):
        try:
            target = tvm.target.Target(target)
        except Exception:  # noqa: BLE001 - a target string this TVM cannot parse: nothing to check
            return None
    if not isinstance(target, tvm.target.Target):
        return None
    cpu = target if target.kind.name == "llvm" else target.host
    if cpu is None or cpu.kind.name != "llvm":
        return None
    triple = str(cpu.attrs.get("mtriple", "")) if hasattr(cpu, "attrs") else ""
    arch = _ARCH_ALIASES.get(triple.split("-")[0], triple.split("-")[0]) if triple else host_arch()
    try:
        llvm_features = {str(f) for f in tvm.target.codegen.llvm_get_cpu_features(cpu)}
    except Exception:  # noqa: BLE001 - an LLVM without this query: fall back to the arch alone
        llvm_features = set()
    return {"arch": arch, "features": sorted({ISA_FEATURES[f] for f in llvm_features if f in ISA_FEATURES})}


def describe_isa(isa: dict) -> str:
    """``"x86_64 with avx2, fma"`` (cpuinfo names, with a word on the obscure ones).

    >>> describe_isa({"arch": "aarch64", "features": ["asimd", "asimddp"]})
    'aarch64 with asimd (NEON), asimddp (dot product sdot/udot)'
    """
    feats = [f + (f" ({_FLAG_NOTES[f]})" if f in _FLAG_NOTES else "") for f in isa.get("features", [])]
    return isa["arch"] + (" with " + ", ".join(feats) if feats else "")


def check_host_isa(isa: dict | None, what: str) -> None:
    """Raise :class:`UnsupportedCPUError` when this machine lacks the architecture or a feature of ``isa``.

    ``what`` names the model (its file, or "the model built for <target>") in the message. Where the
    host's CPU flags cannot be read (no ``/proc/cpuinfo``) only the architecture is checked.

    >>> check_host_isa({"arch": host_arch(), "features": []}, "model.so")
    """
    if not isa:
        return
    arch, needed = isa.get("arch"), list(isa.get("features", []))
    here = host_arch()
    flags = host_cpu_flags()
    relevant = sorted(f for f in flags if f in set(ISA_FEATURES.values()))
    has = f"{here}" + (f" with {', '.join(relevant)}" if relevant else " without any of the SIMD extensions relayq uses")
    if arch and arch != here:
        raise UnsupportedCPUError(f"{what} was built for {describe_isa(isa)}; this host is {has}. Run it on an "
                                  f"{arch} machine (relayq_run), or build it for this one (target=None)")
    if not flags:
        # No /proc/cpuinfo (macOS, some containers): the features cannot be known, and refusing every
        # SIMD build there would refuse working models. The architecture was checked above.
        return
    missing = [f for f in needed if f not in flags]
    if missing:
        raise UnsupportedCPUError(f"{what} needs a CPU with {', '.join(missing)} (it was built for "
                                  f"{describe_isa(isa)}); this host is {has}. Running it would crash with an "
                                  "illegal instruction: build it for this CPU instead (relayq.build(..., target=None) "
                                  "picks the best preset this host runs)")


def _to_numpy(a):
    """A numpy view of an array-like: numpy, torch (detached, on the host), TVM tensors, nested lists."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach") and hasattr(a, "cpu"):          # a torch tensor, maybe on a GPU or with grad
        a = a.detach().cpu()
    if hasattr(a, "numpy") and callable(a.numpy):
        a = a.numpy()
    return np.asarray(a)


def batch_to_arrays(batch, specs: list, where: str = "batch", free_batch: bool = False) -> list:
    """Validate one dataset batch against the model inputs and return the arrays in input order.

    A batch is an array (numpy, torch, TVM; single-input models), a tuple/list of arrays in input order,
    or a dict name -> array. Raises :class:`DatasetError` naming ``where`` (the batch index) and the
    input at fault. Float arrays of another float dtype are cast; an int or bool array for a float input
    is refused (it is usually data that was not preprocessed, e.g. uint8 pixels in [0, 255]).
    With ``free_batch`` the leading dimension may be any positive size, the same for every input.

    >>> batch_to_arrays({"x": np.zeros((2, 3), "float32")}, [("x", (2, 3), "float32")])[0].shape
    (2, 3)
    """
    names = [s[0] for s in specs]
    if batch is None:
        raise DatasetError(f"{where} is None; the model expects inputs {names}")
    if isinstance(batch, (str, bytes)):
        raise DatasetError(f"{where} is a {type(batch).__name__} ({batch[:40]!r}), not an array; "
                           f"the model expects inputs {names}")
    if isinstance(batch, dict):
        unknown = sorted((k for k in batch if k not in names), key=str)
        missing = [n for n in names if n not in batch]
        if unknown or missing:
            raise DatasetError(f"{where}: input names {sorted(batch, key=str)} do not match the model inputs {names}"
                               + (f" (unknown: {unknown})" if unknown else "") + (f" (missing: {missing})" if missing else ""))
        arrays = [batch[n] for n in names]
    elif isinstance(batch, (list, tuple)):
        if len(batch) != len(names):
            if len(names) == 1:
                # Nested lists of numbers are an array literal: take them when they have the input's shape.
                try:
                    literal = np.asarray(batch)
                except (ValueError, TypeError):
                    literal = None
                if literal is not None and literal.dtype.kind in "biuf" and literal.shape == tuple(specs[0][1]):
                    return batch_to_arrays(literal, specs, where, free_batch)
                raise DatasetError(f"{where}: a {type(batch).__name__} of {len(batch)} items was given, but the model "
                                   f"has one input {names[0]!r}: pass the array itself (e.g. np.asarray(...)) or a "
                                   "1-tuple" + (" (if these are (input, label) pairs, pass only the inputs)"
                                                if len(batch) == 2 else ""))
            raise DatasetError(f"{where}: got {len(batch)} arrays, the model has {len(names)} inputs {names}")
        arrays = list(batch)
    else:
        if len(names) != 1:
            raise DatasetError(f"{where}: a bare array was given but the model has inputs {names}: pass a dict")
        arrays = [batch]
    out = []
    for (name, shape, dtype), a in zip(specs, arrays):
        if a is None:
            raise DatasetError(f"{where}: input {name!r} is None")
        if isinstance(a, (str, bytes)):
            raise DatasetError(f"{where}: input {name!r} is a {type(a).__name__}, not an array")
        try:
            a = _to_numpy(a)
        except Exception as e:
            raise DatasetError(f"{where}: input {name!r} ({type(a).__name__}) cannot be read as an array: {e}") from e
        if a.dtype.kind not in "biufc":
            raise DatasetError(f"{where}: input {name!r} is not numeric (dtype {a.dtype}), the model expects "
                               f"{dtype} of shape {tuple(shape)}")
        want = tuple(shape)
        if free_batch and a.ndim == len(want) and a.ndim and a.shape[0] > 0:
            want = (a.shape[0],) + want[1:]
        if tuple(a.shape) != want:
            hint = ""
            if a.ndim and a.shape[0] == 0:
                hint = " (an empty batch)"
            elif a.ndim == len(shape) and a.ndim and tuple(a.shape[1:]) == tuple(shape[1:]):
                hint = f" (the model was built for batch size {shape[0]}: every batch must have it)"
            expected = ("(any batch, " + ", ".join(map(str, shape[1:])) + ")") if free_batch and len(shape) else tuple(shape)
            raise DatasetError(f"{where}: input {name!r} has shape {tuple(a.shape)}, the model expects "
                               f"{expected}{hint}")
        if str(a.dtype) != dtype:
            if a.dtype.kind == "f" and np.dtype(dtype).kind == "f":
                a = a.astype(dtype)
            else:
                raise DatasetError(f"{where}: input {name!r} has dtype {a.dtype}, the model expects {dtype}"
                                   + (" (convert and scale it as the model was trained, e.g. x.astype('float32'))"
                                      if np.dtype(dtype).kind == "f" else ""))
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                raise DatasetError(f"{where}: input {name!r} contains NaN or Inf ({int(bad.sum())} of {a.size} "
                                   "values)")
        # np.ascontiguousarray would turn a rank-0 array into shape (1,).
        out.append(np.require(a, requirements="C"))
    if free_batch and len({a.shape[0] for a in out}) > 1:
        raise DatasetError(f"{where}: the inputs have different batch sizes "
                           f"{dict(zip(names, (a.shape[0] for a in out)))}")
    return out


class _ThreadVMs:
    """One ``relax.VirtualMachine`` per calling thread over one shared executable.

    A VM holds its registers, its call frames and ``set_input``'s arguments, so two threads in one VM
    overwrite each other (TVM: ``Check failed: reg < frame->register_file.size()``, then SIGSEGV). The
    executable (the code and the weights) is immutable and shared; each thread lazily gets its own VM
    and keeps it for its lifetime, so concurrent calls never wait on each other. Only creating a VM is
    serialized: it looks functions up in the shared module, whose lookup cache has no lock.
    """

    def __init__(self, executable, device):
        self.executable, self.device = executable, device
        self._local = threading.local()
        self._create = threading.Lock()

    def get(self):
        vm = getattr(self._local, "vm", None)
        if vm is None:
            with self._create:
                vm = relax.VirtualMachine(self.executable, self.device)
            self._local.vm = vm
        return vm


class HostFunction:
    """A compiled Relax ``main`` on the CPU: numpy arrays in, a list of numpy arrays out (thread-safe)."""

    def __init__(self, executable, device=None):
        self.executable = executable
        self.device = device or tvm.cpu()
        self._vms = _ThreadVMs(executable, self.device)

    @property
    def vm(self):
        """This thread's VM."""
        return self._vms.get()

    def __call__(self, *args):
        out = self.vm["main"](*[tvm.runtime.tensor(np.require(a, requirements="C"), self.device) for a in args])
        return flatten_outputs(out)


def flatten_outputs(out) -> list:
    """VM results (a Tensor or nested Arrays of them) as a flat list of numpy arrays."""
    if hasattr(out, "numpy"):
        return [out.numpy()]
    res = []
    for o in out:
        res.extend(flatten_outputs(o))
    return res


def compile_host(mod: tvm.IRModule, target=None, pipeline=None) -> HostFunction:
    """Compile ``mod`` for the host CPU with ``pipeline`` (a Relax pass; default: TVM's fusing default
    pipeline for ``target``; relayq's scheduled one is ``relayq.backend.presets.relax_pipeline(target)``).

    >>> # fn = compile_host(mod); outputs = fn(x)
    """
    target = target or host_target()
    ex = tvm.compile(mod, target=target, relax_pipeline=pipeline or relax.get_default_pipeline(target))
    return HostFunction(ex)


# ------------------------------------------------------------------------------------------------------
# Batch independence: may a larger or smaller batch be cut into (or padded to) the compiled batch?

#: Ops whose ``axis`` / ``axes`` attribute, when it names axis 0 (or is None: all axes), mixes samples.
_AXIS_ATTRS = ("axis", "axes")


def _leading_dim(ty):
    shape = getattr(ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or len(values) == 0:
        return None
    try:
        return int(values[0])
    except (TypeError, ValueError):
        return None


def _ndim(ty):
    values = getattr(getattr(ty, "shape", None), "values", None)
    return len(values) if values is not None and len(values) else None


def _tensor_types(ty):
    if isinstance(ty, relax.TensorType):
        return [ty]
    if isinstance(ty, relax.TupleType):
        return [t for f in ty.fields for t in _tensor_types(f)]
    return None                       # an object, a shape, a function: not a batch of tensors


def _mixes_samples(call) -> bool:
    """Whether a call reads across axis 0 (concat / split / reduce / softmax / take on axis 0, a
    permute_dims moving it, a strided_slice of it)."""
    attrs = call.attrs
    name = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
    if attrs is not None:
        for key in _AXIS_ATTRS:
            if not hasattr(attrs, key):
                continue
            v = getattr(attrs, key)
            if v is None:
                return name not in ("relax.squeeze",)      # None: every axis (squeeze of batch 1 is caught by shapes)
            vals = [int(a) for a in v] if hasattr(v, "__len__") else [int(v)]
            if name == "relax.permute_dims":
                return bool(vals) and vals[0] != 0
            ndim = _ndim(call.args[0].ty) if call.args else None
            if ndim is None:                                     # a tuple (concat): its fields' rank
                fields = _tensor_types(getattr(call.args[0], "ty", None)) if call.args else None
                ndim = _ndim(fields[0]) if fields else None
            if ndim is None or any(a % ndim == 0 for a in vals):
                return True
    if name == "relax.strided_slice" and len(call.args) > 1:
        axes = call.args[1]
        vals = [int(getattr(a, "value", a)) for a in getattr(axes, "fields", getattr(axes, "values", []))]
        return 0 in vals
    return False


def splittable_batch(mod: tvm.IRModule) -> int | None:
    """The batch size of ``mod``'s ``main`` when its samples are computed independently, else None.

    Independent means: every input and output, and every tensor computed from an input, has the same
    leading dimension ``b``, and no op reads across it (concat / reduce / softmax / split / take on axis
    0, a transpose that moves it). Then a batch of any size can be cut into batches of ``b`` (the last
    padded) and the results joined, which :class:`CompiledModel` does. Anything it cannot prove
    independent returns None and the model takes exactly its compiled shapes.

    >>> # splittable_batch(qmodel.realized) -> 8 for a CNN calibrated on batches of 8
    """
    try:
        func = mod["main"]
    except Exception:  # noqa: BLE001 - no main: nothing to run
        return None
    sizes = set()
    for p in func.params:
        types = _tensor_types(p.ty)
        if not types:
            return None
        sizes |= {_leading_dim(t) for t in types}
    if len(sizes) != 1 or None in sizes:
        return None
    b = sizes.pop()
    tainted = {p for p in func.params}

    def reads_input(e) -> bool:
        found = False

        def visit(x):
            nonlocal found
            if isinstance(x, relax.Var) and x in tainted:
                found = True

        relax.analysis.post_order_visit(e, visit)
        return found

    body = func.body
    for block in getattr(body, "blocks", []):
        for bind in block.bindings:
            if not isinstance(bind, relax.VarBinding) or not reads_input(bind.value):
                continue
            tainted.add(bind.var)
            types = _tensor_types(bind.var.ty)
            if types is None or any(_leading_dim(t) != b for t in types):
                return None
            if isinstance(bind.value, relax.Call) and _mixes_samples(bind.value):
                return None
    out_types = _tensor_types(body.body.ty if hasattr(body, "body") else func.ret_ty)
    if not out_types or any(_leading_dim(t) != b for t in out_types):
        return None
    return b


# ------------------------------------------------------------------------------------------------------


class CompiledModel:
    """A compiled model: call it with numpy arrays (or a dict name -> array), get numpy back.

    Thread-safe: every calling thread runs its own VM over the shared code and weights (see
    :class:`_ThreadVMs`), so N threads serving one model run in parallel.

    Batch size: a model built by :func:`relayq.build` whose samples are independent (see
    :func:`splittable_batch`; true of CNNs and MLPs) accepts any batch size ``n``. The compiled kernels
    have a static batch ``b`` (:attr:`batch`, the calibration batch), so a call with ``n != b`` runs
    ``ceil(n / b)`` calls of ``b`` samples, the last one padded by repeating its last sample, and returns
    the first ``n`` rows of the joined outputs: per sample, the same numbers as a call of ``b``. A model
    whose samples are not provably independent (``batch is None``) takes exactly its compiled shapes.

    Example::

        lib = relayq.build(qmodel)             # calibrated on batches of 8
        y = lib(x)                             # x of 8 samples; 1 or 20 samples work too
        lib.export("model.so"); lib2 = relayq.load("model.so")
    """

    def __init__(self, executable, specs: list, target, device=None, *, isa: dict | None = None,
                 batch: int | None = None):
        self.executable = executable
        self.specs = specs
        self.target = target
        self.device = device or tvm.cpu()
        #: The instruction set the code needs ({"arch", "features"}), checked before the first call.
        self.isa = isa if isa is not None else required_isa(target)
        #: The compiled batch size when other batch sizes are accepted (see the class docstring), else None.
        self.batch = batch
        self._vms = _ThreadVMs(executable, self.device)
        self._isa_checked = False

    @property
    def input_names(self) -> list:
        return [s[0] for s in self.specs]

    def __repr__(self):
        inputs = ", ".join(f"{n} {tuple(s)} {d}" for n, s, d in self.specs)
        batch = f"any batch (compiled {self.batch})" if self.batch is not None else "fixed shapes"
        isa = describe_isa(self.isa) if self.isa else "unknown CPU"
        return f"CompiledModel(inputs: {inputs}; {batch}; needs {isa})"

    @property
    def vm(self):
        """This thread's ``relax.VirtualMachine`` (each thread has its own)."""
        if not self._isa_checked:
            # Before any of the model's code runs in this process: a missing instruction is a SIGILL.
            check_host_isa(self.isa, f"the model built for {_target_text(self.target)}")
            self._isa_checked = True
        return self._vms.get()

    def _arrays(self, inputs, kw, free_batch: bool) -> list:
        if kw:
            if inputs:
                raise DatasetError("pass inputs either positionally or by name, not both")
            batch = kw
        elif len(inputs) == 1:
            batch = inputs[0]
        else:
            batch = tuple(inputs)
        return batch_to_arrays(batch, self.specs, where="model input", free_batch=free_batch)

    def _run(self, arrays) -> list:
        vm = self.vm
        return flatten_outputs(vm["main"](*[tvm.runtime.tensor(a, self.device) for a in arrays]))

    def __call__(self, *inputs, **named):
        arrays = self._arrays(inputs, named, free_batch=self.batch is not None)
        n = arrays[0].shape[0] if arrays and arrays[0].ndim else None
        if self.batch is None or n == self.batch:
            outs = self._run(arrays)
        else:
            outs = self._run_split(arrays, n)
        return outs[0] if len(outs) == 1 else outs

    def _run_split(self, arrays, n: int) -> list:
        b = self.batch
        parts = []
        for start in range(0, n, b):
            chunk = [a[start:start + b] for a in arrays]
            short = b - chunk[0].shape[0]
            if short:
                chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
            parts.append(self._run(chunk))
        joined = []
        for k in range(len(parts[0])):
            if parts[0][k].ndim == 0 or parts[0][k].shape[0] != b:        # excluded by splittable_batch
                raise DatasetError(f"output {k} has shape {parts[0][k].shape}, without the batch dimension "
                                   f"{b}: call the model with batches of exactly {b}")
            joined.append(np.concatenate([p[k] for p in parts])[:n])
        return joined

    def benchmark(self, *inputs, number: int = 10, repeat: int = 5) -> dict:
        """Median / mean / min latency in milliseconds of one call on the compiled batch, measured by
        TVM's time evaluator in this thread's VM (threads may benchmark concurrently).

        Example::

            lib.benchmark(x)["median_ms"]
        """
        args = [tvm.runtime.tensor(a, self.device) for a in self._arrays(inputs, {}, free_batch=False)]
        vm = self.vm
        vm.set_input("main", *args)
        timer = vm.time_evaluator("invoke_stateful", self.device, number=number, repeat=repeat)
        res = timer("main")
        results = np.array(res.results) * 1e3
        return {"median_ms": float(np.median(results)), "mean_ms": float(results.mean()),
                "min_ms": float(results.min())}

    def export(self, path: str, cross_compile=None) -> str:
        """Write a shared library and ``path + '.json'`` describing it; returns ``path``.

        The JSON holds the format version (:data:`EXPORT_FORMAT`), the input specs, the target, the
        instruction set the code needs, the batch size and the library's sha256, all checked by
        :func:`load`. Both files are written to temporary files and renamed into place, so an
        interrupted export never leaves a half-written library.

        ``cross_compile``: the compiler (a name such as ``"aarch64-linux-gnu-g++"``, or a TVM
        ``fcompile`` function) that links the library; by default the host's (a model built for
        another architecture is a :class:`relayq.backend.presets.CrossCompiledModel`, whose export
        defaults to that architecture's cross compiler).

        Example::

            lib.export("model.so")          # model.so, model.so.json
        """
        return export_library(self, path, cross_compile)


def _target_text(target) -> str:
    return str(target) if target is not None else "an unknown target"


def export_library(model, path: str, cross_compile=None) -> str:
    """:meth:`CompiledModel.export` for any model with ``executable``, ``specs`` and ``target`` (also the
    backend's cross-compiled models, which cannot run here). ``cross_compile`` None links with the
    host's compiler (the backend passes the cross compiler of a model built for another CPU).

    Example::

        export_library(lib, "model.so")
    """
    path = os.fspath(path)
    if isinstance(cross_compile, str):
        from tvm.support import cc

        cross_compile = cc.cross_compiler(cross_compile)
    isa = getattr(model, "isa", None) or required_isa(model.target)
    with atomic_output(path, "compiled model") as tmp_lib:
        try:
            # TVM logs one "Scope Saving" warning per constant while it saves: filtered, other lines kept.
            with stage(f"exporting {path}"), tvm_chatter_filtered():
                model.executable.export_library(tmp_lib, fcompile=cross_compile)
        except Exception as e:
            raise BuildError(f"export to {path} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        meta = {
            "format": EXPORT_FORMAT,
            "inputs": [[n, list(s), d] for n, s, d in model.specs],
            "target": _target_text(model.target),
            "isa": isa,
            "batch": getattr(model, "batch", None),
            "library": {"file": os.path.basename(path), "bytes": os.path.getsize(tmp_lib),
                        "sha256": sha256_file(tmp_lib)},
        }
        with atomic_output(path + ".json", "model description") as tmp_json:
            with open(tmp_json, "w") as f:
                json.dump(meta, f, indent=1)
    return path


def _read_export_meta(path: str, meta_path: str) -> dict:
    """The checked ``.json`` of an exported library (ArtefactError naming the file and what is wrong)."""
    try:
        with open(meta_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ArtefactError(f"cannot read {meta_path} (the description export writes beside {path}): "
                            f"{e.strerror or e}") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        what = "empty" if not raw.strip() else f"not valid JSON ({e})"
        raise ArtefactError(f"{meta_path} is {what}: it is corrupt or truncated; export the model again "
                            "(CompiledModel.export writes it)") from None
    if not isinstance(meta, dict):
        raise ArtefactError(f"{meta_path} holds a JSON {type(meta).__name__}, not relayq's model description")
    version = meta.get("format")
    if version is None:
        raise ArtefactError(f"{meta_path} has no format version: it was written by an older relayq (or is not "
                            f"relayq's); export the model again with this version (format {EXPORT_FORMAT})")
    if version != EXPORT_FORMAT:
        raise ArtefactError(f"{meta_path} has format version {version!r}; this relayq reads version "
                            f"{EXPORT_FORMAT}: export the model again with this version")
    try:
        specs = [(str(n), tuple(int(d) for d in s), str(dt)) for n, s, dt in meta["inputs"]]
        lib = meta["library"]
        digest, size = str(lib["sha256"]), int(lib["bytes"])
        isa = meta.get("isa")
        if isa is not None and not (isinstance(isa, dict) and isinstance(isa.get("arch"), str)
                                    and isinstance(isa.get("features", []), list)):
            raise ValueError(f"bad isa {isa!r}")
        batch = meta.get("batch")
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0):
            raise ValueError(f"bad batch {batch!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise ArtefactError(f"{meta_path} is not a valid relayq model description (format {EXPORT_FORMAT}): "
                            f"{type(e).__name__}: {e}") from None
    return {"specs": specs, "sha256": digest, "bytes": size, "isa": isa, "batch": batch,
            "target": meta.get("target")}


def load(path: str) -> CompiledModel:
    """Load a model written by :meth:`CompiledModel.export`, checking it before any of its code runs.

    Raises :class:`~relayq.errors.ArtefactError` naming the file for a missing library or ``.json``, a
    garbage, truncated or unknown-version ``.json``, or a library whose size or sha256 differs from its
    ``.json`` (a corrupt or truncated library, or another model's ``.json``); and
    :class:`~relayq.errors.UnsupportedCPUError` when this host lacks the instruction set the library
    was built for (an ``x86-vnni`` library on an AVX2 machine, an ARM library on x86).

    Example::

        lib = relayq.load("model.so"); y = lib(x)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ArtefactError(f"{path} is a directory, not a compiled model (give the .so written by export)")
    if not os.path.exists(path):
        raise ArtefactError(f"no compiled model at {path}")
    meta_path = path + ".json"
    if not os.path.exists(meta_path):
        raise ArtefactError(f"{meta_path} (the description written by export beside {path}) is missing: "
                            "copy it with the library, or export the model again")
    meta = _read_export_meta(path, meta_path)
    size = os.path.getsize(path)
    if size != meta["bytes"]:
        raise ArtefactError(f"{path} has {size} bytes but {meta_path} describes a library of {meta['bytes']} "
                            "bytes: the library is truncated or corrupt, or the .json belongs to another model")
    digest = sha256_file(path)
    if digest != meta["sha256"]:
        raise ArtefactError(f"{path} does not match {meta_path}: its sha256 is {digest[:16]}..., the .json "
                            f"records {meta['sha256'][:16]}...: the library is corrupt, or the .json belongs "
                            "to another model")
    check_host_isa(meta["isa"], path)
    try:
        with tvm_chatter_filtered():
            module = tvm.runtime.load_module(path)
    except Exception as e:  # noqa: BLE001 - TVM raises InternalError/RuntimeError for unloadable files
        first = str(e).strip().splitlines()
        raise ArtefactError(f"{path} cannot be loaded as a library: {first[-1] if first else type(e).__name__}") from None
    return CompiledModel(module, meta["specs"], meta["target"], isa=meta["isa"], batch=meta["batch"])
