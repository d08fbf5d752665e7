"""AdaRound: learned rounding of weights (Nagel et al. 2020; white paper 2021, section 4.4).

Rounding every weight to nearest minimizes each weight's own error, not the layer's output error.
AdaRound learns, per weight, whether to round down or up: the soft weight is
``W~ = s * clip(floor(W / s) + h(V), qmin, qmax)`` with the rectified sigmoid
``h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)``, and ``V`` minimizes

    || W x - W~ x~ ||^2  (summed over output channels, averaged over samples)
    + REG_WEIGHT * sum(1 - |2 h(V) - 1|^beta)

where ``x`` are the layer's float inputs on calibration data and ``x~`` the inputs of the quantized
layer at the same positions. The regularizer is off for the first ``WARMUP`` fraction of the
iterations, then ``beta`` decays from ``BETA_START`` to ``BETA_END``, pushing every ``h`` to 0 or 1.
Finally the codes are ``floor(W / s) + (V >= 0)``, clipped.

The loss compares the float layer on float inputs with the quantized layer on the inputs ``x~``
the caller gives (``relayq.transform.rounding`` passes the partly quantized model's inputs: the
asymmetric reconstruction of the white paper). With ``clip`` the layer's bias and ReLU / ReLU6 are
in the loss (errors the activation clips away do not count); without it the output is taken before
the bias (which then cancels). Each step uses ``batch`` samples drawn at random from the pool, so that
thousands of steps fit on a CPU.

Two implementations of the same loop: torch autograd when torch is installed (its Adam and batched
matmuls; about 1-3 ms per iteration on a 1024-sample layer on 2 cores), else numpy with the gradient
written out (several times slower on large layers). This module is pure numerics: it knows nothing of
the graph (``relayq.transform.rounding`` feeds it).

Example::

    codes, info = round_layer(w3, s3, -7, 7, x, xq, iterations=1000)
"""
from __future__ import annotations

import numpy as np

#: The rectified sigmoid's stretch (the paper's zeta and gamma): h reaches exactly 0 and 1.
ZETA, GAMMA = 1.1, -0.1
#: Weight of the rounding regularizer against the reconstruction error (the paper's lambda).
REG_WEIGHT = 0.01
#: beta of the regularizer: high (flat, lets h move) at the start, low (sharp, forces 0/1) at the end.
BETA_START, BETA_END = 20.0, 2.0
#: Fraction of the iterations without the regularizer: reconstruction alone first.
WARMUP = 0.2
#: Adam's step for V. The papers use 1e-3 with 10-20k iterations; with relayq's default 1000
#: iterations a 10x larger step lets V (initialized within about +-2.4) cross zero where it should.
LEARNING_RATE = 1e-2


def torch_available() -> bool:
    """True when torch can be imported (AdaRound then uses it)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def beta_at(it: int, iterations: int):
    """The regularizer's beta at iteration ``it``, or None during the warm-up (no regularizer)."""
    start = int(WARMUP * iterations)
    if it < start:
        return None
    frac = (it - start) / max(iterations - start, 1)
    return BETA_END + (BETA_START - BETA_END) * (1.0 - frac)


