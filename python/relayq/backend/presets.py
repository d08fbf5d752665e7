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
