"""Compiling and running Relax modules on the host: shared by calibration, tests and ``build``.

Example::

    fn = compile_host(mod)              # a VM function of main
    outputs = fn(x)                      # numpy in, list of numpy out
"""
from __future__ import annotations

import functools
import os

import numpy as np
import tvm
from tvm import relax


@functools.lru_cache(maxsize=None)
def host_cpu_flags() -> frozenset:
    """The CPU flags of this machine from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


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


class HostFunction:
    """A compiled Relax ``main`` on the CPU: numpy arrays in, a list of numpy arrays out."""

    def __init__(self, executable, device=None):
        self.executable = executable
        self.device = device or tvm.cpu()
        self.vm = relax.VirtualMachine(executable, self.device)

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


def compile_host(mod: tvm.IRModule, target=None) -> HostFunction:
    """Compile ``mod`` for the host CPU with TVM's fusing default pipeline."""
    target = target or host_target()
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    return HostFunction(ex)
