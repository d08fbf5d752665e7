"""Test helpers: tiny models built in Relax, and a digits CNN trained with torch."""
import numpy as np
import tvm
from tvm import relax

#: Batch size of the digits model: 360 test images split into 9 batches.
DIGITS_BATCH = 40


def digits_split(seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[:, None]
    y = d.target.astype("int64")
    idx = np.random.RandomState(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    n_test = 360
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def make_digits_net():
    import torch
    import torch.nn as nn

    class DigitsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.bn0 = nn.BatchNorm2d(16)
            self.c1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.c2 = nn.Conv2d(16, 16, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(16)
            self.b1 = nn.Conv2d(16, 8, 1)
            self.b2 = nn.Conv2d(16, 8, 3, padding=1)
            self.fc = nn.Linear(16 * 2 * 2, 10)

        def forward(self, x):
            s = torch.relu(self.bn0(self.stem(x)))
            r = torch.relu(self.bn1(self.c1(s)))
            r = self.bn2(self.c2(r))
            s = torch.relu(r + s)
            s = torch.cat([torch.relu(self.b1(s)), torch.relu(self.b2(s))], dim=1)
            s = torch.nn.functional.max_pool2d(s, 2)
            s = torch.nn.functional.avg_pool2d(s, 2)
            return self.fc(torch.flatten(s, 1))

    return DigitsNet()


def train_digits_cnn(x_train, y_train, x_test, y_test, epochs=12, seed=0):
    """Train the digits net; returns dict(net, fp32_acc, mod, params)."""
    import torch

    torch.manual_seed(seed)
    net = make_digits_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    rng = np.random.RandomState(seed)
    for _ in range(epochs):
        net.train()
        perm = rng.permutation(len(xt))
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[b]), yt[b])
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(x_test)).numpy()
    from relayq.frontend import from_torch

    mod, params = from_torch(net, (torch.from_numpy(x_test[:DIGITS_BATCH]),))
    return {"net": net, "fp32_logits": logits, "fp32_acc": float((logits.argmax(1) == y_test).mean()),
            "mod": mod, "params": params}


def batches(x, size=DIGITS_BATCH):
    return [x[i:i + size] for i in range(0, len(x) - size + 1, size)]


def run_batched(fn, x, size=DIGITS_BATCH):
    return np.concatenate([fn(b) for b in batches(x, size)])


def tiny_cnn(seed=0, n=2):
    """A Relax module + params: conv(+bias)+BN+relu, residual add, concat, max/avg/global pool, dense."""
    rng = np.random.RandomState(seed)
    p = {
        "w0": rng.randn(8, 3, 3, 3).astype("float32") * 0.3, "b0": rng.randn(8).astype("float32") * 0.1,
        "g": (rng.rand(8) + 0.5).astype("float32"), "be": rng.randn(8).astype("float32") * 0.1,
        "mu": rng.randn(8).astype("float32") * 0.1, "var": (rng.rand(8) + 0.5).astype("float32"),
        "w1": rng.randn(8, 8, 3, 3).astype("float32") * 0.2, "w2": rng.randn(4, 8, 1, 1).astype("float32") * 0.3,
        "wd": rng.randn(8, 1, 3, 3).astype("float32") * 0.3,
        "fc": rng.randn(10, 12 * 2 * 2).astype("float32") * 0.2, "fcb": rng.randn(10).astype("float32") * 0.1,
    }
    bb = relax.BlockBuilder()
    x = relax.Var("data", relax.TensorType((n, 3, 8, 8), "float32"))
    vs = {k: relax.Var(k, relax.TensorType(v.shape, "float32")) for k, v in p.items()}
    with bb.function("main", [x] + list(vs.values())):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, vs["w0"], padding=(1, 1)))
            y = bb.emit(relax.op.add(y, relax.op.reshape(vs["b0"], (1, 8, 1, 1))))
            y = bb.emit(relax.op.nn.batch_norm(y, vs["g"], vs["be"], vs["mu"], vs["var"], axis=1, training=False))
            y = bb.emit(relax.TupleGetItem(y, 0))
            s = bb.emit(relax.op.nn.relu(y))
            r = bb.emit(relax.op.nn.conv2d(s, vs["w1"], padding=(1, 1)))
            s = bb.emit(relax.op.nn.relu(relax.op.add(r, s)))
            d = bb.emit(relax.op.nn.conv2d(s, vs["wd"], padding=(1, 1), groups=8))
            d = bb.emit(relax.op.clip(d, 0.0, 6.0))
            br = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(s, vs["w2"])))
            c = bb.emit(relax.op.concat([d, br], axis=1))
            c = bb.emit(relax.op.nn.max_pool2d(c, (2, 2), (2, 2)))
            c = bb.emit(relax.op.nn.avg_pool2d(c, (3, 3), (2, 2), padding=(1, 1)))
            f = bb.emit(relax.op.reshape(c, (n, 48)))
            f = bb.emit(relax.op.linear(f, vs["fc"], vs["fcb"]))
            out = bb.emit_output(f)
        bb.emit_func_output(out)
    return bb.get(), p


def float_reference(mod, params, x):
    """Run a float module with TVM on the host."""
    import relayq

    return relayq.build(mod, params=params)(x)


def assert_three_ways(q, lib, sim, x):
    """The compiled integer model ``lib``, the qmath reference and the simulated module ``sim`` of the
    QuantizedModel ``q`` give the same output on ``x``, bit for bit. Returns that output."""
    from relayq.analysis.reference import reference_run

    y = lib(x)
    np.testing.assert_array_equal(y, reference_run(q.annotated, q.qpoints, x))
    np.testing.assert_array_equal(sim(x)[0], y)
    return y


def conv2d_nchw(x, w, strides, padding, groups):
    """A direct float64 conv2d, NCHW / OIHW, zero ``padding`` (top, left, bottom, right), tap by tap: the
    reference for what relayq computes about convs (bias correction).

    >>> conv2d_nchw(np.ones((1, 1, 2, 2)), np.ones((1, 1, 3, 3)), (1, 1), (1, 1, 1, 1), 1)[0, 0].tolist()
    [[4.0, 4.0], [4.0, 4.0]]
    """
    (sh, sw), (pt, pl, pb, pr) = strides, padding
    x = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (pt, pb), (pl, pr)])
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = (h - kh) // sh + 1, (wd - kw) // sw + 1
    xg = x.reshape(n, groups, cg, h, wd)
    wg = w.astype(np.float64).reshape(groups, o // groups, cg, kh, kw)
    y = np.zeros((n, groups, o // groups, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = xg[:, :, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            y += np.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, i, j])
    return y.reshape(n, o, oh, ow)
