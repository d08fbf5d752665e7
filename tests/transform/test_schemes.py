"""Quantization schemes: asymmetric activations, power-of-two scales, 2..16 bits, mixed precision.

Every scheme must realize to an integer graph that equals the qmath reference executor bit for bit.
"""
import warnings

import numpy as np
import pytest

import relayq
from relayq.analysis.reference import reference_run
from relayq.runtime import compile_host
from relayq.transform.common import bindings, dtype_of, op_name

from helpers import assert_three_ways, conv2d_nchw, tiny_cnn

CFG = relayq.QConfig(show_progress=False)


def _quantize(config, seed=0, calibration="naive"):
    mod, params = tiny_cnn(seed)
    rng = np.random.RandomState(seed + 1)
    data = [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return relayq.quantize_model(mod, params, data, calibration, config), rng


def _assert_exact(q, rng, n=2):
    """realized == qmath reference == simulated (the float fake-quant module), bit for bit."""
    lib = relayq.build(q)
    sim = compile_host(q.simulated)
    for _ in range(n):
        x = (rng.randn(2, 3, 8, 8) * 1.5).astype("float32")
        assert_three_ways(q, lib, sim, x)
    return lib


@pytest.mark.parametrize("calibration", ["naive", "mse", "percentile"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_asymmetric_activations_are_exact(calibration, per_channel):
    q, rng = _quantize(CFG.replace(act_symmetric=False, per_channel=per_channel), calibration=calibration)
    acts = [p for p in q.qpoints.values() if p.role == "act"]
    assert all(not p.signed and 0 <= p.zero_point <= 255 for p in acts)
    assert any(p.zero_point > 0 for p in acts)            # the float input is signed: it needs a zero point
    binds = bindings(q.realized["main"])
    assert any(dtype_of(b.var) == "uint8" for b in binds)
    # Zero points are folded into the int32 biases: no subtraction in front of any conv / dense.
    producer = {b.var: b.value for b in binds}
    for b in binds:
        if op_name(b.value) in ("relax.nn.conv2d", "relax.matmul") and dtype_of(b.var) == "int32":
            src = producer.get(b.value.args[0])
            assert op_name(src) != "relax.subtract"
    _assert_exact(q, rng)


@pytest.mark.parametrize("calibration", ["naive", "kl"])
def test_unsigned_activations_take_the_full_unsigned_range_and_stay_exact(calibration):
    """unsigned_activations: the points calibration never saw negative (after the ReLUs) take uint8 codes
    with zero point 0 and twice the resolution; signed points (the input) stay signed; still bit-exact."""
    q0, _ = _quantize(CFG, calibration=calibration)
    q, rng = _quantize(CFG.replace(unsigned_activations=True), calibration=calibration)
    acts = {n: p for n, p in q.qpoints.items() if p.role == "act"}
    unsigned = {n for n, p in acts.items() if not p.signed}
    assert unsigned and unsigned != set(acts)
    assert q.qpoints["conv2d_0:in0"].signed                 # the float input has negative values
    for n in unsigned:
        p, p0 = acts[n], q0.qpoints[n]
        assert p.zero_point == 0 and p.qmax == 255 and p0.signed
        assert p.scale < 0.75 * p0.scale, (n, p.scale, p0.scale)   # about half the step
    assert any(dtype_of(b.var) == "uint8" for b in bindings(q.realized["main"]))
    _assert_exact(q, rng)


def test_asymmetric_padding_holds_the_zero_point():
    """A padded conv on asymmetric codes pads with the zero point (real zero), not with code 0."""
    q, rng = _quantize(CFG.replace(act_symmetric=False))
    pads = [b for b in bindings(q.realized["main"]) if op_name(b.value) == "relax.nn.pad"]
    assert pads, "the first (padded) conv reads a signed input with a zero point"
    zp = q.qpoints["conv2d_0:in0"].zero_point
    assert float(pads[0].value.attrs.pad_value) == zp


def test_power_of_two_scales_requantize_by_shifts_only():
    q, rng = _quantize(CFG.replace(power_of_two_scale=True, per_channel=True))
    for p in q.qpoints.values():
        s = np.atleast_1d(np.asarray(p.scale, np.float64))
        assert np.all(np.log2(s) == np.round(np.log2(s))), p.name
    binds = bindings(q.realized["main"])
    int_mults = [b for b in binds if op_name(b.value) == "relax.multiply" and dtype_of(b.var) == "int64"]
    # Only the adds rescale their operands by a multiplier; conv / dense requantization is shift-only.
    n_add_operands = 2 * sum(1 for b in binds if op_name(b.value) == "relax.add" and dtype_of(b.var) == "int64"
                             and all(op_name({x.var: x.value for x in binds}.get(a)) == "relax.right_shift"
                                     for a in b.value.args))
    assert len(int_mults) <= n_add_operands
    _assert_exact(q, rng)


@pytest.mark.parametrize("wbits,abits", [(2, 2), (3, 8), (4, 4), (4, 8), (5, 7), (8, 4), (8, 8), (6, 12),
                                         (12, 6), (10, 10), (16, 8), (8, 16)])
def test_every_bit_width_is_exact(wbits, abits):
    """Property over widths: simulated == realized == reference, and codes stay in range."""
    q, rng = _quantize(CFG.replace(weight_bits=wbits, act_bits=abits, per_channel=True))
    for name, codes in q.params.items():
        if name.endswith(":w"):
            lim = (1 << (wbits - 1)) - 1
            assert np.abs(codes).max() <= lim
            assert codes.dtype == (np.int8 if wbits <= 8 else np.int16)
    x = (rng.randn(2, 3, 8, 8) * 1.5).astype("float32")
    _, codes = reference_run(q.annotated, q.qpoints, x, return_codes=True)
    for name, c in codes.items():
        assert np.abs(c).max() <= (1 << (abits - 1)) - 1, name
    _assert_exact(q, rng, n=1)


def test_asymmetric_low_bits_exact():
    q, rng = _quantize(CFG.replace(act_symmetric=False, weight_bits=4, act_bits=5, per_channel=True))
    assert all(p.qmax == 31 for p in q.qpoints.values() if p.role == "act")
    _assert_exact(q, rng, n=1)


def test_overflow_guard_refuses_before_int32_overflows():
    # 27 x 32767 x 32767 > 2^31: refused with the layer named, before anything is built.
    with pytest.raises(relayq.OverflowRiskError, match="conv2d_0.*overflows int32"):
        _quantize(CFG.replace(weight_bits=16, act_bits=16))
    # 16-bit weights with 8-bit activations fit (K x 127 x 32767 < 2^31 for every layer here).
    q, rng = _quantize(CFG.replace(weight_bits=16, act_bits=8))
    assert q.qpoints["dense_0:w"].bits == 16


def test_mixed_precision_overrides_and_precedence():
    cfg = CFG.replace(weight_bits=6, act_bits=8,
                      op_overrides={"conv2d": relayq.LayerConfig(weight_bits=5)},
                      layer_overrides={"conv2d_1": relayq.LayerConfig(weight_bits=3, act_bits=7),
                                       "dense_.*": relayq.LayerConfig(weight_bits=4)})
    q, rng = _quantize(cfg)
    assert q.qpoints["conv2d_0:w"].bits == 5          # op type over global
    assert q.qpoints["conv2d_1:w"].bits == 3          # name over op type
    assert q.qpoints["conv2d_1:out"].bits == 7
    assert q.qpoints["dense_0:w"].bits == 4           # regex
    _assert_exact(q, rng, n=1)


def test_keep_first_last_layers_at_higher_precision():
    q, rng = _quantize(CFG.replace(weight_bits=4, act_bits=4, keep_first_last_bits=8))
    assert q.qpoints["conv2d_0:w"].bits == 8 and q.qpoints["dense_0:w"].bits == 8
    assert q.qpoints["conv2d_1:w"].bits == 4
    _assert_exact(q, rng, n=1)


def test_float_island_in_the_middle_still_runs():
    """A skipped layer in the middle stays float; the graph dequantizes into it and requantizes after."""
    q, rng = _quantize(CFG.replace(skip_layers=("conv2d_1",)))
    assert "conv2d_1" not in q.layers
    binds = bindings(q.realized["main"])
    float_convs = [b for b in binds if op_name(b.value) == "relax.nn.conv2d" and dtype_of(b.var) == "float32"]
    assert len(float_convs) == 1
    lib = _assert_exact_or_close(q, rng)
    assert lib is not None


def _assert_exact_or_close(q, rng):
    mod, params = tiny_cnn(0)
    fp = relayq.build(mod, params=params)
    lib = relayq.build(q)
    x = rng.randn(2, 3, 8, 8).astype("float32")
    a, b = lib(x), fp(x)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    return lib


def test_bias_correction_removes_the_mean_shift_and_stays_exact():
    mod, params = tiny_cnn(0)
    rng = np.random.RandomState(1)
    data = [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(6)]
    fp = relayq.build(mod, params=params)
    shift = {}
    for bc in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = relayq.quantize_model(mod, params, data, "naive", CFG.replace(weight_bits=3, bias_correction=bc))
        if bc:
            corr = [p.bias_corr for p in q.qpoints.values() if p.role == "weight"]
            assert all(c is not None and np.any(c != 0) for c in corr)
            _assert_exact(q, np.random.RandomState(2), n=1)
        lib = relayq.build(q)
        err = np.stack([lib(x) - fp(x) for x in data])
        shift[bc] = np.abs(err.mean(axis=(0, 1))).mean()
    # 3-bit weights shift every logit's mean; the correction must remove a good part of it.
    assert shift[True] < 0.7 * shift[False]



def _conv_model(w, b, strides, padding, groups, shape):
    """x -> conv2d(+bias): one layer whose input is the model input, so its bias correction can be
    recomputed from the data itself."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("data", relax.TensorType(shape, "float32"))
    wv, bv = relax.Var("w", relax.TensorType(w.shape, "float32")), relax.Var("b", relax.TensorType(b.shape, "float32"))
    with bb.function("main", [x, wv, bv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, wv, strides=strides, padding=padding, groups=groups))
            y = bb.emit_output(bb.emit(relax.op.add(y, relax.op.reshape(bv, (1, -1, 1, 1)))))
        bb.emit_func_output(y)
    return bb.get(), {"w": w, "b": b}


@pytest.mark.parametrize("kernel,strides,padding,groups,side", [
    (3, (1, 1), (1, 1, 1, 1), 1, 2),       # a 3x3 kernel on a 2x2 map: 5 of its 9 taps read padding
    (3, (2, 2), (1, 1, 1, 1), 1, 5),       # stride 2: the taps read different rows
    (3, (1, 1), (1, 1, 1, 1), 4, 3),       # depthwise
    (1, (2, 2), (0, 0, 0, 0), 1, 4),       # a strided 1x1 conv reads every other row only
])
def test_bias_correction_is_the_exact_mean_shift_at_padded_borders(kernel, strides, padding, groups, side):
    """The analytic correction equals E[conv(x, W_q - W)] over every sample and output position: the
    mean each kernel tap reads includes the zero padding and the stride (small feature maps, where the
    channel mean alone was off by more than the shift itself)."""
    rng = np.random.RandomState(0)
    shape = (2, 4, side, side)
    w = (rng.randn(6 if groups == 1 else 4, 4 // groups, kernel, kernel) * 0.5).astype("float32")
    mod, params = _conv_model(w, rng.randn(w.shape[0]).astype("float32"), strides, padding, groups, shape)
    # a spatial pattern (brighter on one side) and a positive mean: the borders matter
    ramp = np.linspace(0.5, 3.0, side, dtype="float32")[None, None, :, None]
    data = [(rng.rand(*shape) + ramp).astype("float32") for _ in range(3)]
    cfg = CFG.replace(weight_bits=3, per_channel=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, data, "naive", cfg)
    (p,) = [p for p in q.qpoints.values() if p.role == "weight"]
    w_err = p.weight_codes(w) * np.asarray(p.scale).reshape(-1, 1, 1, 1) - w.astype(np.float64)
    exact = np.mean([conv2d_nchw(x, w_err, strides, padding, groups).mean(axis=(0, 2, 3)) for x in data], axis=0)
    assert np.abs(exact).max() > 1e-3                  # 3-bit weights: a shift worth correcting
    np.testing.assert_allclose(p.bias_corr, exact, rtol=1e-5, atol=1e-7)

# Every documented scheme on the fused x86 kernels: (QConfig fields, the paths its conv/dense layers may take)
KERNEL_SCHEMES = {
    "asymmetric": ({"act_symmetric": False}, {"u8s8", "int16", "depthwise"}),
    "asymmetric-per-channel-w7": ({"act_symmetric": False, "per_channel": True, "weight_bits": 7}, {"u8s8", "depthwise"}),
    "power-of-two": ({"power_of_two_scale": True}, {"u8s8", "int16", "depthwise"}),
    "w4-per-channel": ({"weight_bits": 4, "per_channel": True}, {"u8s8", "depthwise"}),
    "a12": ({"act_bits": 12}, {"int16", "depthwise"}),
    # the classifier reads realize's integer average pool: the lowering proves it keeps the 7-bit range
    "asymmetric-a7": ({"act_symmetric": False, "act_bits": 7}, {"u8s8", "depthwise"}),
    # (the network input stays signed int8: the folded stem takes the sign path)
    "unsigned": ({"unsigned_activations": True}, {"u8s8", "s8sign", "int16", "depthwise"}),
}
_SLOW_SCHEMES = ("w4-per-channel", "a12", "asymmetric-a7")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_SCHEMES else n
                                  for n in KERNEL_SCHEMES])
def test_every_scheme_runs_on_the_fused_kernels(name):
    """No integer conv/dense is left to TVM's generic lowering on x86-avx2, the 7-bit and 4-bit schemes put
    every layer on the u8 x s8 path, and the build equals the qmath reference bit for bit."""
    from relayq.backend.lower import lower_quantized, unlowered_int_layers
    from relayq.runtime import host_cpu_flags

    fields, allowed = KERNEL_SCHEMES[name]
    q, rng = _quantize(CFG.replace(**fields))
    stats = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = lower_quantized(q.realized, "x86-avx2", stats=stats)
    assert unlowered_int_layers(lowered) == []
    layers = [s for s in stats if s.get("layer")]
    assert layers and {s["path"] for s in layers} <= allowed, [(s["layer"], s["path"]) for s in layers]
    if not fields.get("act_symmetric", True):
        assert {s["in_dtype"] for s in layers} == {"uint8"} and "uint8" in {s["out_dtype"] for s in layers}
        # the zero-point padding in front of the padded conv is absorbed into its kernel
        assert "relax.nn.pad" not in {op_name(b.value) for b in bindings(lowered["main"])}
    if "avx2" not in host_cpu_flags():
        pytest.skip("x86-avx2 kernels cannot run on this CPU")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = relayq.build(q, target="x86-avx2")
    x = (rng.randn(2, 3, 8, 8) * 1.5).astype("float32")
    np.testing.assert_array_equal(lib(x), reference_run(q.annotated, q.qpoints, x))


def test_fallback_to_the_int16_path_warns_naming_the_layers():
    """Asymmetric uint8 codes with 8-bit weights could saturate vpmaddubsw: the build names the layers;
    7-bit weights on exactly those layers (fast_path_overrides) put all of them on the u8 x s8 path."""
    from relayq.backend.lower import fast_path_overrides

    q, rng = _quantize(CFG.replace(act_symmetric=False))
    with pytest.warns(relayq.SlowKernelWarning, match=r"exact int16 path.*conv2d_0") as rec:
        relayq.build(q, target="x86-avx2")
    assert "weight_bits=7" in str(rec[0].message)
    over = fast_path_overrides(q.realized)
    assert "conv2d_0" in over and all(lc.weight_bits == 7 for lc in over.values())
    q7, rng = _quantize(CFG.replace(act_symmetric=False, layer_overrides=over))
    assert fast_path_overrides(q7.realized) == {}
    assert {p.bits for n, p in q7.qpoints.items() if p.role == "weight" and n.split(":")[0] not in over} == {8}
    with warnings.catch_warnings():
        warnings.simplefilter("error", relayq.SlowKernelWarning)
        lib = relayq.build(q7, target="x86-avx2")
    x = (rng.randn(2, 3, 8, 8) * 1.5).astype("float32")
    np.testing.assert_array_equal(lib(x), reference_run(q7.annotated, q7.qpoints, x))
