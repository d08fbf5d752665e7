"""Target presets of :func:`relayq.build` and the lowering of realized graphs onto relayq's kernels.

Presets: ``"x86-avx2"`` (Haswell/Zen class), ``"x86-vnni"`` (avx512 vpdpbusd: Cascade Lake and newer),
``"cuda-dp4a"`` (sm_61 and newer), ``"generic"`` (any LLVM CPU, no intrinsics).

Example::

    >>> str(target_from_preset("x86-avx2").mcpu)
    'core-avx2'
"""
from __future__ import annotations

import os

import tvm

from ..errors import ConfigError
from ..runtime import host_cpu_flags

PRESETS = ("x86-avx2", "x86-vnni", "cuda-dp4a", "generic")


def best_host_preset() -> str:
    """The best preset this CPU runs: x86-vnni, x86-avx2 or generic."""
    flags = host_cpu_flags()
    if "avx512_vnni" in flags:
        return "x86-vnni"
    if "avx2" in flags:
        return "x86-avx2"
    return "generic"


def target_from_preset(name: str) -> tvm.target.Target:
    """The TVM target of a preset name (raises ConfigError naming the known presets)."""
    cores = os.cpu_count() or 1
    if name == "x86-avx2":
        return tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2", "num-cores": cores})
    if name == "x86-vnni":
        return tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": cores})
    if name == "cuda-dp4a":
        return tvm.target.Target({"kind": "cuda", "arch": "sm_61"}, host={"kind": "llvm"})
    if name == "generic":
        return tvm.target.Target({"kind": "llvm", "num-cores": cores})
    raise ConfigError(f"unknown target preset {name!r}; known: {list(PRESETS)} (or pass a tvm.target.Target)")


def preset_of(target: tvm.target.Target) -> str:
    """Which kernel family serves ``target``."""
    if target.kind.name == "cuda":
        return "cuda-dp4a"
    mcpu = str(target.attrs.get("mcpu", "")) if hasattr(target, "attrs") else ""
    if mcpu in ("cascadelake", "icelake-server", "sapphirerapids", "cooperlake", "tigerlake", "icelake-client"):
        return "x86-vnni"
    if mcpu in ("core-avx2", "haswell", "skylake", "znver1", "znver2", "znver3", "znver4", "broadwell"):
        return "x86-avx2"
    return "generic"


def lower_for(mod: tvm.IRModule, target: tvm.target.Target, preset: str | None = None) -> tvm.IRModule:
    """Replace realized integer (and float conv/dense) chains with relayq's scheduled kernels.

    Falls back to TVM's own lowering for anything relayq has no kernel for.
    """
    try:
        from . import lower as _lower
    except ImportError:
        return mod
    kind = preset if preset in PRESETS else preset_of(target)
    return _lower.lower_quantized(mod, kind)


def _device_of(target: tvm.target.Target):
    """The runtime device of a non-CPU target, or None where this machine has none."""
    try:
        dev = tvm.device(target.kind.name, 0)
        return dev if dev.exist else None
    except Exception:  # noqa: BLE001 - no runtime for that device kind at all
        return None


def compiled_model(executable, specs, target: tvm.target.Target):
    """The :class:`relayq.api.CompiledModel` of a build; for a GPU target without a GPU here, a
    :class:`CrossCompiledModel` (inspectable and exportable, not callable)."""
    from ..api import CompiledModel

    if target.kind.name == "llvm":
        return CompiledModel(executable, specs, target)
    dev = _device_of(target)
    if dev is not None:
        return CompiledModel(executable, specs, target, dev)
    return CrossCompiledModel(executable, specs, target)


class CrossCompiledModel:
    """A model compiled for a device this machine lacks (e.g. ``cuda-dp4a`` without a GPU).

    It carries the executable and the device source (:meth:`device_source`, :meth:`ptx`); calling it
    raises :class:`relayq.errors.BuildError`.

    >>> # m = relayq.build(qmodel, target="cuda-dp4a"); "dp4a" in m.ptx()
    """

    def __init__(self, executable, specs, target):
        self.executable, self.specs, self.target = executable, specs, target

    @property
    def input_names(self) -> list:
        return [s[0] for s in self.specs]

    def _no_device(self, *args, **kw):
        from ..errors import BuildError

        raise BuildError(f"this machine has no {self.target.kind.name} device: the model was compiled "
                         "only (inspect it with device_source()/ptx(), or build it where the device exists)")

    __call__ = benchmark = _no_device

    def device_source(self) -> str:
        """The generated device code (CUDA C for cuda targets)."""
        srcs = []

        def walk(m):
            for imp in m.imports:
                if imp.kind in ("cuda", "rocm", "opencl", "vulkan", "metal"):
                    srcs.append(imp.inspect_source())
                walk(imp)

        walk(self.executable.mod)
        return "\n".join(srcs)

    def ptx(self, arch: str = "sm_80") -> str:
        """PTX of :meth:`device_source` compiled offline with nvcc (CUDA 13's nvcc needs sm_75+)."""
        from tvm.support import nvcc

        with self.target:
            return nvcc.compile_cuda(self.device_source(), target_format="ptx", arch=arch,
                                     compiler="nvcc").decode()
