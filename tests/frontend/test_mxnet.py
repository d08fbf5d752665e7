"""The MXNet importer: the .params reader, float import vs MXNet's own outputs, INT8 through the public API.

The fixtures under ``fixtures/`` were written by MXNet 1.9.1 (``fixtures/make_mxnet_fixtures.py``, run in a
separate venv), so every test but ``test_live_mxnet_*`` runs without MXNet installed.
"""
import json
import os
import struct

import numpy as np
import pytest

import relayq
from relayq.errors import FrontendError, ModelError, UnsupportedOpError
from relayq.frontend import from_mxnet
from relayq.frontend.mxnet import load_params

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
SYMBOL = os.path.join(FIX, "resnet_block-symbol.json")
PARAMS = os.path.join(FIX, "resnet_block-0000.params")
SHAPE = (2, 3, 16, 16)


def _try_mxnet():
    try:
        if "bool" not in vars(np):
            np.bool = bool          # mxnet 1.9 uses the alias that numpy 1.24 removed
        import mxnet as mx
        return mx, None
    except Exception as e:          # ImportError, or a broken install against this numpy
        return None, f"{type(e).__name__}: {e}"


@pytest.fixture(scope="module")
def ref():
    return np.load(os.path.join(FIX, "resnet_block_ref.npz"))


@pytest.fixture(scope="module")
def imported():
    return from_mxnet(SYMBOL, PARAMS, shapes={"data": SHAPE})


@pytest.fixture(scope="module")
def float_lib(imported):
    mod, params = imported
    return relayq.build(mod, params=params)


# ------------------------------------------------------------------ (1) the .params reader

def test_params_reader_checkpoint():
    p = load_params(PARAMS)
    assert len(p) == 28
    assert all(k.startswith(("arg:", "aux:")) for k in p)
    aux = sorted(k for k in p if k.startswith("aux:"))
    assert aux == sorted(f"aux:{layer}_bn_{s}" for layer in ("stem", "res_a", "res_b", "head")
                         for s in ("moving_mean", "moving_var"))
    assert p["arg:stem_weight"].shape == (8, 3, 3, 3)
    assert p["arg:br2_dw_weight"].shape == (8, 1, 3, 3)
    assert p["arg:head_weight"].shape == (16, 16, 3, 3)
    assert p["arg:fc_weight"].shape == (10, 16) and p["arg:fc_bias"].shape == (10,)
    assert "arg:res_a_bias" not in p        # no_bias convs have none
    assert all(v.dtype == np.float32 for v in p.values())
    # the BN statistics are the non-trivial ones the generator drew
    assert np.abs(p["aux:stem_bn_moving_mean"]).max() > 0.1
    var = p["aux:head_bn_moving_var"]
    assert var.min() >= 0.5 and var.max() <= 2.0 and var.std() > 0.1


def test_params_reader_dtypes_and_formats():
    want = np.load(os.path.join(FIX, "dtypes_ref.npz"))
    got = load_params(os.path.join(FIX, "dtypes.params"))            # legacy shape semantics (v2)
    assert sorted(got) == sorted(k for k in want.files if not k.startswith("np_"))
    for k, v in got.items():
        assert v.dtype == want[k].dtype and v.shape == want[k].shape, k
        np.testing.assert_array_equal(v, want[k])
    got = load_params(os.path.join(FIX, "dtypes_np.params"))         # numpy shape semantics (v3): 0-d, empty
    for k in ("scalar", "vec", "empty"):
        assert got[k].shape == want["np_" + k].shape and got[k].dtype == want["np_" + k].dtype
        np.testing.assert_array_equal(got[k], want["np_" + k])
    got = load_params(os.path.join(FIX, "list.params"))              # saved from a list: no names
    assert list(got) == ["0", "1"]
    np.testing.assert_array_equal(got["0"], want["f32"])
    np.testing.assert_array_equal(got["1"], want["i32"])


def test_params_reader_legacy_arrays(tmp_path):
    """The two oldest per-array layouts (no magic: rank + uint32 dims; v1: 0xF993FAC8 + int64 dims)."""
    a, b = np.arange(6, dtype="float32").reshape(2, 3), np.array([1.5, -2.0], "float64")
    blob = struct.pack("<QQQ", 0x112, 0, 2)
    blob += struct.pack("<I2I", 2, 2, 3) + struct.pack("<iii", 1, 0, 0) + a.tobytes()
    blob += struct.pack("<Iiq", 0xF993FAC8, 1, 2) + struct.pack("<iii", 1, 0, 1) + b.tobytes()
    blob += struct.pack("<Q", 2) + b"".join(struct.pack("<Q", len(n)) + n for n in (b"a", b"b"))
    path = tmp_path / "legacy.params"
    path.write_bytes(blob)
    got = load_params(path)
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)


