"""Elementwise functions on quantized tensors: tables over all input codes, per-channel affines, products.

Every function is checked over ALL input codes (8, 4, 12 and 16 bits): the realized module (compiled and
run), the simulated module and the numpy reference agree bit for bit, and the result is within one
output step of the float function.
"""
import dataclasses
import io
import math
import warnings

import numpy as np
import pytest
from tvm import relax

import relayq
from relayq import qmath
from relayq.analysis.reference import reference_run
from relayq.runtime import compile_host
from relayq.transform import annotate, calibrate, prepare
from relayq.transform.annotate import layers, regions
from relayq.transform.common import bindings, dtype_of, op_name
from relayq.transform.realize import realize, simulate

from helpers import assert_three_ways

R = relax.op
CFG = relayq.QConfig(show_progress=False)


def _c(v):
    return relax.const(np.float32(v))


# name -> (Relax builder on x, numpy float function): the spellings the importers produce.
FUNCS = {
    "sigmoid": (lambda bb, x: R.sigmoid(x), lambda x: 1 / (1 + np.exp(-x))),
    "tanh": (lambda bb, x: R.tanh(x), np.tanh),
    "exp": (lambda bb, x: R.exp(x), np.exp),
    # ONNX HardSigmoid: x * 1/6 + 0.5, clipped to [0, 1]
    "hardsigmoid": (lambda bb, x: R.clip(R.add(R.multiply(x, _c(1 / 6)), _c(0.5)), 0.0, 1.0),
                    lambda x: np.clip(x / 6 + 0.5, 0, 1)),
    # ONNX HardSwish after import: x * clip(x + 3, 0, 6) / 6
    "hardswish": (lambda bb, x: R.multiply(x, bb.emit(R.divide(bb.emit(R.clip(bb.emit(R.add(x, _c(3.0))), 0.0, 6.0)),
                                                                _c(6.0)))),
                  lambda x: x * np.clip(x + 3, 0, 6) / 6),
    # SiLU as exporters write it: a multiply of x with sigmoid(x)
    "silu": (lambda bb, x: R.multiply(x, bb.emit(R.sigmoid(x))), lambda x: x / (1 + np.exp(-x))),
    # GELU, erf form (ONNX export of nn.GELU): x * (erf(x / sqrt 2) + 1) * 0.5
    "gelu_erf": (lambda bb, x: R.multiply(bb.emit(R.multiply(x, bb.emit(R.add(bb.emit(R.erf(bb.emit(
        R.divide(x, _c(math.sqrt(2)))))), _c(1.0))))), _c(0.5)),
                 lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))),
    # GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_tanh": (lambda bb, x: R.multiply(bb.emit(R.multiply(x, _c(0.5))), bb.emit(R.add(bb.emit(R.tanh(bb.emit(
        R.multiply(bb.emit(R.add(x, bb.emit(R.multiply(bb.emit(R.multiply(bb.emit(R.multiply(x, x)), x)),
                                                        _c(0.044715))))), _c(math.sqrt(2 / math.pi)))))), _c(1.0)))),
                  lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
    "gelu_op": (lambda bb, x: R.nn.gelu(x), lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))),
    "leaky_relu": (lambda bb, x: R.nn.leakyrelu(x, 0.1), lambda x: np.where(x >= 0, x, 0.1 * x)),
    # ELU as torch.export writes it: where(x > 0, x, exp(x) - 1)
    "elu": (lambda bb, x: R.where(bb.emit(R.greater(x, _c(0.0))), x, bb.emit(R.subtract(bb.emit(R.exp(x)), _c(1.0)))),
            lambda x: np.where(x > 0, x, np.exp(x) - 1)),
    # Mish: x * tanh(log(1 + exp(x)))
    "mish": (lambda bb, x: R.multiply(x, bb.emit(R.tanh(bb.emit(R.log(bb.emit(R.add(bb.emit(R.exp(x)), _c(1.0)))))))),
             lambda x: x * np.tanh(np.log1p(np.exp(x)))),
}


