"""Target presets of :func:`relayq.build` and the lowering of realized graphs onto relayq's kernels.

Presets: ``"x86-avx2"`` (Haswell/Zen class), ``"x86-vnni"`` (avx512 vpdpbusd: Cascade Lake and newer),
``"cuda-dp4a"`` (sm_61 and newer), ``"arm-dotprod"`` (AArch64 with sdot/udot: Cortex-A55/A76 and newer),
``"arm-neon"`` (any AArch64), ``"generic"`` (any LLVM CPU, no intrinsics).

The ARM presets cross-compile from an x86 host: the build is exportable (``lib.export(path)`` links
it with ``aarch64-linux-gnu-g++``) and runs on the device with ``relayq_run`` (see README).

Example::

    >>> str(target_from_preset("x86-avx2").mcpu)
    'core-avx2'
"""
from __future__ import annotations

import os
import platform
import shutil

import tvm

from ..errors import ConfigError
from ..runtime import CompiledModel, export_library, host_cpu_flags, required_isa

PRESETS = ("x86-avx2", "x86-vnni", "cuda-dp4a", "arm-dotprod", "arm-neon", "generic")
#: The kernel family (``relayq.backend.lower`` target kind) of presets that have none of their own:
#: arm-neon uses the portable kernels (arm-dotprod has relayq's sdot-tensorized ones).
KERNEL_FAMILY = {"arm-neon": "generic"}
#: The target triple of the ARM presets, and the cross compiler that links their libraries.
AARCH64_TRIPLE = "aarch64-linux-gnu"
AARCH64_CXX = "aarch64-linux-gnu-g++"


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
    if name in ("arm-dotprod", "arm-neon"):
        mattr = ["+neon", "+dotprod"] if name == "arm-dotprod" else ["+neon"]
        return tvm.target.Target({"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mattr": mattr})
    if name == "generic":
        return tvm.target.Target({"kind": "llvm", "num-cores": cores})
    raise ConfigError(f"unknown target preset {name!r}; known: {list(PRESETS)} (or pass a tvm.target.Target)")


#: x86 ``-mcpu`` names relayq knows: the kernel family that serves each and its vector register width.
#: One table for the kernels (:func:`preset_of`) and the schedules of everything else
#: (:func:`relayq.backend.schedule_rest.vector_bits`). AVX-512 without VNNI (skylake-avx512) runs the
#: AVX2 kernels; its other loops still get 512-bit vectors.
X86_MCPUS = {
    "core-avx2": ("x86-avx2", 256), "haswell": ("x86-avx2", 256), "broadwell": ("x86-avx2", 256),
    "skylake": ("x86-avx2", 256), "znver1": ("x86-avx2", 256), "znver2": ("x86-avx2", 256),
    "znver3": ("x86-avx2", 256), "znver4": ("x86-avx2", 256), "skylake-avx512": ("x86-avx2", 512),
    "cascadelake": ("x86-vnni", 512), "cooperlake": ("x86-vnni", 512), "icelake-server": ("x86-vnni", 512),
    "icelake-client": ("x86-vnni", 512), "tigerlake": ("x86-vnni", 512), "sapphirerapids": ("x86-vnni", 512),
}


def mcpu_of(target: tvm.target.Target) -> str:
    """The ``-mcpu`` of ``target`` ("" when it has none).

    >>> mcpu_of(target_from_preset("x86-avx2"))
    'core-avx2'
    """
    return str(target.attrs.get("mcpu", "")) if hasattr(target, "attrs") else ""


def preset_of(target: tvm.target.Target) -> str:
    """Which kernel family serves ``target``.

    >>> avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    >>> preset_of(target_from_preset("x86-vnni")), preset_of(avx512)
    ('x86-vnni', 'x86-avx2')
    """
    if target.kind.name == "cuda":
        return "cuda-dp4a"
    if _triple(target).startswith("aarch64"):
        return "arm-dotprod" if "+dotprod" in [str(a) for a in target.attrs.get("mattr", [])] else "arm-neon"
    known = X86_MCPUS.get(mcpu_of(target))
    return known[0] if known is not None else "generic"


def lower_for(mod: tvm.IRModule, target: tvm.target.Target, preset: str | None = None) -> tvm.IRModule:
    """Replace realized integer (and float conv/dense) chains with relayq's scheduled kernels.

    Falls back to TVM's own lowering for anything relayq has no kernel for.
    """
    try:
        from . import lower as _lower
    except ImportError:
        return mod
    kind = preset if preset in PRESETS else preset_of(target)
    return _lower.lower_quantized(mod, KERNEL_FAMILY.get(kind, kind))


