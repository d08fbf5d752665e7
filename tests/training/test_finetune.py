"""relayq.finetune: quantization-aware fine-tuning through the torch twin of the annotated graph."""
import contextlib
import io
import sys
import warnings

import numpy as np
import pytest
from tvm import relax

import relayq
from relayq.analysis.reference import reference_run
from relayq.runtime import compile_host

from helpers import tiny_cnn

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny nets: one thread is much faster than two on a shared, loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quantize(mod, params, data, **fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return relayq.quantize_model(mod, params, data, "naive",
                                     relayq.QConfig(show_progress=False, check_accuracy=False, **fields))


@pytest.fixture(scope="module")
def tiny():
    """tiny_cnn (conv+bias+BN+ReLU, residual add, depthwise ReLU6, concat, max/avg pool, dense), its
    float reference, training batches (any batch size: 16) and held-out batches (the module's size 2)."""
    mod, params = tiny_cnn(0)
    rng = np.random.RandomState(1)
    train = [rng.randn(32, 3, 8, 8).astype("float32") for _ in range(16)]
    held = [rng.randn(2, 3, 8, 8).astype("float32") for _ in range(8)]
    calib = [b[:2] for b in train[:4]]
    return mod, params, train, held, calib


@pytest.fixture(scope="module")
def q48(tiny):
    mod, params, train, held, calib = tiny
    return _quantize(mod, params, calib, weight_bits=4, act_bits=8)


def _mse_to_float(q, held, float_model, sim=None):
    """Mean squared error of the integer model (its simulated module: bit-exact with it) against the
    float model (the torch twin's float graph of the model before fine-tuning, checked against relayq's
    own in the test above)."""
    from relayq.training import build_torch_graph

    sim = sim or compile_host(q.simulated)
    ref = build_torch_graph(float_model.annotated, float_model.qpoints, quantize=False)
    with torch.no_grad():
        return float(np.mean([np.mean((sim(x)[0] - ref(torch.from_numpy(x)).numpy()) ** 2) for x in held]))


def test_torch_twin_matches_the_float_and_simulated_graphs(tiny):
    """The translator computes what relayq's modules compute: the float graph to float32 rounding, the
    fake-quantized one to within float noise of the simulated module (same points, same rounding)."""
    from relayq.training import build_torch_graph

    mod, params, train, held, calib = tiny
    q = _quantize(mod, params, calib, weight_bits=4, act_bits=4, act_symmetric=False)
    fl = build_torch_graph(q.annotated, q.qpoints, quantize=False)
    fq = build_torch_graph(q.annotated, q.qpoints)
    prepared, simulated = compile_host(q.prepared), compile_host(q.simulated)
    for x in held[:3]:
        with torch.no_grad():
            np.testing.assert_allclose(fl(torch.from_numpy(x)).numpy(), prepared(x)[0], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(fq(torch.from_numpy(x)).numpy(), simulated(x)[0], rtol=1e-4, atol=1e-4)
    # Not the float model: 4-bit noise is visible.
    assert np.abs(fq(torch.from_numpy(held[0])).detach().numpy() - prepared(held[0])[0]).max() > 1e-2


@pytest.mark.parametrize("fields", [pytest.param(dict(weight_bits=2, act_bits=8, per_channel=True),
                                                 marks=pytest.mark.slow),
                                    dict(weight_bits=2, act_bits=4, act_symmetric=False)],
                         ids=["W2A8-per-channel", "W2A4-asym"])
def test_finetune_beats_ptq_and_stays_bit_exact(tiny, fields):
    mod, params, train, held, calib = tiny
    q = _quantize(mod, params, calib, **fields)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        qf = relayq.finetune(q, train, epochs=3, lr=2e-3, show_progress=True)
    # Progress: a line per epoch with its loss, falling.
    text = err.getvalue()
    assert "finetune epoch 1" in text and "finetune epoch 3" in text and "loss" in text
    hist = qf.training["history"]
    assert len(hist) == 3 and hist[-1]["loss"] < hist[0]["loss"]
    # New weights and scales went through realize; every point is marked as fine-tuned.
    assert all(p.method.endswith("+finetune") for p in qf.qpoints.values())
    assert any(not np.allclose(np.asarray(qf.qpoints[n].scale), np.asarray(p.scale)) for n, p in q.qpoints.items())
    assert all(qf.qpoints[n].zero_point == p.zero_point and qf.qpoints[n].bits == p.bits for n, p in q.qpoints.items())
    # The realized integer model == the simulated module == the numpy reference, bit for bit.
    lib = relayq.build(qf)
    sim = compile_host(qf.simulated)
    for x in held[:3]:
        y = lib(x)
        np.testing.assert_array_equal(y, sim(x)[0])
        np.testing.assert_array_equal(y, reference_run(qf.annotated, qf.qpoints, x))
    # On held-out inputs the fine-tuned integer model is closer to the float model than post-training's.
    before, after = _mse_to_float(q, held, q), _mse_to_float(qf, held, q, sim)
    assert after < 0.7 * before, (before, after)


def test_user_loss_with_labels_and_steps(tiny, q48):
    """A labelled loss over (x, y) batches, ``inputs`` picking the model input, a fixed number of steps."""
    mod, params, train, held, calib = tiny
    q = q48
    rng = np.random.RandomState(3)
    labelled = [(x, rng.randint(0, 10, len(x))) for x in train]
    seen = []

    def loss(out, batch):
        seen.append(out.shape)
        return torch.nn.functional.cross_entropy(out, torch.as_tensor(batch[1]))

    qf = relayq.finetune(q, labelled, inputs=lambda b: b[0], loss=loss, steps=5, lr=1e-3, show_progress=False)
    assert qf.training["steps"] == 5 and seen == [(32, 10)] * 5 and qf.training["loss"] == "user loss"


def test_errors_are_clear(tiny, q48):
    mod, params, train, held, calib = tiny
    q = q48
    with pytest.raises(relayq.ConfigError, match="lr"):
        relayq.finetune(q, train, lr=-1.0)
    with pytest.raises(relayq.ConfigError, match="distillation loss 'l1'"):
        relayq.finetune(q, train, distill="l1")
    with pytest.raises(relayq.DatasetError, match="iterator"):
        relayq.finetune(q, iter(train), epochs=2, show_progress=False)
    with pytest.raises(relayq.DatasetError, match=r"input 'data' has shape \(4, 3, 9, 9\)"):
        relayq.finetune(q, [np.zeros((4, 3, 9, 9), "float32")], show_progress=False)
    with pytest.raises(relayq.ConfigError, match="scalar torch tensor"):
        relayq.finetune(q, train, loss=lambda out, b: out, show_progress=False)


def test_without_torch_names_the_package(tiny, q48, monkeypatch):
    mod, params, train, held, calib = tiny
    q = q48
    monkeypatch.setitem(sys.modules, "torch", None)          # import torch now raises ImportError
    with pytest.raises(relayq.MissingDependencyError, match=r"PyTorch.*pip install"):
        relayq.finetune(q, train)


def test_unknown_op_is_named():
    """A float op the twin has no rule for: the error names the op and its binding."""
    rng = np.random.RandomState(0)
    w = rng.randn(4, 3, 3, 3).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=(1, 1)))
            y = bb.emit(relax.op.cos(y), "weird")
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    q = _quantize(bb.get(), {}, [rng.randn(1, 3, 6, 6).astype("float32")], weight_bits=4)
    with pytest.raises(relayq.UnsupportedOpError, match=r"'cos'.*weird|'relax.cos'.*weird"):
        relayq.finetune(q, [rng.randn(1, 3, 6, 6).astype("float32")])