class PatchSampler:
    """Collects random input samples of one conv2d / dense layer from the batches it is given.

    A conv2d sample is the input patch of one output pixel (im2col row), a dense sample one input row.
    ``data()`` returns them as ``(N, groups, K)`` with ``K = in_channels / groups * kh * kw``, in the
    order of the weight reshaped to ``(groups, out / groups, K)``.

    With ``batches`` known, every batch gives ``ceil(samples / batches)`` samples and the positions
    drawn are kept, so that :meth:`take` can cut the *same* patches out of another tensor of the same
    shape (the quantized model's input to the layer, for AdaRound's asymmetric reconstruction).
    """

    def __init__(self, kind: str, samples: int, batches: int | None = None, kernel=(1, 1), strides=(1, 1),
                 padding=(0, 0, 0, 0), dilation=(1, 1), groups: int = 1, seed: int = 0):
        self.kind, self.samples, self.groups = kind, int(samples), int(groups)
        self.kernel, self.strides, self.padding, self.dilation = kernel, strides, padding, dilation
        # Draw about samples / batches from each batch (more when the count is unknown), then keep a
        # random subset of ``samples`` at the end.
        self.per_batch = self.samples if not batches else max(1, -(-self.samples // int(batches)))
        self.keep_positions = bool(batches)
        self.rng = np.random.RandomState(seed)
        self.parts = []
        self.positions = []

    def __call__(self, x) -> None:
        x = np.asarray(x, dtype=np.float32)
        rows = self._rows(x)
        pick = self.rng.choice(len(rows), min(self.per_batch, len(rows)), replace=False)
        if self.keep_positions:
            self.positions.append(pick)
        self.parts.append(self._cut(x, pick))
        if not self.keep_positions and sum(len(p) for p in self.parts) > 4 * self.samples:
            self.parts = [self._subset(np.concatenate(self.parts), 2 * self.samples)]

    def take(self, x, batch_index: int) -> np.ndarray:
        """The samples of ``x`` at the positions drawn from batch ``batch_index``: ``(n, groups, K)``."""
        return self._cut(np.asarray(x, dtype=np.float32), self.positions[batch_index])

    def _rows(self, x):
        """A stand-in of the right length: one entry per output position of the batch."""
        if self.kind == "dense":
            return range(int(np.prod(x.shape[:-1])))
        return range(x.shape[0] * int(np.prod(self._out_hw(x))))

    def _out_hw(self, x):
        _, _, h, w = x.shape
        kh, kw = self.kernel
        (sh, sw), (dh, dw) = self.strides, self.dilation
        pt, pl, pb, pr = self.padding
        return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1

    def _cut(self, x, flat):
        if self.kind == "dense":
            return x.reshape(-1, x.shape[-1])[flat][:, None, :]
        kh, kw = self.kernel
        (sh, sw), (dh, dw) = self.strides, self.dilation
        pt, pl, pb, pr = self.padding
        oh, ow = self._out_hw(x)
        xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        m = len(flat)
        b, i, j = flat // (oh * ow), (flat // ow) % oh, flat % ow
        rows = i[:, None] * sh + np.repeat(np.arange(kh), kw)[None, :] * dh          # (m, kh*kw)
        cols = j[:, None] * sw + np.tile(np.arange(kw), kh)[None, :] * dw
        patches = xp[b[:, None], :, rows, cols]                                      # (m, kh*kw, C)
        patches = patches.transpose(0, 2, 1).reshape(m, self.groups, -1)             # (m, G, C/G*kh*kw)
        return np.ascontiguousarray(patches)

    def _subset(self, a, k):
        return a if len(a) <= k else a[np.sort(self.rng.choice(len(a), k, replace=False))]

    def data(self) -> np.ndarray:
        """The collected samples, ``(N, groups, K)`` float32 (all of them when the positions are kept)."""
        if self.keep_positions:
            return np.concatenate(self.parts)
        return self._subset(np.concatenate(self.parts), self.samples)


def _outputs(x, w3):
    return np.einsum("ngk,gok->ngo", x, w3, optimize=True)


def _activate(y, bias, clip):
    """The layer's output as the next layer sees it: ``clip(y + bias, lo, hi)`` (ReLU / ReLU6), or ``y``."""
    if clip is None:
        return y
    return np.clip(y + bias, clip[0], clip[1])


def output_mse(codes3, s3, x, target, bias=None, clip=None) -> float:
    """Mean over samples of the squared output error (summed over channels) of integer weights.

    ``target`` is the float layer's output (after ``bias`` and the ``clip`` activation when given).
    """
    return float(((_activate(_outputs(x, codes3 * s3), bias, clip) - target) ** 2).sum(axis=(1, 2)).mean())


def round_layer(w3, s3, qmin: int, qmax: int, x, xq=None, iterations: int = 1000, backend: str = "auto",
                seed: int = 0, batch: int | None = None, bias=None, clip=None,
                learning_rate: float = LEARNING_RATE):
    """Learn the rounding of one layer.

    ``w3``: float weights ``(groups, out / groups, K)``; ``s3``: their scale, broadcastable to ``w3``;
    ``x``: float input samples ``(N, groups, K)`` (the target is the float layer's output on them);
    ``xq``: the same samples as the quantized layer sees them (defaults to ``x``): with the quantized
    model's inputs this is the white paper's asymmetric reconstruction, the rounding then also makes up
    for the error of the layers before. ``clip = (lo, hi)`` with ``bias`` (broadcastable to
    ``(groups, out / groups)``) puts the layer's activation (ReLU: ``(0, inf)``, ReLU6: ``(0, 6)``) in
    the loss, as the paper does: errors that the activation clips away do not count. ``batch``: samples
    per optimization step, drawn at random from the ``N`` (all of them when None).

    Returns ``(codes3, info)`` with int64 codes in ``w3``'s shape and ``info`` = ``{"backend",
    "mse_nearest", "mse_adaround", "kept", "output_shift"}``; ``output_shift`` is the mean of
    ``W~ x~ - W x`` per output channel ``(groups, out / groups)`` with the returned codes (before the
    activation): the empirical bias correction. When the learned rounding does not beat rounding to
    nearest on the samples, the nearest codes are returned and ``kept`` is ``"nearest"``.

    Example::

        codes3, info = round_layer(w3, s3, -7, 7, x, xq, iterations=2000, batch=256, bias=b, clip=(0, 6))
    """
    w3 = np.asarray(w3, np.float64)
    s3 = np.broadcast_to(np.asarray(s3, np.float64), w3.shape)
    x = np.asarray(x, np.float32)
    xq = x if xq is None else np.asarray(xq, np.float32)
    if clip is not None:
        bias = np.zeros(w3.shape[:2]) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), w3.shape[:2])
        clip = (float(clip[0]), float(clip[1]))
    target = _activate(_outputs(x.astype(np.float64), w3), bias, clip)
    ws = w3 / s3
    floor = np.floor(ws)
    rest = np.clip(ws - floor, 0.0, 1.0)
    v0 = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)                    # h(v0) == rest
    batch = None if batch is None or batch >= len(x) else int(batch)
    if backend == "auto":
        backend = "torch" if torch_available() else "numpy"
    if backend == "torch":
        v = _optimize_torch(floor, s3, v0, qmin, qmax, xq, target, iterations, seed, batch, bias, clip,
                            learning_rate)
    elif backend == "numpy":
        v = _optimize_numpy(floor, s3, v0, qmin, qmax, xq, target, iterations, seed, batch, bias, clip,
                            learning_rate)
    else:
        raise ValueError(f"unknown AdaRound backend {backend!r} (torch, numpy, auto)")
    learned = np.clip(floor + (v >= 0), qmin, qmax).astype(np.int64)
    nearest = np.clip(np.round(ws), qmin, qmax).astype(np.int64)
    xq64 = xq.astype(np.float64)
    info = {"backend": backend, "mse_nearest": output_mse(nearest, s3, xq64, target, bias, clip),
            "mse_adaround": output_mse(learned, s3, xq64, target, bias, clip)}
    info["kept"] = "adaround" if info["mse_adaround"] <= info["mse_nearest"] else "nearest"
    codes = learned if info["kept"] == "adaround" else nearest
    info["output_shift"] = output_shift(codes, s3, w3, x, xq)
    return codes, info


