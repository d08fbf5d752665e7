"""Bad calibration datasets must be a DatasetError naming the batch index and the input; datasets a user
would expect to work must work (issue 8, items 7 and 9)."""
import warnings

import numpy as np
import pytest
import tvm
from tvm import relax

import relayq
from relayq.errors import DatasetError

RNG = np.random.RandomState(0)
W = (RNG.randn(3, 4) * 0.5).astype("float32")
B = (RNG.randn(3) * 0.1).astype("float32")


def _dense_model(extra_inputs=()):
    """main(x: (2, 4)[, y: (2, 4)][, s: ()]) -> relu(x @ W.T + b) (+ the same on y) (* s)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    extra = [relax.Var(n, relax.TensorType(shape, "float32")) for n, shape in extra_inputs]
    w = relax.Var("w", relax.TensorType((3, 4), "float32"))
    b = relax.Var("b", relax.TensorType((3,), "float32"))
    with bb.function("main", [x] + extra + [w, b]):
        with bb.dataflow():
            out = bb.emit(relax.op.nn.relu(relax.op.linear(x, w, b)))
            for v in extra:
                if v.name == "y":
                    out = bb.emit(relax.op.add(out, relax.op.nn.relu(relax.op.linear(v, w, b))))
                else:
                    out = bb.emit(relax.op.multiply(out, v))
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get(), {"w": W, "b": B}


ONE = _dense_model()
TWO = _dense_model([("y", (2, 4))])
SCALAR = _dense_model([("s", ())])


def _x(seed=1, shape=(2, 4), dtype="float32"):
    return np.random.RandomState(seed).randn(*shape).astype(dtype)


def _quantize(dataset, model=ONE, calibration="naive"):
    mod, params = model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return relayq.quantize_model(mod, params, dataset, calibration, {"show_progress": False})


def _fails(dataset, *culprits, model=ONE):
    with pytest.raises(DatasetError) as e:
        _quantize(dataset, model)
    msg = str(e.value)
    assert all(c in msg for c in culprits), msg
    return e.value


def _input_threshold(q):
    return q.qpoints["dense_0:in0"].threshold


# --- the dataset object itself ------------------------------------------------------------------------

@pytest.mark.parametrize("dataset,culprits", [
    (42, ["iterable", "int"]),
    (None, ["dataset is required"]),
    ("calib.npy", ["str", "'calib.npy'"]),
    (b"\x00\x01", ["bytes"]),
    ({0: _x(), 1: _x(2)}, ["dict", "[0, 1]", "list of batches"]),
    ({}, ["dict", "list of batches"]),
    ([], ["empty"]),
    ((), ["empty"]),
    (iter([]), ["empty"]),
    (3.5, ["iterable", "float"]),
])
def test_bad_dataset_object(dataset, culprits):
    _fails(dataset, *culprits)


def test_dict_dataset_is_one_batch():
    x = _x()
    q = _quantize({"x": x})
    assert _input_threshold(q) == pytest.approx(float(np.abs(x).max()))


def test_array_dataset_is_one_batch():
    x = _x()
    assert _input_threshold(_quantize(x)) == pytest.approx(float(np.abs(x).max()))


def test_generator_is_read_once():
    seen = []

    def gen():
        for i in range(3):
            seen.append(i)
            yield _x(i)

    q = _quantize(gen())
    assert seen == [0, 1, 2]
    assert _input_threshold(q) == pytest.approx(max(float(np.abs(_x(i)).max()) for i in range(3)))


@pytest.mark.parametrize("fail_at", [0, 2])
def test_iterator_raising_midway(fail_at):
    def gen():
        for i in range(4):
            if i == fail_at:
                raise OSError("disk unplugged")
            yield _x(i)

    err = _fails(gen(), f"batch {fail_at}", "OSError", "disk unplugged")
    assert isinstance(err.__cause__, OSError)


# --- one batch ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset,culprits", [
    ([None], ["batch 0", "None"]),
    ([_x(), None], ["batch 1", "None"]),
    ([_x(), _x(shape=(3, 4))], ["batch 1", "'x'", "(3, 4)", "(2, 4)", "batch size 2"]),
    ([_x(shape=(2, 5))], ["batch 0", "'x'", "(2, 5)"]),
    ([_x(shape=(0, 4))], ["batch 0", "'x'", "empty batch"]),
    ([np.ones((2, 4), "int64")], ["batch 0", "'x'", "int64", "float32"]),
    ([_x(), np.ones((2, 4), bool)], ["batch 1", "'x'", "bool"]),
    ([np.where(_x() > 0, np.nan, _x())], ["batch 0", "'x'", "NaN"]),
    ([_x(), _x(), np.full((2, 4), np.inf, "float32")], ["batch 2", "'x'", "Inf"]),
    (["abc"], ["batch 0", "str"]),
    ([np.array([["a"] * 4] * 2)], ["batch 0", "'x'", "not numeric"]),
    ([[_x(), _x(2)]], ["batch 0", "list of 2 items", "one input 'x'"]),
    ([{"x": _x(), "z": _x()}], ["batch 0", "unknown: ['z']"]),
])
def test_bad_batch(dataset, culprits):
    _fails(dataset, *culprits)


@pytest.mark.parametrize("batch,culprits", [
    ({"x": _x()}, ["batch 0", "missing: ['y']"]),
    ((_x(),), ["batch 0", "got 1 arrays", "'y'"]),
    (_x(), ["batch 0", "bare array", "['x', 'y']"]),
    ({"x": _x(), "y": _x(shape=(2, 3))}, ["batch 0", "'y'", "(2, 3)"]),
    ({"x": _x(), "y": None}, ["batch 0", "'y'", "None"]),
])
def test_bad_batch_two_inputs(batch, culprits):
    _fails([batch], *culprits, model=TWO)


@pytest.mark.parametrize("make", [
    lambda x: [x.astype("float64")],                 # float64 is cast
    lambda x: [[x]],                                 # a 1-list for a one-input model
    lambda x: [(x,)],
    lambda x: [{"x": x}],
    lambda x: [x.tolist()],                          # nested lists of numbers
    lambda x: [np.asfortranarray(x)],
])
def test_good_batch_forms(make):
    x = _x()
    assert _input_threshold(_quantize(make(x))) == pytest.approx(float(np.abs(x).max()))


@pytest.mark.parametrize("form", ["tensor", "requires_grad", "dataset_is_tensor"])
def test_torch_tensors(form):
    torch = pytest.importorskip("torch")
    x = _x()
    t = torch.from_numpy(x)
    if form == "requires_grad":
        t = t.clone().requires_grad_(True)
    dataset = t if form == "dataset_is_tensor" else [t]
    assert _input_threshold(_quantize(dataset)) == pytest.approx(float(np.abs(x).max()))


# --- rank-0 inputs work end to end --------------------------------------------------------------------

@pytest.mark.parametrize("scalar", [np.float32(2.0), np.array(2.0, "float32"), 2.0])
def test_rank0_input_end_to_end(scalar):
    x = _x()
    q = _quantize([{"x": x, "s": scalar}], model=SCALAR)
    assert "dense_0" in q.layers
    lib = relayq.build(q)
    got = lib(x=x, s=np.float32(2.0))
    want = np.maximum(x @ W.T + B, 0) * 2.0
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=0.1 * float(np.abs(want).max()))


def test_rank0_input_given_as_vector():
    _fails([{"x": _x(), "s": np.array([2.0], "float32")}], "batch 0", "'s'", "(1,)", "()", model=SCALAR)