def test_op_table_matches_relax():
    """Float ops beyond tiny_cnn's (pad, permute, squeeze, expand_dims, mean, softmax, sigmoid, asymmetric
    pooling padding, grouped conv with asymmetric padding): the twin computes what TVM computes."""
    from relayq.training import build_torch_graph

    rng = np.random.RandomState(0)
    w = rng.randn(6, 2, 3, 3).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4, 7, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 1, 0, 2, 1], pad_value=0.5))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(w), padding=(0, 1, 1, 0), groups=2, strides=(2, 2)))
            y = bb.emit(relax.op.sigmoid(y))
            y = bb.emit(relax.op.nn.max_pool2d(y, (2, 2), (1, 1), padding=(0, 0, 1, 1)))
            y = bb.emit(relax.op.nn.avg_pool2d(y, (3, 3), (2, 2), padding=(1, 1), count_include_pad=True))
            m = bb.emit(relax.op.mean(y, axis=[2, 3], keepdims=False))
            m = bb.emit(relax.op.expand_dims(m, 1))
            m = bb.emit(relax.op.permute_dims(m, [0, 2, 1]))
            m = bb.emit(relax.op.squeeze(m, [2]))
            out = bb.emit_output(relax.op.nn.softmax(relax.op.multiply(m, relax.const(np.float32(3.0))), axis=-1))
        bb.emit_func_output(out)
    mod = bb.get()
    a = rng.randn(2, 4, 7, 7).astype("float32")
    twin = build_torch_graph(mod, {}, quantize=False)
    with torch.no_grad():
        got = twin(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, compile_host(mod)(a)[0], rtol=1e-5, atol=1e-6)


