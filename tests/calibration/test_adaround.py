"""AdaRound: learned weight rounding (calibration/adaround.py numerics, transform/rounding.py over a graph)."""
import warnings

import numpy as np
import pytest

import relayq
from relayq import qmath
from relayq.analysis.reference import reference_run
from relayq.calibration import adaround
from relayq.runtime import compile_host

from helpers import assert_three_ways, tiny_cnn


def _layer(seed=0, n=512, groups=1, og=6, k=24):
    rng = np.random.RandomState(seed)
    # Correlated inputs: the case where rounding each weight to nearest is far from the best layer output.
    mix = rng.randn(groups, k, k) * 0.5 + np.eye(k)
    x = np.einsum("ngk,gkj->ngj", rng.randn(n, groups, k), mix).astype("float32")
    w = rng.randn(groups, og, k) * 0.3
    s = np.abs(w).max(axis=2, keepdims=True) / 7                   # W4 per output channel
    return w, s, x


@pytest.mark.parametrize("backend,groups", [("torch", 1), ("torch", 4), ("numpy", 1)])
def test_round_layer_beats_round_to_nearest(backend, groups):
    if backend == "torch":
        pytest.importorskip("torch")
    w, s, x = _layer(groups=groups)
    codes, info = adaround.round_layer(w, s, -7, 7, x, iterations=300, backend=backend)
    assert info["backend"] == backend and info["kept"] == "adaround"
    assert info["mse_adaround"] < 0.8 * info["mse_nearest"], info
    nearest = np.clip(np.round(w / s), -7, 7)
    assert codes.dtype == np.int64 and np.abs(codes).max() <= 7
    assert np.all(np.abs(codes - w / s) < 1.0)                       # each weight rounded down or up
    assert np.any(codes != nearest)


def test_numpy_fallback_gradient_matches_torch():
    """Both implementations run the same loop: their learned codes mostly agree."""
    pytest.importorskip("torch")
    w, s, x = _layer(seed=3)
    a, _ = adaround.round_layer(w, s, -7, 7, x, iterations=200, backend="torch")
    b, _ = adaround.round_layer(w, s, -7, 7, x, iterations=200, backend="numpy")
    assert (a == b).mean() > 0.95


