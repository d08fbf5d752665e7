"""Small Relax models with several outputs (tuple results), for the multi-output calibration tests.

One graph, ``x -> conv_a -> relu -> conv_b -> relu -> pool -> dense -> logits`` plus a side branch
``a -> conv_c`` (a 1x1 conv with 4 channels), returns any selection of its values. Every selection
has the same quantization points, so a model with several outputs can be compared point by point
with the same graph returning one of them.
"""
import numpy as np
from tvm import relax

#: Input shape of :func:`multi_output_net`.
INPUT_SHAPE = (2, 3, 8, 8)
#: Values a model may return: name -> shape.
VALUES = {"a": (2, 8, 8, 8), "b": (2, 8, 8, 8), "side": (2, 4, 8, 8), "logits": (2, 10), "x": INPUT_SHAPE}


def net_params(seed=0):
    rng = np.random.RandomState(seed)
    return {
        "wa": rng.randn(8, 3, 3, 3).astype("float32") * 0.3, "ba": rng.randn(8).astype("float32") * 0.1,
        "wb": rng.randn(8, 8, 3, 3).astype("float32") * 0.2,
        "wc": rng.randn(4, 8, 1, 1).astype("float32") * 0.4,
        "fc": rng.randn(10, 8 * 4 * 4).astype("float32") * 0.2, "fcb": rng.randn(10).astype("float32") * 0.1,
    }


def multi_output_net(outputs=("logits",), seed=0):
    """``(IRModule, params)`` returning ``outputs`` (names of :data:`VALUES`): a tensor for one name,
    a tuple for several. ``"x"`` is the graph input passed through; ``"a"`` and ``"b"`` are also read
    by later layers."""
    p = net_params(seed)
    bb = relax.BlockBuilder()
    x = relax.Var("data", relax.TensorType(INPUT_SHAPE, "float32"))
    vs = {k: relax.Var(k, relax.TensorType(v.shape, "float32")) for k, v in p.items()}
    n = INPUT_SHAPE[0]
    with bb.function("main", [x] + list(vs.values())):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, vs["wa"], padding=(1, 1)))
            a = bb.emit(relax.op.add(a, relax.op.reshape(vs["ba"], (1, 8, 1, 1))))
            a = bb.emit(relax.op.nn.relu(a))
            b = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(a, vs["wb"], padding=(1, 1))))
            side = bb.emit(relax.op.nn.conv2d(a, vs["wc"]))
            f = bb.emit(relax.op.nn.max_pool2d(b, (2, 2), (2, 2)))
            f = bb.emit(relax.op.reshape(f, (n, 8 * 4 * 4)))
            logits = bb.emit(relax.op.linear(f, vs["fc"], vs["fcb"]))
            vals = {"a": a, "b": b, "side": side, "logits": logits, "x": x}
            if len(outputs) == 1:
                out = bb.emit_output(vals[outputs[0]])
            else:
                out = bb.emit_output(relax.Tuple([vals[o] for o in outputs]))
        bb.emit_func_output(out)
    return bb.get(), p


def calib_data(n_batches=4, seed=1):
    rng = np.random.RandomState(seed)
    return [rng.randn(*INPUT_SHAPE).astype("float32") for _ in range(n_batches)]
