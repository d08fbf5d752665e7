"""CUDA DP4A kernels: compile, check dp4a in the PTX (nvcc), run and compare where a GPU exists."""
import os
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

from relayq import qmath
from relayq.backend import cuda
from relayq.backend import lower as L

from .kutil import build_chain, conv_layer, dense_layer, rand_requant

HAS_NVCC = shutil.which("nvcc") is not None
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not on PATH (PTX cannot be produced)")
# Offline PTX arch: CUDA 13's nvcc no longer accepts sm_61 itself; dp4a exists from sm_61 on.
PTX_ARCH = "sm_80"
TARGET = tvm.target.Target({"kind": "cuda", "arch": PTX_ARCH}, host={"kind": "llvm"})


def _has_gpu():
    try:
        return tvm.cuda(0).exist
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        return False


def _ptx(src):
    from tvm.support import nvcc
    with TARGET:
        return nvcc.compile_cuda(src, target_format="ptx", arch=PTX_ARCH, compiler="nvcc").decode()


def _kernels(rng):
    rq = rand_requant(rng, 40, True)
    xd = rng.integers(-127, 128, (3, 70)).astype(np.int8)
    wd = rng.integers(-127, 128, (70, 40)).astype(np.int8)
    bd = rng.integers(-3000, 3000, 40).astype(np.int32)
    ref_d = qmath.requantize(xd.astype(np.int64) @ wd + bd, rq.multiplier, rq.shift, rq.lo, rq.hi, axis=1)
    xc = rng.integers(-127, 128, (1, 6, 9, 9)).astype(np.int8)
    wc = rng.integers(-127, 128, (40, 6, 3, 3)).astype(np.int8)
    acc = qmath.conv2d_int(xc, wc, (2, 2), (1, 1, 1, 1)) + bd.reshape(1, -1, 1, 1)
    ref_c = qmath.requantize(acc, rq.multiplier, rq.shift, rq.lo, rq.hi, axis=1)
    return [(cuda.dense_int8(xd.shape, wd, bd, rq), xd, ref_d.astype(np.int8)),
            (cuda.conv2d_int8(xc.shape, wc, bd, rq, (2, 2), (1, 1, 1, 1), (1, 1)), xc, ref_c.astype(np.int8))]


@needs_nvcc
def test_dp4a_in_ptx():
    for kernel, _, _ in _kernels(np.random.default_rng(0)):
        lib = tvm.compile(tvm.IRModule({"main": kernel.finalize("kmain")}), target=TARGET)
        src = lib.mod.imports[0].inspect_source()
        assert "__dp4a" in src
        assert "dp4a.s32.s32" in _ptx(src)


def test_lower_for_cuda_structure():
    rng = np.random.default_rng(1)
    mod = build_chain((1, 4, 8, 8), [conv_layer(rng, 4, 8, 3, 1, 1, relu=True), conv_layer(rng, 8, 8, 3, 1, 1, groups=8)])
    lowered = L.lower_quantized(mod, "cuda-dp4a")
    names = L.lowered_kernels(lowered)
    assert len(names) == 1 and "dp4a" in names[0]           # depthwise is left to TVM on CUDA
    tvm.compile(lowered, target=TARGET)                      # the whole module builds (no GPU needed)


@pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU on this machine (kernels only compiled)")
def test_dp4a_kernels_run_exact():
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    dev = tvm.cuda(0)
    for kernel, x, ref in _kernels(np.random.default_rng(0)):
        lib = tvm.compile(tvm.IRModule({"main": kernel.finalize("kmain")}), target=TARGET)
        args = [tvm.runtime.tensor(x, dev)] + [tvm.runtime.tensor(c, dev) for c in kernel.consts]
        out = tvm.runtime.tensor(np.zeros(kernel.out_shape, "int8"), dev)
        lib.mod["kmain"](*args, out)
        np.testing.assert_array_equal(out.numpy(), ref)
    rng = np.random.default_rng(2)
    layer = dense_layer(rng, 24, 16, per_channel=True, relu=True)
    ex = tvm.compile(L.lower_quantized(build_chain((2, 24), [layer]), "cuda-dp4a"), target=TARGET)
    vm = relax.VirtualMachine(ex, dev)
    x = rng.integers(-127, 128, (2, 24)).astype(np.int8)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x, dev)).numpy(), layer.reference(x))