def _module(names, shape, table=None):
    """x -> concat([x]) (a quantized layer whose codes we control) -> each function -> a tuple of outputs."""
    table = table or FUNCS
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(R.concat([x], axis=1))
            ys = [bb.emit(table[n][0](bb, q)) for n in names]
            out = bb.emit_output(relax.Tuple(ys))
        bb.emit_func_output(out)
    return bb.get()


def _exhaustive(mod, config, x_range, shape, channel_axis=None):
    """Quantize ``mod`` with its input codes passed through unchanged; return (inputs covering every code,
    realized output, simulated output, reference output, output QPoint, annotated)."""
    annotated = annotate(prepare(mod, {}), config)
    rng = np.random.RandomState(0)
    data = [np.linspace(-x_range, x_range, int(np.prod(shape)), dtype="float32").reshape(shape)] + \
           [rng.uniform(-x_range, x_range, shape).astype("float32")]
    _, qp = calibrate(annotated, data, "naive", config)
    # The concat's output keeps its input's codes: the function then sees exactly the codes we feed.
    qp["concat_0:out"] = dataclasses.replace(qp["concat_0:in0"], name="concat_0:out")
    pin = qp["concat_0:in0"]
    codes = np.arange(pin.qmin, pin.qmax + 1)
    n = codes.size
    x = np.broadcast_to(((codes - pin.zero_point) * np.float32(pin.scale)).astype("float32"), shape[:-1] + (n,))
    x = np.ascontiguousarray(x)
    realized = realize(annotated, qp)
    y_real = compile_host(realized)(x)
    y_sim = compile_host(simulate(annotated, qp))(x)
    y_ref = reference_run(annotated, qp, x)
    y_ref = y_ref if isinstance(y_ref, list) else [y_ref]
    # region output points in output order (each function's region is one layer, in graph order)
    outps = [p for name, p in qp.items() if name.endswith(":out") and not name.startswith("concat")]
    return x, y_real, y_sim, y_ref, outps, annotated, realized


def _assert_within_half_step(y, f, p):
    """y is the float function f quantized at point p: within half an output step of f clipped to p's range."""
    lo, hi = (p.qmin - p.zero_point) * float(p.scale), (p.qmax - p.zero_point) * float(p.scale)
    err = np.abs(y - np.clip(f, lo, hi))
    assert err.max() <= 0.5 * float(p.scale) * 1.001 + 1e-6, (err.max(), float(p.scale))


def _shape_for(bits, signed=True, channels=1):
    lo, hi = qmath.qrange(bits, signed)
    return (1, channels, 1, hi - lo + 1)


def _check_all(names, table, x, y_real, y_sim, y_ref, outps):
    assert len(y_real) == len(names) == len(outps)
    for name, yr, ys, yf, p in zip(names, y_real, y_sim, y_ref, outps):
        np.testing.assert_array_equal(yr, yf, err_msg=name)
        np.testing.assert_array_equal(ys, yr, err_msg=name)
        _assert_within_half_step(yr, table[name][1](x.astype(np.float64)), p)


_FLOAT_FUNCTION_OPS = {"relax.sigmoid", "relax.tanh", "relax.exp", "relax.erf", "relax.log", "relax.nn.gelu",
                       "relax.nn.leakyrelu", "relax.where", "relax.divide", "relax.greater"}


def test_every_function_is_a_bit_exact_table_over_all_8bit_codes():
    names = sorted(FUNCS)
    shape = _shape_for(8)
    x, y_real, y_sim, y_ref, outps, annotated, realized = _exhaustive(_module(names, shape), CFG, 4.0, shape)
    assert x.size == 255
    assert [r["kind"] for r in regions(annotated).values()] == ["lut"] * len(names)
    _check_all(names, FUNCS, x, y_real, y_sim, y_ref, outps)
    # Structure: one table lookup per function, no float function left in the realized graph.
    ops = [op_name(b.value) for b in bindings(realized["main"])]
    assert ops.count("relax.take") == len(names)
    assert not _FLOAT_FUNCTION_OPS & set(ops), ops