def test_frozen_weights_train_biases_and_scales_only(tiny, q48):
    mod, params, train, held, calib = tiny
    qf = relayq.finetune(q48, train, steps=3, lr=1e-3, learn_weights=False, show_progress=False)
    from relayq.transform.common import bindings, const_value, simq_info

    def weights(q):
        return {i[1]: const_value(i[0]) for b in bindings(q.annotated["main"])
                if (i := simq_info(b.value)) is not None and i[2] == "weight"}
    before, after = weights(q48), weights(qf)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert any(qf.qpoints[n].scale != p.scale for n, p in q48.qpoints.items() if p.role == "act")


def _feature_error(q, held):
    """Mean relative squared error, over activation points and held-out batches, between the quantized
    twin's activations and the float model's (the quantity feature_weight trains down)."""
    from relayq.training import build_torch_graph
    from relayq.training.finetune import _feature_loss, _float_vars

    student = build_torch_graph(q.annotated, q.qpoints)
    teacher = build_torch_graph(q.prepared, q.qpoints, quantize=False)
    in_teacher = _float_vars(q.annotated, q.prepared)
    pairs = [(m, in_teacher[x]) for m, x in student.act_points.values()]
    with torch.no_grad():
        errs = []
        for x in held:
            _, s = student(torch.from_numpy(x), record={m for m, _ in pairs})
            _, t = teacher(torch.from_numpy(x), record={i for _, i in pairs})
            errs.append(float(_feature_loss(s, t, pairs)))
    return float(np.mean(errs))