# ------------------------------------------------------------------ (2) float import vs MXNet

def test_float_import_matches_mxnet(imported, float_lib, ref):
    mod, params = imported
    main = mod["main"]
    assert [p.name for p in main.params][0] == "data"
    assert sorted(params) == sorted(p.name for p in main.params[1:])
    assert "res_b_bn_gamma" not in params       # fix_gamma=True: gamma is 1, the saved value is unused
    assert all(v.dtype == np.float32 for v in params.values())
    script = mod.script()
    for op in ("R.nn.conv2d", "R.nn.batch_norm", "R.matmul", "R.permute_dims", "R.concat", "R.nn.max_pool2d",
               "R.nn.avg_pool2d", "R.nn.adaptive_avg_pool2d", "R.nn.softmax"):
        assert op in script, op
    y = float_lib(ref["x"])
    assert y.shape == ref["y"].shape == (2, 10)
    err = float(np.abs(y - ref["y"]).max())
    assert err < 1e-4, f"max abs error vs MXNet {err}"


def test_prepare_folds_all_batch_norms(imported):
    mod, params = imported
    prepared = relayq.transform.prepare(mod, params)
    script = prepared.script()
    assert "batch_norm" not in script
    assert script.count("R.nn.conv2d") == 6


def test_params_forms_are_equivalent(imported, ref, float_lib):
    """A checkpoint path, (arg, aux) dicts with or without prefixes, and a JSON string all import the same."""
    p = load_params(PARAMS)
    arg = {k[4:]: v for k, v in p.items() if k.startswith("arg:")}
    aux = {k: v for k, v in p.items() if k.startswith("aux:")}          # prefixes are accepted too
    with open(SYMBOL) as f:
        text = f.read()
    mod, params = from_mxnet(text, arg, aux, shapes={"data": SHAPE})
    assert sorted(params) == sorted(imported[1])
    for k, v in params.items():
        np.testing.assert_array_equal(v, imported[1][k])
    assert mod.script() == imported[0].script()