@pytest.mark.parametrize("bits,names", [(4, ["sigmoid", "hardswish"]), (12, ["silu", "gelu_erf"]), (16, ["tanh"])])
def test_tables_at_other_bit_widths(bits, names):
    shape = _shape_for(bits)
    x, y_real, y_sim, y_ref, outps, _, realized = _exhaustive(_module(names, shape), CFG.replace(act_bits=bits), 4.0,
                                                              shape)
    assert x.size == (1 << bits) - 1
    _check_all(names, FUNCS, x, y_real, y_sim, y_ref, outps)
    tables = [b.value.args[0].value.numpy() for b in bindings(realized["main"]) if op_name(b.value) == "relax.take"]
    assert len(tables) == len(names)
    assert all(t.size == (1 << bits) - 1 and str(t.dtype) == qmath.storage_dtype(bits) for t in tables)


def test_asymmetric_codes_table():
    names = ["hardswish", "gelu_erf", "sigmoid"]
    shape = _shape_for(8, signed=False)
    x, y_real, y_sim, y_ref, outps, _, _ = _exhaustive(_module(names, shape), CFG.replace(act_symmetric=False), 4.0,
                                                       shape)
    assert x.size == 256 and all(p.zero_point > 0 for p in outps[:2])
    _check_all(names, FUNCS, x, y_real, y_sim, y_ref, outps)


def test_no_float_fallback_warning_for_functions():
    shape = (1, 1, 1, 255)
    for func in FUNCS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", relayq.FloatFallbackWarning)
            annotated = annotate(prepare(_module([func], shape), {}), CFG)
        assert layers(annotated)["elementwise_0"] == "elementwise", func
        assert regions(annotated)["elementwise_0"]["kind"] == "lut"


# ----------------------------------------------------------------------------- per-channel affine
C = 4
_RNG = np.random.RandomState(3)
_MEAN, _STD = _RNG.randn(C, 1, 1).astype("float32"), _RNG.uniform(0.5, 2, (C, 1, 1)).astype("float32")
_GAMMA, _BETA = _RNG.uniform(-2, 2, (C, 1, 1)).astype("float32"), _RNG.randn(C, 1, 1).astype("float32")
_ALPHA = np.array([0.25, -0.5, 0.0, 1.5], "float32")
_ALPHA2 = np.array([0.1, 2.0, -0.3, 0.0], "float32")


def _bn(bb, x, gamma=_GAMMA):
    t = bb.emit(R.divide(bb.emit(R.subtract(x, relax.const(_MEAN))), relax.const(_STD)))
    return R.add(bb.emit(R.multiply(t, relax.const(gamma))), relax.const(_BETA))


# (distinct constants per function: identical subgraphs would be merged into one by prepare's rewrites)


AFFINE = {
    # a BatchNorm that follows no conv, as DecomposeOpsForInference leaves it (DenseNet)
    "batchnorm": (_bn, lambda x: (x - _MEAN) / _STD * _GAMMA + _BETA),
    "batchnorm_relu": (lambda bb, x: R.nn.relu(bb.emit(_bn(bb, x, -_GAMMA))),
                       lambda x: np.maximum((x - _MEAN) / _STD * -_GAMMA + _BETA, 0)),
    # ONNX PRelu -> R.nn.prelu; torch.export's PReLU -> where(x > 0, x, x * alpha)
    "prelu": (lambda bb, x: R.nn.prelu(x, relax.const(_ALPHA), axis=1),
              lambda x: np.where(x >= 0, x, _ALPHA.reshape(C, 1, 1) * x)),
    "prelu_where": (lambda bb, x: R.where(bb.emit(R.greater(x, _c(0.0))), x,
                                          bb.emit(R.multiply(x, relax.const(_ALPHA2.reshape(C, 1, 1))))),
                    lambda x: np.where(x >= 0, x, _ALPHA2.reshape(C, 1, 1) * x)),
}