def test_patch_sampler_matches_conv():
    """An im2col sample times the weight (groups layout) is the conv's output at that pixel."""
    rng = np.random.RandomState(0)
    x = rng.randn(2, 6, 7, 7).astype("float32")
    w = rng.randn(4, 3, 3, 3).astype("float32")                     # groups=2
    sp = adaround.PatchSampler("conv2d", 10, 1, kernel=(3, 3), strides=(2, 2), padding=(1, 1, 1, 1), groups=2)
    sp(x)
    patches = sp.data()
    assert patches.shape == (10, 2, 27)
    full = qmath.conv2d_int(np.round(x * 1000), np.round(w * 1000), (2, 2), (1, 1, 1, 1), (1, 1), 2) / 1e6
    outs = np.einsum("ngk,gok->ngo", np.round(patches * 1000) / 1000,
                     np.round(w.reshape(2, 2, 27) * 1000) / 1000).reshape(10, 4)
    # Every sampled output row is one of the conv's output pixels.
    flat = full.transpose(0, 2, 3, 1).reshape(-1, 4)
    for row in outs:
        assert np.min(np.abs(flat - row).max(axis=1)) < 1e-4


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_asymmetric_reconstruction_makes_up_for_input_error(backend):
    """Learned on the quantized model's (perturbed) inputs against the float target, the rounding
    compensates the systematic input error; learned on the float inputs it cannot."""
    if backend == "torch":
        pytest.importorskip("torch")
    w, s, x = _layer(seed=5)
    rng = np.random.RandomState(9)
    # A systematic input error (as earlier quantized layers leave): a fixed per-feature gain.
    xq = (x * (1.0 + 0.15 * rng.randn(1, 1, x.shape[2]))).astype("float32")
    target = np.einsum("ngk,gok->ngo", x.astype(np.float64), w)
    sym, _ = adaround.round_layer(w, s, -7, 7, x, iterations=300, backend=backend)
    asym, info = adaround.round_layer(w, s, -7, 7, x, xq, iterations=300, backend=backend)
    xq64 = xq.astype(np.float64)
    assert adaround.output_mse(asym, s, xq64, target) < 0.8 * adaround.output_mse(sym, s, xq64, target)
    # output_shift is the measured mean error of the returned codes (the empirical bias correction).
    shift = (np.einsum("ngk,gok->ngo", xq64, asym * s) - target).mean(axis=0)
    np.testing.assert_allclose(info["output_shift"], shift, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_activation_in_the_loss_ignores_clipped_errors(backend):
    """With a ReLU in the loss, the error is measured after the ReLU (outputs negative in both models do
    not count), and the learned rounding beats rounding to nearest on that measure."""
    if backend == "torch":
        pytest.importorskip("torch")
    w, s, x = _layer(seed=11)
    bias = -0.8 * np.abs(np.einsum("ngk,gok->ngo", x.astype(np.float64), w)).mean(axis=0)   # many outputs < 0
    relu = (0.0, np.inf)
    target = np.clip(np.einsum("ngk,gok->ngo", x.astype(np.float64), w) + bias, 0, None)
    act, info = adaround.round_layer(w, s, -7, 7, x, iterations=300, backend=backend, bias=bias, clip=relu)
    x64 = x.astype(np.float64)
    nearest = np.clip(np.round(w / s), -7, 7)
    assert info["mse_nearest"] == pytest.approx(adaround.output_mse(nearest, s, x64, target, bias, relu))
    assert info["mse_adaround"] == pytest.approx(adaround.output_mse(act, s, x64, target, bias, relu))
    assert info["kept"] == "adaround" and info["mse_adaround"] < 0.9 * info["mse_nearest"]
    # Errors that the ReLU hides are not counted: far below the error before the ReLU.
    pre = adaround.output_mse(act, s, x64, np.einsum("ngk,gok->ngo", x64, w))
    assert info["mse_adaround"] < 0.5 * pre


def test_minibatch_steps_learn_as_well_as_full_batches():
    """Sampled minibatches per step (what makes thousands of steps affordable: each step costs 1/16 of a
    full one here) come within 15% of the full-batch result with 3x the steps."""
    pytest.importorskip("torch")
    w, s, x = _layer(seed=2, n=2048)
    _, full = adaround.round_layer(w, s, -7, 7, x, iterations=300, backend="torch")
    _, mini = adaround.round_layer(w, s, -7, 7, x, iterations=900, backend="torch", batch=128)
    assert mini["kept"] == "adaround" and mini["mse_adaround"] < 1.15 * full["mse_adaround"]
    assert mini["mse_adaround"] < 0.8 * mini["mse_nearest"]


def test_patch_sampler_takes_the_same_positions_from_another_tensor():
    rng = np.random.RandomState(0)
    xs = [rng.randn(2, 6, 7, 7).astype("float32") for _ in range(3)]
    sp = adaround.PatchSampler("conv2d", 30, 3, kernel=(3, 3), strides=(2, 2), padding=(1, 1, 1, 1), groups=2)
    for x in xs:
        sp(x)
    np.testing.assert_array_equal(np.concatenate([sp.take(x, i) for i, x in enumerate(xs)]), sp.data())
    moved = np.concatenate([sp.take(x + 1.0, i) for i, x in enumerate(xs)])
    assert not np.array_equal(moved, sp.data())
    dense = adaround.PatchSampler("dense", 8, 2)
    rows = [rng.randn(4, 5).astype("float32") for _ in range(2)]
    for r in rows:
        dense(r)
    np.testing.assert_array_equal(np.concatenate([dense.take(r * 2, i) for i, r in enumerate(rows)]), dense.data() * 2)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny optimizations: one thread is faster than two on a shared 2-core machine."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def w4_adaround():
    """tiny_cnn at W4 per-channel with AdaRound, quantized once; the progress lines it printed."""
    import contextlib
    import io

    mod, params = tiny_cnn(0)
    rng = np.random.RandomState(1)
    data = [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(4)]
    cfg = relayq.QConfig(weight_bits=4, per_channel=True, adaround=True, adaround_iterations=150,
                         adaround_samples=256, show_progress=True)
    err = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(err):
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, data, "naive", cfg)
    return q, rng, err.getvalue()