def test_feature_loss_matches_every_activation_point_and_lowers_its_error(tiny):
    """feature_weight pairs every activation point of the quantized graph with the float activation of the
    same name, and training on it lowers the held-out feature error more than logit distillation alone."""
    mod, params, train, held, calib = tiny
    q = _quantize(mod, params, calib, weight_bits=4, act_bits=4, act_symmetric=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        qf = relayq.finetune(q, train, steps=16, lr=2e-3, distill="kl", temperature=2.0, feature_weight=10.0)
    n_act = sum(p.role == "act" for p in q.qpoints.values())
    assert f"features x10 at {n_act} points" in qf.training["loss"] and "T=2" in qf.training["loss"]
    plain = relayq.finetune(q, train, steps=16, lr=2e-3, distill="kl", temperature=2.0, show_progress=False)
    before, with_features, without = _feature_error(q, held), _feature_error(qf, held), _feature_error(plain, held)
    # Measured: 0.079 before, 0.057 with the feature loss, 0.064 without it.
    assert with_features < 0.8 * before and with_features < 0.95 * without, (before, with_features, without)
    # Still bit-exact after training on the extra loss.
    x = held[0]
    np.testing.assert_array_equal(relayq.build(qf)(x), reference_run(qf.annotated, qf.qpoints, x))


def test_bias_lr_trains_biases_while_weights_barely_move(tiny, q48):
    mod, params, train, held, calib = tiny
    from relayq.training import build_torch_graph

    qf = relayq.finetune(q48, train, steps=4, lr=1e-9, bias_lr=1e-2, show_progress=False)
    a, b = build_torch_graph(q48.annotated, q48.qpoints), build_torch_graph(qf.annotated, qf.qpoints)
    w_moved = max(float((a.weights[k] - b.weights[k]).detach().abs().max()) for k in a.weights)
    b_moved = max(float((a.biases[k] - b.biases[k]).detach().abs().max()) for k in a.biases)
    assert w_moved < 1e-6 < 1e-3 < b_moved, (w_moved, b_moved)


def test_new_options_are_checked(tiny, q48):
    mod, params, train, held, calib = tiny
    with pytest.raises(relayq.ConfigError, match="temperature"):
        relayq.finetune(q48, train, distill="mse", temperature=2.0)
    with pytest.raises(relayq.ConfigError, match="temperature must be a positive"):
        relayq.finetune(q48, train, distill="kl", temperature=0.0)
    with pytest.raises(relayq.ConfigError, match="feature_weight must be"):
        relayq.finetune(q48, train, feature_weight=-1.0)
    with pytest.raises(relayq.ConfigError, match="feature_weight.*user teacher"):
        relayq.finetune(q48, train, feature_weight=1.0, teacher=lambda x: x)
    with pytest.raises(relayq.ConfigError, match="bias_lr"):
        relayq.finetune(q48, train, bias_lr=float("nan"))


@pytest.mark.parametrize("batch, match", [
    (np.full((4, 3, 8, 8), np.nan, "float32"), r"batch 0: input 'data' contains NaN or Inf \(768 of 768"),
    (np.zeros((4, 3, 8, 8), "uint8"), r"batch 0: input 'data' has dtype uint8, the model expects float32"),
    ({"x": np.zeros((4, 3, 8, 8), "float32")}, r"batch 0: input names \['x'\] do not match .*'data'"),
], ids=["nan", "uint8-pixels", "wrong-name"])
def test_batches_are_checked_like_calibration_batches(tiny, q48, batch, match):
    """Training batches go through runtime.batch_to_arrays (free batch size), as calibration batches do: a
    NaN batch is named as bad input (not reported later as a diverged loss) and raw uint8 pixels are refused."""
    with pytest.raises(relayq.DatasetError, match=match):
        relayq.finetune(q48, [batch], show_progress=False)


def test_any_input_size_trains_on_smaller_views(tiny, q48):
    """A fully convolutional part plus global pooling: 6x6 training views are refused by default (the
    model is 8x8) and accepted with any_input_size; the channel count is still checked."""
    small = [np.random.RandomState(5).randn(4, 3, 6, 6).astype("float32")]
    with pytest.raises(relayq.DatasetError, match=r"shape \(4, 3, 6, 6\), the model expects \(any batch, 3, 8, 8\)"):
        relayq.finetune(q48, small, show_progress=False)
    qf = relayq.finetune(q48, small, steps=2, any_input_size=True, show_progress=False)
    assert qf.training["steps"] == 2
    with pytest.raises(relayq.DatasetError, match=r"shape \(4, 2, 6, 6\)"):
        relayq.finetune(q48, [small[0][:, :2]], any_input_size=True, show_progress=False)
