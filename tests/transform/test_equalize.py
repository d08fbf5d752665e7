"""Cross-layer equalization and high-bias absorption (transform/equalize.py, QConfig options)."""
import numpy as np
import pytest
from tvm import relax

import relayq
from relayq.transform import prepare
from relayq.transform.common import bindings, const_value, op_name
from relayq.transform.equalize import equalize, in_channel_ranges, out_channel_ranges

from helpers import float_reference


def _spread(rng, c):
    """Per-channel factors spanning three decades: the badly scaled channels CLE is for."""
    return np.exp(rng.uniform(np.log(0.02), np.log(20.0), c))


def chain_net(depthwise=False, act="relu", n=2, seed=0, bn=False):
    """conv(3->8) -> act -> [dw conv(8) -> act ->] conv(8->6, 1x1) + bias; channel ranges badly spread."""
    rng = np.random.RandomState(seed)
    s = _spread(rng, 8)
    p = {"w0": (rng.randn(8, 3, 3, 3) * s[:, None, None, None]).astype("float32"),
         "b0": (rng.randn(8) * 0.3 * s).astype("float32"),
         "wd": (rng.randn(8, 1, 3, 3) / s[:, None, None, None] * _spread(rng, 8)[:, None, None, None]).astype("float32"),
         "bd": (rng.randn(8) * 0.3).astype("float32"),
         "w2": (rng.randn(6, 8, 1, 1) / s[None, :, None, None] * 0.5).astype("float32"),
         "b2": (rng.randn(6) * 0.1).astype("float32")}
    if bn:
        # BatchNorm statistics that match the data X: the folded output has mean beta and std gamma.
        import torch
        y = torch.nn.functional.conv2d(torch.from_numpy(X), torch.from_numpy(p["w0"]), padding=1).numpy() \
            + p["b0"][None, :, None, None]
        p.update(g=((rng.rand(8) + 0.5) * s).astype("float32"), be=((rng.rand(8) + 4) * s).astype("float32"),
                 mu=y.mean(axis=(0, 2, 3)).astype("float32"), var=y.var(axis=(0, 2, 3)).astype("float32"))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, 3, 8, 8), "float32"))
    vs = {k: relax.Var(k, relax.TensorType(v.shape, "float32")) for k, v in p.items()}

    def f(y):
        if act == "relu":
            return bb.emit(relax.op.nn.relu(y))
        if act == "relu6":
            return bb.emit(relax.op.clip(y, 0.0, 6.0))
        return y

    with bb.function("main", [x] + list(vs.values())):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, vs["w0"], padding=(1, 1)))
            y = bb.emit(relax.op.add(y, relax.op.reshape(vs["b0"], (1, 8, 1, 1))))
            if bn:
                y = bb.emit(relax.TupleGetItem(bb.emit(relax.op.nn.batch_norm(
                    y, vs["g"], vs["be"], vs["mu"], vs["var"], axis=1, training=False)), 0))
            y = f(y)
            if depthwise:
                y = bb.emit(relax.op.nn.conv2d(y, vs["wd"], padding=(1, 1), groups=8))
                y = f(bb.emit(relax.op.add(y, relax.op.reshape(vs["bd"], (1, 8, 1, 1)))))
            y = bb.emit(relax.op.nn.conv2d(y, vs["w2"]))
            y = bb.emit(relax.op.add(y, relax.op.reshape(vs["b2"], (1, 6, 1, 1))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), p


X = np.random.RandomState(5).randn(2, 3, 8, 8).astype("float32")


def _run(mod, x):
    from relayq.runtime import compile_host
    return compile_host(mod)(x)[0]


def _convs(mod):
    return [const_value(b.value.args[1]) for b in bindings(mod["main"]) if op_name(b.value) == "relax.nn.conv2d"]


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("act", ["relu", "identity"])
def test_cle_keeps_float_outputs(depthwise, act):
    mod, params = chain_net(depthwise, act)
    plain = prepare(mod, params)
    eq = prepare(mod, params, relayq.QConfig(cross_layer_equalization=True, show_progress=False))
    want, got = _run(plain, X), _run(eq, X)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not all(np.array_equal(a, b) for a, b in zip(_convs(plain), _convs(eq)))      # it did rescale


def test_cle_equalizes_ranges_of_each_chain():
    mod, params = chain_net(depthwise=True)
    eq, report = equalize(prepare(mod, params))
    assert report["chains"] == 2 and report["sweeps"] > 1       # two interacting chains: iterated
    w0, wd, w2 = _convs(eq)
    np.testing.assert_allclose(out_channel_ranges(w0), in_channel_ranges(wd, 8), rtol=1e-3)
    np.testing.assert_allclose(out_channel_ranges(wd), in_channel_ranges(w2, 1), rtol=1e-3)
    # Relative precision of a per-tensor grid per channel, mean(r_c / max r): the depthwise layer, the
    # worst one before, gains most (the white paper's objective is the sum over layers of these).
    precision = lambda r: float((r / r.max()).mean())  # noqa: E731
    wd_before = _convs(prepare(mod, params))[1]
    assert precision(out_channel_ranges(wd)) > 1.5 * precision(out_channel_ranges(wd_before))


def test_relu6_chain_skipped_unless_replaced():
    mod, params = chain_net(act="relu6")
    plain = prepare(mod, params)
    _, report = equalize(plain)
    assert report["chains"] == 0 and len(report["skipped"]) == 1 and "ReLU6" in report["skipped"][0][2]
    eq = prepare(mod, params, relayq.QConfig(cross_layer_equalization=True, cle_replace_relu6=True,
                                             show_progress=False))
    ops = [op_name(b.value) for b in bindings(eq["main"])]
    assert "relax.clip" not in ops and "relax.nn.relu" in ops
    # Replacing ReLU6 changes the function where activations exceed 6; with ReLU it is equal to
    # the same model with ReLU.
    relu_mod, _ = chain_net(act="relu")
    np.testing.assert_allclose(_run(eq, X), _run(prepare(relu_mod, params), X), rtol=1e-5, atol=1e-4)


def test_high_bias_absorption_moves_bias_with_bn_stats():
    mod, params = chain_net(act="relu", bn=True)
    cfg = relayq.QConfig(cross_layer_equalization=True, high_bias_absorption=True, show_progress=False)
    eq, report = equalize(prepare(mod, params), absorb_bias=True)
    assert report["absorbed"] == 0                      # no statistics after folding: nothing absorbed
    absorbed = prepare(mod, params, cfg)
    biases = [const_value(b.value.args[1]).reshape(-1) for b in bindings(absorbed["main"])
              if op_name(b.value) == "relax.add"]
    plain_eq = prepare(mod, params, cfg.replace(high_bias_absorption=False))
    biases_eq = [const_value(b.value.args[1]).reshape(-1) for b in bindings(plain_eq["main"])
                 if op_name(b.value) == "relax.add"]
    assert np.all(biases[0] <= biases_eq[0] + 1e-6) and np.any(biases[0] < biases_eq[0] - 1e-3)
    # Pre-activations are almost all above beta - 3 gamma: the output is almost everywhere the same.
    want, got = _run(plain_eq, X), _run(absorbed, X)
    close = np.isclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert close.mean() > 0.9


def _w8a8_error(mod, params, cle, bits=8):
    rng = np.random.RandomState(1)
    calib = [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(4)]
    cfg = relayq.QConfig(weight_bits=bits, bias_correction=False, cross_layer_equalization=cle, show_progress=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, calib, "naive", cfg)
    from relayq.analysis.reference import reference_run
    want = float_reference(mod, params, X)
    got = reference_run(q.annotated, q.qpoints, X)
    return float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want ** 2)))


def test_cle_improves_per_tensor_error_on_badly_scaled_channels():
    mod, params = chain_net(depthwise=True)
    before, after = _w8a8_error(mod, params, False, 4), _w8a8_error(mod, params, True, 4)
    assert after < before / 2, (before, after)