def test_adaround_w4_exact_and_shows_progress(w4_adaround):
    q, rng, err = w4_adaround
    assert "adaround" in err and "layer" in err and "done" in err
    learned = [p for p in q.qpoints.values() if p.role == "weight" and p.codes is not None]
    assert len(learned) >= 4 and all(p.method.endswith("+adaround") for p in learned)
    for p in learned:
        assert np.array_equal(q.params[p.name], p.codes)              # the realized weights are the codes
    assert any(not np.array_equal(p.codes, qmath.quantize(_weight(q, p.name), p.scale, 4, axis=p.axis))
               for p in learned)                                       # some rounding was changed
    # simulated == realized == reference, bit for bit.
    lib = relayq.build(q)
    sim = compile_host(q.simulated)
    for _ in range(2):
        x = (rng.randn(2, 3, 8, 8) * 1.5).astype("float32")
        assert_three_ways(q, lib, sim, x)


def _weight(q, name):
    from relayq.transform.common import bindings, const_value, simq_info
    for b in bindings(q.annotated["main"]):
        info = simq_info(b.value)
        if info is not None and info[1] == name:
            return const_value(info[0])
    raise KeyError(name)


@pytest.fixture(scope="module")
def w4_adaround_float():
    """tiny_cnn at W4 per-channel with AdaRound on the float model's inputs (one pass, no torch twin)."""
    mod, params = tiny_cnn(0)
    rng = np.random.RandomState(1)
    data = [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(4)]
    cfg = relayq.QConfig(weight_bits=4, per_channel=True, adaround=True, adaround_iterations=150,
                         adaround_samples=256, adaround_inputs="float", adaround_activation=False,
                         show_progress=True)
    import contextlib
    import io

    err = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(err):
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, data, "naive", cfg)
    assert "adaround (torch, 150 iterations)" in err.getvalue()           # the float-input walk
    return q, rng


def test_adaround_lowers_layer_output_error_on_the_net(w4_adaround_float):
    """Per layer, on fresh inputs: the learned codes' output error is below round-to-nearest's on average
    (float-input mode: the objective it learns is the float layer's output on float inputs)."""
    q, rng = w4_adaround_float
    from relayq.transform import rounding
    ratios = []
    sp = rounding.samplers(q.annotated, {n: _weight(q, n) for n, _, _ in rounding.layers(q.annotated)}, 256, 1)
    from relayq.transform.calibrate import observe
    from relayq.calibration.methods import HistogramCalibrator
    observe(q.annotated, [np.random.RandomState(7).randn(2, 3, 8, 8).astype("float32")], HistogramCalibrator("naive"), False,
            samplers=sp)
    for name, call, _ in rounding.layers(q.annotated):
        p = q.qpoints[name]
        is_conv = "conv2d" in call.op.name
        w = _weight(q, name).astype(np.float64)
        w3, s3, _ = rounding._layout(w, p, is_conv, int(call.attrs.groups) if is_conv else 1)
        x = sp[name].data().astype(np.float64)
        target = np.einsum("ngk,gok->ngo", x, w3)
        learned = rounding._layout(p.codes.astype(np.float64), p, is_conv,
                                   int(call.attrs.groups) if is_conv else 1)[0]
        nearest = np.clip(np.round(w3 / s3), p.qmin, p.qmax)
        ratios.append(adaround.output_mse(learned, s3, x, target) / adaround.output_mse(nearest, s3, x, target))
    assert len(ratios) == 5 and np.exp(np.mean(np.log(ratios))) < 0.9, ratios