def relax_pipeline(target: tvm.target.Target):
    """The Relax pipeline every relayq build compiles through: TVM's default for ``target`` plus, on CPU
    targets, a schedule for every function relayq's kernels leave (:mod:`relayq.backend.schedule_rest`).

    >>> # ex = tvm.compile(mod, target=t, relax_pipeline=relax_pipeline(t))
    """
    from .schedule_rest import relax_pipeline as _pipeline

    return _pipeline(target)


def _triple(target: tvm.target.Target) -> str:
    return str(target.attrs.get("mtriple", "")) if hasattr(target, "attrs") else ""


def is_cross(target: tvm.target.Target) -> bool:
    """Whether ``target`` is an LLVM CPU target of another architecture than this machine's
    (its code can be exported, not run here).

    >>> is_cross(target_from_preset("arm-dotprod")) == (platform.machine() not in ("aarch64", "arm64"))
    True
    """
    if target.kind.name != "llvm":
        return False
    arch = _triple(target).split("-")[0]
    if not arch:
        return False
    host = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    return arch != host


def default_cross_compile(target: tvm.target.Target):
    """The ``fcompile`` that links an exported library for ``target``: None for this machine's own
    code (TVM's default), the AArch64 cross compiler for an ARM target built elsewhere."""
    if not isinstance(target, tvm.target.Target) or not is_cross(target):
        return None
    from ..errors import BuildError

    if _triple(target).startswith("aarch64"):
        if shutil.which(AARCH64_CXX) is None:
            raise BuildError(f"exporting an aarch64 library needs {AARCH64_CXX} (apt-get install "
                             "g++-aarch64-linux-gnu), or pass cross_compile= to export")
        return AARCH64_CXX
    raise BuildError(f"no default cross compiler for {_triple(target)}: pass cross_compile= to export")


def _device_of(target: tvm.target.Target):
    """The runtime device of a non-CPU target, or None where this machine has none."""
    try:
        dev = tvm.device(target.kind.name, 0)
        return dev if dev.exist else None
    except Exception:  # noqa: BLE001 - no runtime for that device kind at all
        return None


def compiled_model(executable, specs, target: tvm.target.Target, batch: int | None = None):
    """The :class:`relayq.runtime.CompiledModel` of a build; for a GPU target without a GPU here, or
    another CPU architecture, a :class:`CrossCompiledModel` (inspectable and exportable, not callable).

    >>> # compiled_model(tvm.compile(mod, target=t), input_specs(mod), t)
    """
    if target.kind.name == "llvm" and not is_cross(target):
        return CompiledModel(executable, specs, target, batch=batch)
    dev = _device_of(target)
    if dev is not None:
        return CompiledModel(executable, specs, target, dev, batch=batch)
    return CrossCompiledModel(executable, specs, target, batch=batch)


class CrossCompiledModel:
    """A model compiled for a device this machine lacks (e.g. ``cuda-dp4a`` without a GPU, or an ARM
    preset on an x86 machine).

    It carries the executable and the device source (:meth:`device_source`, :meth:`ptx`, :meth:`asm`)
    and exports like a :class:`relayq.runtime.CompiledModel`; calling it raises
    :class:`relayq.errors.BuildError`.

    >>> # m = relayq.build(qmodel, target="cuda-dp4a"); "dp4a" in m.ptx()
    >>> # m = relayq.build(qmodel, target="arm-dotprod"); m.export("model_arm64.so")
    """

    def __init__(self, executable, specs, target, batch: int | None = None):
        self.executable, self.specs, self.target, self.batch = executable, specs, target, batch
        self.isa = required_isa(target)

    @property
    def input_names(self) -> list:
        return [s[0] for s in self.specs]

    def _no_device(self, *args, **kw):
        from ..errors import BuildError

        if is_cross(self.target):
            raise BuildError(f"this machine cannot run {_triple(self.target)} code: export the model "
                             "(lib.export(path)) and run it on the device with relayq_run")
        raise BuildError(f"this machine has no {self.target.kind.name} device: the model was compiled "
                         "only (inspect it with device_source()/ptx(), or build it where the device exists)")

    __call__ = benchmark = _no_device

    def export(self, path: str, cross_compile=None) -> str:
        """Write a shared library for the target (and ``path + '.json'``), as CompiledModel.export; by
        default linked with the target's cross compiler (:func:`default_cross_compile`)."""
        if cross_compile is None:
            cross_compile = default_cross_compile(self.target)
        return export_library(self, path, cross_compile)

    def asm(self) -> str:
        """The assembly of the CPU kernels (for an LLVM target: e.g. look for ``sdot``)."""
        mod = self.executable.mod
        return "\n".join(m.inspect_source("asm") for m in [mod, *mod.imports] if m.kind == "llvm")

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