@pytest.mark.parametrize("case", sorted({k.split("/")[0] for k in np.load(os.path.join(FIX, "mxnet_ops.npz")).files}))
def test_op_edge_cases_match_mxnet(case):
    """Pooling conventions/padding, grouped+dilated conv, FC without flatten, softmax axes, activations ..."""
    ops = np.load(os.path.join(FIX, "mxnet_ops.npz"))
    params = {k.split("/", 2)[2]: ops[k] for k in ops.files if k.startswith(case + "/param/")}
    x, want = ops[case + "/x"], ops[case + "/y"]
    mod, p = from_mxnet(str(ops[case + "/symbol"]), params, shapes={"x": x.shape})
    got = relayq.build(mod, params=p)(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ (3) INT8 through quantize_model

def _centered_log(p):
    """Log-probabilities minus their per-sample mean: the logits, up to the shift softmax ignores."""
    lp = np.log(np.maximum(p, 1e-30))
    return lp - lp.mean(axis=1, keepdims=True)


def test_quantize_model_int8_agrees_with_float(float_lib):
    """``quantize_model`` on the MXNet JSON path + (arg, aux) dicts, then INT8 vs float on unseen data.

    The model ends in SoftmaxOutput and, with random weights, puts most inputs in one class, so top-1
    agreement alone would be a weak check. The bound is on the logits instead (recovered as centered
    log-probabilities): per-sample cosine similarity >= 0.99 and relative L2 error <= 0.1. 8-bit
    per-tensor quantization of this 7-layer net gives about 2 % relative error (cosine > 0.999); a wrong
    BatchNorm fold, a lost bias or a mis-scaled layer moves the logits by far more than 10 %.
    """
    p = load_params(PARAMS)
    arg = {k[4:]: v for k, v in p.items() if k.startswith("arg:")}
    aux = {k[4:]: v for k, v in p.items() if k.startswith("aux:")}
    rng = np.random.RandomState(1)
    calib = [rng.randn(*SHAPE).astype("float32") for _ in range(8)]
    test = [rng.randn(*SHAPE).astype("float32") for _ in range(8)]
    with pytest.warns(relayq.errors.FloatFallbackWarning, match="softmax"):
        q = relayq.quantize_model(SYMBOL, (arg, aux), calib, "naive", relayq.QConfig(show_progress=False),
                                  shapes={"data": SHAPE})
    kinds = list(q.layers.values())
    assert kinds.count("conv2d") == 6 and kinds.count("dense") == 1, q.layers
    lib = relayq.build(q)
    yq = np.concatenate([lib(x) for x in test])
    yf = np.concatenate([float_lib(x) for x in test])
    assert (yq.argmax(1) == yf.argmax(1)).mean() >= 0.9
    lq, lf = _centered_log(yq), _centered_log(yf)
    cos = (lq * lf).sum(1) / (np.linalg.norm(lq, axis=1) * np.linalg.norm(lf, axis=1))
    rel = np.linalg.norm(lq - lf) / np.linalg.norm(lf)
    assert cos.min() >= 0.99, cos
    assert rel <= 0.1, rel


def test_quantize_model_accepts_checkpoint_path():
    rng = np.random.RandomState(2)
    calib = [rng.randn(*SHAPE).astype("float32") for _ in range(2)]
    with pytest.warns(relayq.errors.FloatFallbackWarning):
        q = relayq.quantize_model(SYMBOL, PARAMS, calib, "naive", relayq.QConfig(show_progress=False),
                                  shapes={"data": SHAPE})
    assert list(q.layers.values()).count("conv2d") == 6


# ------------------------------------------------------------------ (4) live MXNet (skipped without it)

def test_live_mxnet_symbol_and_ndarrays(tmp_path):
    mx, why = _try_mxnet()
    if mx is None:
        pytest.skip(f"mxnet is not importable here ({why}); the fixtures cover the same model offline")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_mxnet_fixtures", os.path.join(FIX, "make_mxnet_fixtures.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rng = np.random.RandomState(7)
    sym = gen.resnet_block()
    args, auxs = gen.random_params(sym, {"data": SHAPE}, rng)
    x = rng.randn(*SHAPE).astype("float32")
    want = gen.run(sym, args, auxs, {"data": x})
    mod, params = from_mxnet(sym, args, auxs, shapes={"data": SHAPE})       # Symbol + NDArray dicts
    got = relayq.build(mod, params=params)(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    prefix = str(tmp_path / "live")
    mx.model.save_checkpoint(prefix, 3, sym, args, auxs)
    loaded = load_params(prefix + "-0003.params")
    for k, v in {**{"arg:" + k: v for k, v in args.items()}, **{"aux:" + k: v for k, v in auxs.items()}}.items():
        np.testing.assert_array_equal(loaded[k], v.asnumpy())


# ------------------------------------------------------------------ (5) bad inputs

def test_unknown_op_names_op_and_node():
    with open(SYMBOL) as f:
        graph = json.load(f)
    node = next(n for n in graph["nodes"] if n["name"] == "flat")
    node["op"] = "FancyReshape"
    with pytest.raises(UnsupportedOpError, match="FancyReshape.*flat"):
        from_mxnet(json.dumps(graph), PARAMS, shapes={"data": SHAPE})


def test_missing_input_shape_names_input():
    with pytest.raises(FrontendError, match="'data'"):
        from_mxnet(SYMBOL, PARAMS)
    with pytest.raises(FrontendError, match="'images'"):
        from_mxnet(SYMBOL, PARAMS, shapes={"data": SHAPE, "images": (1, 3, 8, 8)})


def test_missing_weight_names_it():
    p = load_params(PARAMS)
    del p["arg:head_weight"]
    with pytest.raises(ModelError, match="head_weight.*Convolution"):
        from_mxnet(SYMBOL, p, shapes={"data": SHAPE})
    p = load_params(PARAMS)
    del p["aux:stem_bn_moving_var"]
    with pytest.raises(ModelError, match="stem_bn_moving_var"):
        from_mxnet(SYMBOL, p, shapes={"data": SHAPE})


def test_wrong_weight_shape_names_it():
    p = load_params(PARAMS)
    p["arg:fc_weight"] = np.zeros((10, 17), "float32")
    with pytest.raises(ModelError, match="fc_weight"):
        from_mxnet(SYMBOL, p, shapes={"data": SHAPE})


@pytest.mark.parametrize("keep", [0, 12, 40, 1000, -3])
def test_truncated_params_file(tmp_path, keep):
    with open(PARAMS, "rb") as f:
        data = f.read()
    path = tmp_path / "cut.params"
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(FrontendError, match="truncated|corrupt"):
        load_params(path)
    with pytest.raises(FrontendError):
        from_mxnet(SYMBOL, str(path), shapes={"data": SHAPE})


def test_not_a_params_or_symbol_file(tmp_path):
    bad = tmp_path / "bad.params"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(FrontendError, match="not an MXNet .params file"):
        load_params(bad)
    with pytest.raises(FrontendError, match="not found"):
        load_params(tmp_path / "nope.params")
    with pytest.raises(FrontendError, match="not found"):
        from_mxnet(str(tmp_path / "nope-symbol.json"), shapes={"data": SHAPE})
    with pytest.raises(FrontendError, match="JSON"):
        from_mxnet('{"nodes": [', shapes={"data": SHAPE})