def _twin():
    from relayq.training.graph import build_torch_graph
    return lambda mod, qp: build_torch_graph(mod, qp, learn_scales=False, train_weights=False)


def test_segment_runner_equals_one_pass(w4_adaround):
    """Running the quantized model segment by segment (kept live values) gives every layer the same
    input as running it from the model input in one go (shared inputs and a residual in tiny_cnn)."""
    pytest.importorskip("torch")
    from relayq.transform import rounding
    q, _, _ = w4_adaround
    rng = np.random.RandomState(4)
    batches = [(rng.randn(2, 3, 8, 8).astype("float32"),) for _ in range(2)]
    stepwise = rounding.SegmentRunner(q.annotated, _twin(), batches)
    layers = rounding.layers(q.annotated)
    assert len(layers) == 5
    for name, call, _ in layers:
        a = stepwise.inputs_of(call, q.qpoints)
        b = rounding.SegmentRunner(q.annotated, _twin(), batches).inputs_of(call, q.qpoints)
        assert len(a) == 2
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_sequential_adaround_measures_bias_on_quantized_inputs(w4_adaround):
    """Default AdaRound (quantized inputs): every learned layer carries the bias correction measured on
    the quantized model, not the analytic one from float input means."""
    from relayq.transform.calibrate import bias_correction
    q, _, _ = w4_adaround
    learned = [p for p in q.qpoints.values() if p.role == "weight" and p.codes is not None]
    differs = 0
    for p in learned:
        assert p.bias_corr is not None and np.all(np.isfinite(p.bias_corr))
        analytic = bias_correction(_weight(q, p.name), p, q.calibration_stats.means[p.name])
        assert analytic.shape == np.shape(p.bias_corr)
        differs += not np.allclose(analytic, p.bias_corr, rtol=0.05, atol=1e-6)
    assert differs >= 3


def test_empirical_bias_correction_uses_the_quantized_models_input_means():
    """empirical_bias_correction: each layer is corrected by E[(W_q - W) x_q] with x_q the partly
    quantized model's input; for the first conv x_q is the fake-quantized model input, so the stored
    correction can be recomputed exactly; deeper layers differ from the analytic (float-mean) one. The
    rounding is untouched and the model stays bit-exact."""
    pytest.importorskip("torch")
    from relayq.transform import rounding
    from relayq.transform.calibrate import bias_correction
    mod, params = tiny_cnn(2)
    rng = np.random.RandomState(3)
    data = [(rng.randn(2, 3, 8, 8) * 1.5).astype("float32") for _ in range(3)]
    cfg = relayq.QConfig(weight_bits=4, act_bits=6, empirical_bias_correction=True, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = relayq.quantize_model(mod, params, data, "naive", cfg)
    assert all(p.codes is None for p in q.qpoints.values() if p.role == "weight")
    (first, _, src), *rest = rounding.layers(q.annotated)
    a = q.qpoints[src]
    xq = [qmath.dequantize(qmath.quantize(x, np.float32(a.scale), a.bits, a.signed, a.zero_point), a.scale,
                           a.zero_point) for x in data]
    mean_q = np.mean([x.astype(np.float64).mean(axis=(0, 2, 3)) for x in xq], axis=0)
    p, w = q.qpoints[first], _weight(q, first)
    assert np.ndim(p.scale) == 0                                           # per-tensor weights
    w_q = p.weight_codes(w) * p.scale
    np.testing.assert_allclose(p.bias_corr, rounding.mean_output(w_q - w, mean_q, True), rtol=1e-6, atol=1e-9)
    differs = [not np.allclose(q.qpoints[n].bias_corr, bias_correction(_weight(q, n), q.qpoints[n],
                                                                       q.calibration_stats.means[n]), rtol=1e-3)
               for n, _, _ in rest]
    assert sum(differs) >= 2
    lib = relayq.build(q)
    np.testing.assert_array_equal(lib(data[0]), reference_run(q.annotated, q.qpoints, data[0]))