@pytest.mark.parametrize("bits,symmetric", [(8, True), pytest.param(8, False, marks=pytest.mark.slow), (4, True),
                                            pytest.param(12, True, marks=pytest.mark.slow)])
def test_per_channel_affine_is_integer_and_exact_over_all_codes(bits, symmetric):
    names = sorted(AFFINE)
    shape = _shape_for(bits, symmetric, C)
    cfg = CFG.replace(act_bits=bits, act_symmetric=symmetric)
    x, y_real, y_sim, y_ref, outps, annotated, realized = _exhaustive(_module(names, shape, AFFINE), cfg, 3.0, shape)
    assert [r["kind"] for r in regions(annotated).values()] == ["affine"] * len(names)
    _check_all(names, AFFINE, x, y_real, y_sim, y_ref, outps)
    ops = [op_name(b.value) for b in bindings(realized["main"])]
    assert "relax.take" not in ops           # a per-channel function is an integer affine, not a table
    floats = [op_name(b.value) for b in bindings(realized["main"]) if op_name(b.value) and dtype_of(b.var) == "float32"]
    # Float only where the input is quantized and the output dequantized.
    assert set(floats) <= {"relax.multiply", "relax.astype", "relax.subtract", "relax.concat"}, floats
    assert "relax.divide" not in ops and "relax.nn.prelu" not in ops


def test_affine_params_tolerate_zero_and_negative_slopes():
    m_pos, m_neg, off, s = qmath.channel_affine_params([1.0, 0.0, -2.0], [0.0, 0.5, -2.0], [0.0, 1.0, -1.0], 0.1, 0.05)
    q = np.arange(-127, 128)[None, :].repeat(3, 0)
    got = qmath.channel_affine(q, m_pos, m_neg, off, s, -127, 127, axis=0)
    real = np.where(q >= 0, np.array([[1.0], [0.0], [-2.0]]), np.array([[0.0], [0.5], [-2.0]])) * q * 0.1 \
        + np.array([[0.0], [1.0], [-1.0]])
    np.testing.assert_array_equal(got, np.clip(np.round(real / 0.05), -127, 127))


# ----------------------------------------------------------------------------- blocks end to end
def _onnx(net, shape):
    import onnx
    import torch

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(*shape),), f, dynamo=False, opset_version=17, input_names=["x"])
    return relayq.frontend.from_onnx(onnx.load_from_string(f.getvalue()))


