"""AdaRound: learned weight rounding (calibration/adaround.py numerics, transform/rounding.py over a graph)."""
import warnings

import numpy as np
import pytest

import relayq
from relayq import qmath
from relayq.analysis.reference import reference_run
from relayq.calibration import adaround
from relayq.runtime import compile_host

from helpers import tiny_cnn


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
        y = lib(x)
        np.testing.assert_array_equal(y, reference_run(q.annotated, q.qpoints, x))
        np.testing.assert_array_equal(sim(x)[0], y)


def _weight(q, name):
    from relayq.transform.common import bindings, const_value, simq_info
    for b in bindings(q.annotated["main"]):
        info = simq_info(b.value)
        if info is not None and info[1] == name:
            return const_value(info[0])
    raise KeyError(name)


def test_adaround_lowers_layer_output_error_on_the_net(w4_adaround):
    """Per layer, on fresh inputs: the learned codes' output error is below round-to-nearest's on average."""
    q, rng, _ = w4_adaround
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