def output_shift(codes3, s3, w3, x, xq) -> np.ndarray:
    """``E[W~ x~ - W x]`` over the samples, per output channel ``(groups, out / groups)``: the mean error
    of the quantized layer (codes ``codes3`` at scale ``s3``, on its quantized inputs ``xq``) against
    the float layer on the float inputs ``x``. Subtracted from the bias, it is the empirical bias
    correction.

    >>> float(output_shift(np.ones((1, 1, 2)), 0.5, np.ones((1, 1, 2)), np.ones((3, 1, 2)), np.ones((3, 1, 2)))[0, 0])
    -1.0
    """
    x64, xq64 = np.asarray(x, np.float64), np.asarray(xq, np.float64)
    return (_outputs(xq64, np.asarray(codes3, np.float64) * s3) - _outputs(x64, np.asarray(w3, np.float64))).mean(axis=0)


def _h(v):
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _optimize_torch(floor, s3, v0, qmin, qmax, xq, target, iterations, seed, batch, bias, clip, lr):
    import torch

    gen = torch.Generator().manual_seed(seed)
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    fl, s, x, t = f32(floor), f32(s3), f32(xq), f32(target)
    v = torch.nn.Parameter(f32(v0))
    opt = torch.optim.Adam([v], lr=lr)
    xg = x.permute(1, 0, 2)                                       # (G, N, K): one batched matmul
    tg = t.permute(1, 0, 2)
    bg = None if clip is None else f32(bias)[:, None, :]          # (G, 1, O/G)
    depthwise = fl.shape[1] == 1
    n = xg.shape[1]
    for it in range(iterations):
        if batch is not None:
            pick = torch.randint(0, n, (batch,), generator=gen)
            xb, tb = xg[:, pick], tg[:, pick]
        else:
            xb, tb = xg, tg
        h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        w = s * torch.clamp(fl + h, qmin, qmax)
        # Depthwise (one output per group): a broadcast product, far cheaper than G tiny matmuls.
        out = (xb * w).sum(-1, keepdim=True) if depthwise else torch.bmm(xb, w.transpose(1, 2))   # (G, B, O/G)
        if clip is not None:
            out = torch.clamp(out + bg, clip[0], clip[1])
        loss = (out - tb).pow(2).sum(dim=(0, 2)).mean()
        beta = beta_at(it, iterations)
        if beta is not None:
            loss = loss + REG_WEIGHT * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return v.detach().numpy().astype(np.float64)