def _se_net(act="hardswish", gate="hardsigmoid"):
    import torch
    import torch.nn as nn

    acts = {"hardswish": nn.Hardswish, "silu": nn.SiLU, "relu": nn.ReLU}
    gates = {"hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid}

    class InvertedResidualSE(nn.Module):
        """MobileNetV3 / EfficientNet block: expand 1x1 -> act -> depthwise 3x3 -> act -> squeeze-excitation
        (mean -> fc -> relu -> fc -> gate -> multiply) -> project 1x1 -> residual add."""

        def __init__(self, c=8, e=16):
            super().__init__()
            self.expand, self.bn1, self.act1 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), acts[act]()
            self.dw, self.bn2, self.act2 = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), \
                acts[act]()
            self.fc1, self.fc2, self.gate = nn.Conv2d(e, 4, 1), nn.Conv2d(4, e, 1), gates[gate]()
            self.proj, self.bn3 = nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            y = self.act2(self.bn2(self.dw(self.act1(self.bn1(self.expand(x))))))
            w = self.gate(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
            return x + self.bn3(self.proj(y * w))

    torch.manual_seed(0)
    net = InvertedResidualSE()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


def _end_to_end(mod, params, shape, net, n=2):
    """Quantize, build and run; bit-exact against the reference and the simulated module; cosine with the
    torch ``net`` (the float model itself, which the imports match to ~1e-6)."""
    import torch

    rng = np.random.RandomState(0)
    data = [rng.randn(*shape).astype("float32") for _ in range(8)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = relayq.quantize_model(mod, params, data, "naive", CFG)
    fallback = [str(w.message) for w in caught if issubclass(w.category, relayq.FloatFallbackWarning)]
    lib = relayq.build(q, target="generic")
    sim = compile_host(q.simulated)
    cos = []
    for _ in range(n):
        x = rng.randn(*shape).astype("float32")
        y = assert_three_ways(q, lib, sim, x)
        with torch.no_grad():
            f = net(torch.from_numpy(x)).numpy()
        cos.append(float(np.dot(y.ravel(), f.ravel()) / np.linalg.norm(y) / np.linalg.norm(f)))
    return q, fallback, min(cos)


@pytest.mark.parametrize("act,gate", [("hardswish", "hardsigmoid"),
                                      pytest.param("silu", "sigmoid", marks=pytest.mark.slow)])
def test_squeeze_excitation_block_quantizes_end_to_end(act, gate):
    """MobileNetV3's (hardswish / hardsigmoid) and EfficientNet's (SiLU / sigmoid) SE blocks from torch via ONNX."""
    shape = (1, 8, 8, 8)
    net = _se_net(act, gate)
    mod, params = _onnx(net, shape)
    q, fallback, cos = _end_to_end(mod, params, shape, net)
    assert not fallback, fallback
    types = sorted(set(q.layers.values()))
    assert types == ["add", "conv2d", "elementwise", "global_avg_pool", "multiply"], types
    assert cos >= 0.99, cos
    realized_ops = {op_name(b.value) for b in bindings(q.realized["main"])}
    assert not realized_ops & {"relax.sigmoid", "relax.clip_float", "relax.divide", "relax.erf"}
    # The gate multiply is an int x int product, requantized in integers.
    muls = [b for b in bindings(q.realized["main"]) if op_name(b.value) == "relax.multiply"
            and dtype_of(b.var) == "int32" and all(dtype_of(a) == "int32" for a in b.value.args)]
    assert len(muls) >= 1


ACTIVATIONS = ["Hardswish", "SiLU", "GELU", "GELU_tanh", "Hardsigmoid", "Mish", "ELU", "LeakyReLU", "PReLU", "Tanh",
               "Softplus", "SELU", "Sigmoid"]


def _activation(module):
    import torch.nn as nn

    acts = {"GELU_tanh": lambda: nn.GELU(approximate="tanh"), "PReLU": lambda: nn.PReLU(6),
            "LeakyReLU": lambda: nn.LeakyReLU(0.1)}
    return acts[module]() if module in acts else getattr(nn, module)()


def test_onnx_exported_activations_in_one_network_do_not_fall_back():
    """Every activation, as torch.onnx.export + relayq.frontend.from_onnx write it, on branches of one conv."""
    import torch
    import torch.nn as nn

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.acts = nn.ModuleList(_activation(a) for a in ACTIVATIONS)
            self.head = nn.Conv2d(6 * len(ACTIVATIONS), 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.head(torch.cat([a(y) for a in self.acts], dim=1))

    torch.manual_seed(0)
    shape = (1, 3, 6, 6)
    net = Branches().eval()
    mod, params = _onnx(net, shape)
    q, fallback, cos = _end_to_end(mod, params, shape, net, n=1)
    assert not fallback, fallback
    assert cos >= 0.99, cos
    kinds = [v for v in q.layers.values() if v in ("elementwise", "affine")]
    assert len(kinds) == len(ACTIVATIONS), q.layers
    assert sum(v == "affine" for v in kinds) == 1           # PReLU with a slope per channel


@pytest.mark.slow
@pytest.mark.parametrize("module", ACTIVATIONS)
def test_onnx_exported_activations_do_not_fall_back(module):
    """What torch.onnx.export + relayq.frontend.from_onnx make of each activation is quantized."""
    import torch.nn as nn

    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _activation(module), nn.Conv2d(6, 4, 1)).eval()
    shape = (1, 3, 6, 6)
    mod, params = _onnx(net, shape)
    q, fallback, cos = _end_to_end(mod, params, shape, net, n=1)
    assert not fallback, fallback
    assert cos >= 0.99, cos
    kinds = {v for v in q.layers.values()}
    assert kinds & {"elementwise", "affine"}, q.layers


def _densenet_net():
    import torch
    import torch.nn as nn

    class DenseBlock(nn.Module):
        """DenseNet's BatchNorm -> ReLU -> conv on concatenations (no conv before the BN), then BN -> PReLU."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1, self.c1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2, self.c2 = nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1, bias=False)
            self.bn3, self.prelu = nn.BatchNorm2d(24), nn.PReLU(24)
            self.fc = nn.Linear(24, 5)

        def forward(self, x):
            x = self.stem(x)
            y = torch.cat([x, self.c1(torch.relu(self.bn1(x)))], 1)
            y = torch.cat([y, self.c2(torch.relu(self.bn2(y)))], 1)
            return self.fc(self.prelu(self.bn3(y)).mean((2, 3)))

    torch.manual_seed(0)
    net = DenseBlock()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("frontend", ["onnx", pytest.param("torch", marks=pytest.mark.slow)])
def test_batchnorm_before_conv_and_prelu_are_integer_affines(frontend):
    import torch

    shape = (1, 3, 8, 8)
    net = _densenet_net()
    if frontend == "onnx":
        mod, params = _onnx(net, shape)
    else:
        mod, params = relayq.frontend.from_torch(net, (torch.randn(*shape),))
    q, fallback, cos = _end_to_end(mod, params, shape, net)
    assert not fallback, fallback
    assert cos >= 0.99, cos
    # bn1 follows the stem conv (prepare folds it into a copy of the conv); bn2 and bn3 are standalone, and
    # bn3's PReLU is a second affine on its output
    assert sum(t == "affine" for t in q.layers.values()) == 3, q.layers
    binds = bindings(q.realized["main"])
    assert not {op_name(b.value) for b in binds} & {"relax.divide", "relax.nn.prelu", "relax.take", "relax.greater"}
    # the only selects are integer ones (the affine's sign-dependent multiplier, the pool's rounding)
    assert all(dtype_of(b.var).startswith("int") for b in binds if op_name(b.value) == "relax.where")


def test_shared_inner_op_feeds_two_tables_and_a_lone_relu_stays_a_clip():
    """sigmoid(x) read by two functions (x * s and s + 1): two tables from x's codes, the shared sigmoid
    computed by neither; relu(x) alone is relayq's clip on codes, not a table."""
    shape = _shape_for(8)
    table = {"silu": FUNCS["silu"], "sig_plus_1": (None, lambda x: 1 / (1 + np.exp(-x)) + 1)}
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(R.concat([x], axis=1))
            s = bb.emit(R.sigmoid(q))
            a = bb.emit(R.multiply(q, s))
            b = bb.emit(R.add(s, _c(1.0)))
            r = bb.emit(R.nn.relu(q))
            out = bb.emit_output(relax.Tuple([a, b, r]))
        bb.emit_func_output(out)
    x_, y_real, y_sim, y_ref, outps, annotated, realized = _exhaustive(bb.get(), CFG, 4.0, shape)
    assert sorted(layers(annotated).values()) == ["concat", "elementwise", "elementwise"]
    _check_all(["silu", "sig_plus_1"], table, x_, y_real[:2], y_sim[:2], y_ref[:2], outps)
    np.testing.assert_array_equal(y_real[2], y_ref[2])
    np.testing.assert_array_equal(y_sim[2], y_real[2])
    np.testing.assert_array_equal(y_real[2], np.maximum(x_, 0))        # the input's codes, clipped at 0
    ops = [op_name(b.value) for b in bindings(realized["main"])]
    assert ops.count("relax.take") == 2 and "relax.sigmoid" not in ops and "relax.nn.relu" not in ops
