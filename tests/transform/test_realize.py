"""realize: an integer graph (structure) that equals the qmath reference bit for bit."""
import numpy as np
import pytest

import relayq
from relayq.analysis.reference import reference_run
from relayq.transform.common import bindings, dtype_of, op_name

from helpers import tiny_cnn

CFG = relayq.QConfig(show_progress=False)


def _quantize(config=CFG, seed=0, calibration="naive"):
    mod, params = tiny_cnn(seed)
    rng = np.random.RandomState(seed + 1)
    data = [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(4)]
    return relayq.quantize_model(mod, params, data, calibration, config), rng


def integer_structure(mod):
    """(float conv/dense count, int conv/dense count, float ops fed by dequantized values that feed int ops)."""
    binds = bindings(mod["main"])
    producer = {b.var: b.value for b in binds}
    float_cd = sum(op_name(b.value) in ("relax.nn.conv2d", "relax.matmul") and dtype_of(b.var) == "float32" for b in binds)
    int_cd = [b for b in binds if op_name(b.value) in ("relax.nn.conv2d", "relax.matmul") and dtype_of(b.var) == "int32"]
    # A value is "dequantized" if it is float and some ancestor is an integer tensor.
    deq = set()
    for b in binds:
        args = [a for a in getattr(b.value, "args", []) if a in producer]
        if dtype_of(b.var).startswith("float") and any(dtype_of(a).startswith("int") or a in deq for a in args):
            deq.add(b.var)
    # Any integer-producing op that reads a dequantized float is a float op between quantized ops.
    bad = [b.var.name for b in binds if dtype_of(b.var).startswith("int")
           and any(a in deq for a in getattr(b.value, "args", []) if a in producer)]
    return float_cd, int_cd, bad


def test_realized_graph_is_integer():
    q, _ = _quantize()
    float_cd, int_cd, bad = integer_structure(q.realized)
    assert float_cd == 0
    assert len(int_cd) == 5 + 1        # 4 conv + 1 dense, + the avg pool's window sum
    for b in int_cd:
        assert all(dtype_of(a) in ("int8", "int16") for a in b.value.args)
    assert bad == []
    # Requantization is integer-only: multiply / shift on int64, no float multiply until the end.
    binds = bindings(q.realized["main"])
    float_mults = [b for b in binds if op_name(b.value) == "relax.multiply" and dtype_of(b.var) == "float32"]
    assert len(float_mults) == 1      # the final dequantization of the logits


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("seed", [0, 3])
def test_realized_equals_qmath_reference_bit_for_bit(per_channel, seed):
    q, rng = _quantize(CFG.replace(per_channel=per_channel), seed)
    lib = relayq.build(q)
    for _ in range(3):
        x = (rng.randn(2, 3, 8, 8) * 1.5).astype("float32")
        np.testing.assert_array_equal(lib(x), reference_run(q.annotated, q.qpoints, x))


def test_int8_close_to_float():
    q, rng = _quantize()
    mod, params = tiny_cnn(0)
    fp = relayq.build(mod, params=params)
    lib = relayq.build(q)
    x = rng.randn(2, 3, 8, 8).astype("float32")
    a, b = lib(x), fp(x)
    # A random 6-layer net calibrated on 4 random batches: a loose bound; accuracy is tested end to end.
    assert np.abs(a - b).max() < 0.15 * np.abs(b).max()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_per_channel_has_vector_multipliers():
    q, _ = _quantize(CFG.replace(per_channel=True))
    assert np.ndim(q.qpoints["conv2d_1:w"].scale) == 1
    text = q.realized.script()
    assert "right_shift" in text


def test_small_accumulators_get_short_multipliers_and_int32_kernels():
    """The depthwise and 1x1 layers' accumulators are small: realize shortens their multipliers
    (qmath.requant_multiplier_bits), the x86 kernels requantize them in int32, and the build still equals
    the qmath reference bit for bit; the 72-tap 3x3 layer keeps a Q31 multiplier and int64 arithmetic."""
    from relayq import qmath
    from relayq.backend import lower

    q, rng = _quantize(CFG.replace(per_channel=True))
    stats = []
    lower.lower_quantized(q.realized, "x86-avx2", stats=stats)
    by_kind = {}
    for s in stats:
        if s.get("layer"):
            by_kind.setdefault((s["kind"], s.get("path")), []).append(bool(s.get("int32_requant")))
    assert by_kind[("conv2d", "depthwise")] == [True]
    assert sum(sum(v) for v in by_kind.values()) >= 2          # the depthwise and the 1x1 layer (8 inputs)
    assert not all(all(v) for v in by_kind.values())         # the 3x3 8-to-8 layer: bound 72 * 127 * 127
    assert qmath.requant_multiplier_bits(72 * 127 * 127, 8) == qmath.MULTIPLIER_BITS
    # the realized multipliers: some below 2^16 (shortened), some in the Q31 range
    mults = [int(v) for b in bindings(q.realized["main"]) if op_name(b.value) == "relax.multiply"
             and dtype_of(b.var) == "int64" for v in np.ravel(b.value.args[1].value.numpy())]
    assert min(mults) < 1 << 16 and max(mults) >= 1 << 30
    lib = relayq.build(q, target="x86-avx2")
    for _ in range(2):
        x = (rng.randn(2, 3, 8, 8) * 1.5).astype("float32")
        np.testing.assert_array_equal(lib(x), reference_run(q.annotated, q.qpoints, x))