def _optimize_numpy(floor, s3, v0, qmin, qmax, xq, target, iterations, seed, batch, bias, clip, lr):
    """The same loop as the torch one, the gradient written out, with Adam (torch's defaults)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    rng = np.random.RandomState(seed)
    v = v0.astype(np.float64).copy()
    m, u = np.zeros_like(v), np.zeros_like(v)
    xall = xq.astype(np.float64)
    for it in range(iterations):
        if batch is not None:
            pick = rng.randint(0, len(xall), batch)
            x, tgt = xall[pick], target[pick]
        else:
            x, tgt = xall, target
        n = x.shape[0]
        sig = 1.0 / (1.0 + np.exp(-v))
        raw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(raw, 0.0, 1.0)
        q = floor + h
        w = s3 * np.clip(q, qmin, qmax)
        y = _outputs(x, w)
        if clip is not None:
            pre = y + bias
            err = (np.clip(pre, clip[0], clip[1]) - tgt) * ((pre > clip[0]) & (pre < clip[1]))
        else:
            err = y - tgt                                                    # (N, G, O/G)
        gw = (2.0 / n) * np.einsum("ngo,ngk->gok", err, x, optimize=True)
        gh = gw * s3 * ((q >= qmin) & (q <= qmax))
        beta = beta_at(it, iterations)
        if beta is not None:
            d = 2.0 * h - 1.0
            gh = gh - REG_WEIGHT * beta * np.abs(d) ** (beta - 1.0) * np.sign(d) * 2.0
        g = gh * ((raw > 0.0) & (raw < 1.0)) * (ZETA - GAMMA) * sig * (1.0 - sig)
        m = b1 * m + (1 - b1) * g
        u = b2 * u + (1 - b2) * g * g
        mhat, uhat = m / (1 - b1 ** (it + 1)), u / (1 - b2 ** (it + 1))
        v = v - lr * mhat / (np.sqrt(uhat) + eps)
    return v
