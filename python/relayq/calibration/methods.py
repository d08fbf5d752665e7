"""Threshold choosers for activations (naive, kl, percentile, mse) and weights (max, mse).

Every chooser works on the streamed histogram of a point (:mod:`relayq.calibration.observers`), never on
the raw data, and searches all candidate thresholds at once with array operations (no Python loop over
candidates). A symmetric ``bits``-bit code has ``qmax = 2^(bits-1) - 1`` magnitude levels; an unsigned
(asymmetric) one has ``2^bits - 1`` levels over ``[lo, hi]``.

* ``naive``: max |x| over the dataset (``[min, max]`` when asymmetric).
* ``kl``: the entropy method of TensorRT and MXNet: the threshold ``t`` minimizing KL(P || Q), with P the
  |x| histogram clipped at ``t`` (outliers folded into the last bin) and Q the same merged into
  ``qmax + 1`` quantization levels and expanded back over P's non-empty bins. Exact zeros are left out
  of the histogram (they are exact at any scale), as pytorch-quantization's ``skip_zeros`` does.
* ``percentile``: the ``p``-th percentile of |x| (default 99.99).
* ``mse``: the threshold minimizing the expected squared error ``E[(x - q(x))^2]``: clipping error
  beyond ``t``, and rounding error inside (``min(x^2, s^2 / 12)``: values below half a step round to
  zero, the rest carry the uniform rounding error of step ``s``).

Example::

    >>> import numpy as np
    >>> cal = HistogramCalibrator("percentile", p=99.0)
    >>> cal.observe("a", np.linspace(-1, 1, 10001, dtype="float32"))
    >>> round(cal.threshold("a", 8), 2)
    0.99
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .observers import HistogramObserver

METHODS = ("naive", "kl", "percentile", "mse")
#: Default percentile: keeps all but one value in 10,000 (outliers beyond it are clipped).
DEFAULT_PERCENTILE = 99.99
#: Candidate clipping ratios (of max |w|) of the weight MSE search; below 0.3 the error only grows.
_WEIGHT_MSE_RATIOS = np.linspace(0.3, 1.0, 71)
#: Largest fraction of the values the KL threshold may clip: far above any sane choice (a few percent at
#: 4 bits), it only rules out the degenerate thresholds of discrete data (see kl_threshold).
_KL_MAX_CLIPPED = 0.1
#: Average samples per bin below which the KL search coarsens its histogram (see kl_threshold).
_KL_MIN_SAMPLES_PER_BIN = 16
#: Probability given to a bin that P has and Q lacks in the KL search (instead of infinite divergence).
_KL_FLOOR = 1e-6
#: Candidates per side of the asymmetric MSE grid search.
_ASYM_GRID = 48


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


class Calibrator:
    """Base class: a calibrator observes named tensors and then chooses their thresholds.

    Subclass it and pass an instance as ``calibration=`` to :func:`relayq.quantize_model`.
    :meth:`threshold` returns the symmetric threshold (``scale = threshold / qmax``); :meth:`range`
    returns ``(lo, hi)`` for asymmetric (zero-point) quantization.

    Example::

        class MaxTimesTwo(Calibrator):
            def observe(self, name, x): self.m = max(getattr(self, "m", 0.0), float(np.abs(x).max()))
            def threshold(self, name, bits, signed=True): return 2 * self.m
    """

    name = "custom"

    def observe(self, name: str, value: np.ndarray) -> None:
        raise NotImplementedError

    def threshold(self, name: str, bits: int, signed: bool = True) -> float:
        raise NotImplementedError

    def range(self, name: str, bits: int) -> tuple[float, float]:
        """``(lo, hi)`` for an unsigned ``bits``-bit code with a zero point; default: +-threshold."""
        t = float(self.threshold(name, bits, True))
        return -t, t


class HistogramCalibrator(Calibrator):
    """The built-in calibrators: one :class:`HistogramObserver` per point, a method to choose.

    >>> import numpy as np
    >>> cal = HistogramCalibrator("naive")
    >>> cal.observe("x", np.array([-3.0, 1.0]))
    >>> cal.threshold("x", 8)
    3.0
    """

    def __init__(self, method: str = "naive", p: float = DEFAULT_PERCENTILE):
        if method not in METHODS:
            raise ConfigError(f"unknown calibration method {method!r}; known: {list(METHODS)}")
        if not 0.0 < float(p) <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100], got {p!r}")
        self.method = self.name = method
        self.p = float(p)
        self.observers: dict[str, HistogramObserver] = {}

    def observe(self, name: str, value) -> None:
        obs = self.observers.get(name)
        if obs is None:
            obs = self.observers[name] = HistogramObserver()
        obs.update(value)

    def observer(self, name: str) -> HistogramObserver:
        obs = self.observers.get(name)
        if obs is None or obs.count == 0:
            raise ConfigError(f"calibration point {name!r} was never observed")
        return obs

    def threshold(self, name: str, bits: int, signed: bool = True) -> float:
        obs = self.observer(name)
        if self.method == "naive" or obs.range == 0.0:
            return obs.max_abs
        # Exact zeros (half of every ReLU output) quantize without error at any threshold; left in,
        # their spike in the first bin dominates the KL search and drags the threshold down.
        hist, width = obs.abs_hist(skip_zeros=self.method == "kl")
        levels = _qmax(bits) if signed else (1 << bits) - 1
        if self.method == "kl":
            t = kl_threshold(hist, width, levels + 1)
        elif self.method == "percentile":
            t = percentile_threshold(hist, width, self.p)
        else:
            t = mse_threshold(hist, width, levels)
        return float(min(t, obs.max_abs))

    def range(self, name: str, bits: int) -> tuple[float, float]:
        obs = self.observer(name)
        lo, hi = min(obs.min, 0.0), max(obs.max, 0.0)
        if self.method == "naive" or obs.range == 0.0:
            return float(lo), float(hi)
        if lo == 0.0:                      # one-sided (after a ReLU): the |x| methods apply directly
            return 0.0, float(self.threshold(name, bits, signed=False))
        if self.method == "percentile":
            return _signed_percentiles(obs, self.p)
        if self.method == "mse":
            return _asym_mse_range(obs, (1 << bits) - 1)
        if self.method == "kl":
            return _kl_asym_range(obs, bits)
        t = self.threshold(name, bits, signed=True)
        return float(max(lo, -t)), float(min(hi, t))


def kl_threshold(hist: np.ndarray, width: float, levels: int, guard: bool = True) -> float:
    """The KL-optimal threshold of an |x| histogram for ``levels`` quantization levels (codes 0..levels-1).

    All candidates ``i`` (the first ``i`` bins kept) are evaluated at once. Where the histogram has
    fewer than ``2 * levels`` bins (16-bit codes on 2048 bins) the method has no room to choose and
    returns the max.

    Two departures from the entropy method as TensorRT and MXNet write it, both found on hardswish /
    SiLU networks (issue 7), where it clipped the long positive tail that carries the signal:

    * Q is built from the levels the data really rounds to: a threshold of ``i`` bins has a step of
      ``i / (levels - 1)`` bins, and a bin belongs to the level its centre rounds to. The classic
      ``i // levels`` bins per level (the remainder all in the last level) models every threshold
      below ``2 * levels`` bins as *lossless* in the bulk (one bin per level), which drags the choice
      towards them.
    * ``guard``: a threshold whose expected squared error (as :func:`mse_threshold` models it) exceeds
      that of the max is no candidate. KL compares shapes and barely sees the magnitude of what it
      clips; the guard keeps it from trading more error than not clipping at all would cost.

    >>> x = np.abs(np.random.RandomState(0).randn(100_000))
    >>> h, e = np.histogram(x, bins=2048, range=(0, x.max()))
    >>> bool(2.5 < kl_threshold(h, e[1], 128) < x.max())
    True
    """
    hist = np.asarray(hist, dtype=np.float64)
    nb = hist.size
    nz = np.nonzero(hist)[0]
    if nz.size == 0:
        return 0.0
    last = int(nz[-1]) + 1                       # bins past the data's max change nothing
    if 2 * levels > nb or last <= levels:
        return last * width
    hist = hist[:last]
    # A sparse histogram (few samples per bin) biases KL towards small thresholds: with few samples,
    # merging bins for Q looks costly wherever it happens. Coarsen the bins (by powers of two, keeping
    # at least 2 * levels) until they hold MIN_SAMPLES_PER_BIN on average.
    while last >= 4 * levels and hist.sum() < _KL_MIN_SAMPLES_PER_BIN * last:
        if last % 2:
            hist = np.append(hist, 0.0)
        hist = hist.reshape(-1, 2).sum(axis=1)
        last, width = hist.size, width * 2
    total = hist.sum()
    cand = np.arange(levels, last + 1)[:, None]              # keep the first i bins, (nc, 1)
    # Work per (candidate, level) with prefix sums: O(candidates x levels), never x bins.
    csum = np.concatenate([[0.0], np.cumsum(hist)])
    cnz = np.concatenate([[0.0], np.cumsum(hist > 0)])
    hlogh = np.where(hist > 0, hist * np.log(np.where(hist > 0, hist, 1.0)), 0.0)
    clog = np.concatenate([[0.0], np.cumsum(hlogh)])
    tail = total - csum[cand]                                   # outliers, folded into bin i-1
    last_bin = hist[cand - 1] + tail                            # P's last bin
    j = np.arange(levels)[None, :]
    # Level j holds the bins whose centre b + 1/2 rounds to j steps of i / (levels - 1) bins.
    step = cand / (levels - 1)
    start = np.clip(np.ceil((j - 0.5) * step - 0.5), 0, cand).astype(np.int64)
    end = np.where(j == levels - 1, cand, np.clip(np.ceil((j + 0.5) * step - 0.5), 0, cand).astype(np.int64))
    # Q is built from the kept bins *without* the outliers (as TensorRT and MXNet do): clipping moves
    # mass into P's last bin that Q does not have, which is what makes small thresholds expensive.
    qsum = csum[end] - csum[start]
    nnz = cnz[end] - cnz[start]
    psum = qsum.copy()
    psum[:, -1:] += tail
    gained = (hist[cand - 1] == 0) & (tail > 0)                 # the last bin is non-empty only in P
    nnz[:, -1:] += gained
    # sum p log p over P, with the last bin replaced by its outlier-fed value.
    plogp = clog[cand - 1] + np.where(last_bin > 0, last_bin * np.log(np.where(last_bin > 0, last_bin, 1.0)), 0.0)
    inside = csum[cand]                                          # mass kept inside the candidate, (nc, 1)
    qn = np.divide(qsum, nnz * inside, out=np.zeros_like(qsum), where=(nnz > 0) & (inside > 0))
    # A bin with mass in P but none in Q (the last bin, fed by outliers only) gets a small floor
    # instead of an infinite divergence.
    lonely = (psum > 0) & (qn == 0)
    qn = np.where(lonely, _KL_FLOOR, qn)
    cross = np.sum(np.where(psum > 0, psum * np.log(np.where(psum > 0, qn, 1.0)), 0.0), axis=1)
    # The lonely last bin takes the floor for its own mass only; the group's other bins have none.
    kl = (plogp[:, 0] - cross) / total - np.log(total)
    # A candidate that keeps no data at all (discrete inputs: nothing below the first spike) is no
    # candidate: Q would be empty.
    kl = np.where(inside[:, 0] > 0, kl, np.inf)
    # Discrete data (images with a few grey levels, one-hot inputs) gives zero divergence to absurd
    # thresholds: clipped at its first spike, P and the renormalized Q are both one bin. The entropy
    # method assumes the clipped tail is small; hold it to that.
    kl = np.where(tail[:, 0] <= _KL_MAX_CLIPPED * total, kl, np.inf)
    cand = cand[:, 0]
    if guard:
        err = _squared_error_curve(hist, width, levels - 1)[cand - 1]
        kl = np.where(err <= err[-1] * (1.0 + 1e-9), kl, np.inf)
    best = int(cand[int(np.argmin(kl))])
    return best * width


def percentile_threshold(hist: np.ndarray, width: float, p: float) -> float:
    """The ``p``-th percentile of |x| from its histogram, interpolated inside the bin."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    target = total * float(p) / 100.0
    cdf = np.cumsum(hist)
    k = int(np.searchsorted(cdf, target, side="left"))
    k = min(k, hist.size - 1)
    before = cdf[k - 1] if k else 0.0
    frac = (target - before) / hist[k] if hist[k] > 0 else 1.0
    return (k + float(np.clip(frac, 0.0, 1.0))) * width


def _expected_sq_error(centers, counts, lo, hi, levels):
    """Expected squared quantization error of a histogram for each candidate range ``[lo, hi]``.

    ``lo``/``hi`` are arrays of candidates (broadcast against the bins on the last axis).
    """
    step = (hi - lo) / levels
    below = np.maximum(lo - centers, 0.0)
    above = np.maximum(centers - hi, 0.0)
    clip_err = below ** 2 + above ** 2
    # Inside the range: distance to zero matters for the values that round to zero; elsewhere the
    # rounding error of a step s is uniform, s^2 / 12.
    round_err = np.minimum(centers ** 2, step ** 2 / 12.0)
    err = np.where((below > 0) | (above > 0), clip_err, round_err)
    return np.sum(err * counts, axis=-1)


def _squared_error_curve(hist: np.ndarray, width: float, levels: int) -> np.ndarray:
    """Expected squared error of every candidate threshold ``(i + 1) * width`` (the upper edge of bin
    ``i``), for ``levels`` steps between 0 and the threshold; linear in the number of bins (prefix sums)."""
    hist = np.asarray(hist, dtype=np.float64)
    last = hist.size
    c = (np.arange(last) + 0.5) * width
    pre = [np.concatenate([[0.0], np.cumsum(hist * c ** e)]) for e in range(3)]   # sums of h, h c, h c^2
    cand = np.arange(1, last + 1) * width          # candidate t = upper edge of bin i - 1
    i = np.arange(1, last + 1)
    # Clipping: sum over c > t of h (c - t)^2 = S2 - 2 t S1 + t^2 S0 on the tail.
    s0, s1, s2 = (p[-1] - p[i] for p in pre)
    clip_err = s2 - 2 * cand * s1 + cand ** 2 * s0
    # Rounding inside: values under step/sqrt(12) cost c^2 (mostly rounded to zero), the rest step^2/12.
    step = cand / levels
    split = np.minimum(np.searchsorted(c, step / np.sqrt(12.0)), i)
    round_err = pre[2][split] + step ** 2 / 12.0 * (pre[0][i] - pre[0][split])
    return clip_err + round_err


def mse_threshold(hist: np.ndarray, width: float, levels: int) -> float:
    """The symmetric threshold minimizing the expected squared error, over every bin edge at once.

    ``levels`` is the number of steps between 0 and the threshold (``qmax``, or ``2^bits - 1`` for an
    unsigned code). The error of each candidate comes from prefix sums, so the search is linear in the
    number of bins.

    >>> h = np.ones(256)
    >>> round(mse_threshold(h, 1.0 / 256, 127), 2)     # uniform on [0, 1]: nothing worth clipping
    1.0
    """
    hist = np.asarray(hist, dtype=np.float64)
    nz = np.nonzero(hist)[0]
    if nz.size == 0:
        return 0.0
    hist = hist[:int(nz[-1]) + 1]
    err = _squared_error_curve(hist, width, levels)
    return float((int(np.argmin(err)) + 1) * width)


def _signed_percentiles(obs: HistogramObserver, p: float) -> tuple[float, float]:
    cdf = np.cumsum(obs.hist.astype(np.float64))
    total = cdf[-1]
    edges = (np.arange(obs.hist.size + 1) - obs.half) * obs.bin_width
    lo_i = int(np.searchsorted(cdf, total * (100.0 - p) / 100.0, side="left"))
    hi_i = int(np.searchsorted(cdf, total * p / 100.0, side="left"))
    lo = max(float(edges[lo_i]), obs.min)
    hi = min(float(edges[min(hi_i + 1, obs.hist.size)]), obs.max)
    return min(lo, 0.0), max(hi, 0.0)


def _kl_asym_range(obs: HistogramObserver, bits: int) -> tuple[float, float]:
    """The ``kl`` range of an asymmetric code on a tensor with both signs.

    The longer side (its extent ``d``, the other side's ``o``) is clipped where the KL search on *its own*
    histogram puts the threshold, with the share ``d / (d + o)`` of the code's ``2^bits - 1`` steps that
    side gets; the shorter side is kept, up to that threshold. Searching |x| with the ``2^(bits-1) - 1``
    steps of a symmetric code instead (what a symmetric point needs) halves the steps a one-sided
    tail really has (GELU, SiLU, hardswish outputs: a short negative dip, a long positive tail) and
    clips it far too early: MiniLM's GELU outputs at 2.8 of 17 (embedding cosine 0.969; 0.983 with this).

    >>> from relayq.calibration.observers import HistogramObserver
    >>> obs = HistogramObserver(); obs.update(np.concatenate([-0.2 * np.random.RandomState(0).rand(1000),
    ...                                                       np.random.RandomState(1).exponential(1.0, 20000)]))
    >>> lo, hi = _kl_asym_range(obs, 8)
    >>> lo == obs.min and 4.0 < hi <= obs.max
    True
    """
    levels_total = (1 << bits) - 1
    pos = obs.hist[obs.half:].astype(np.float64)
    neg = obs.hist[:obs.half][::-1].astype(np.float64)
    pos[0] = max(pos[0] - obs.zeros, 0.0)            # exact zeros cost nothing at any threshold
    positive_longer = obs.max >= -obs.min
    d, o = (obs.max, -obs.min) if positive_longer else (-obs.min, obs.max)
    steps = max(2, int(round(levels_total * d / (d + o))))
    t = kl_threshold(pos if positive_longer else neg, obs.bin_width, steps + 1)
    t = d if t <= 0 else min(t, d)
    o = min(o, t)
    return (-o, float(t)) if positive_longer else (-float(t), o)


def _asym_mse_range(obs: HistogramObserver, levels: int) -> tuple[float, float]:
    """Grid search over ``(lo, hi)`` shrunk from ``(min, max)``: all pairs evaluated at once."""
    centers = (np.arange(obs.hist.size) - obs.half + 0.5) * obs.bin_width
    keep = obs.hist > 0
    c, h = centers[keep], obs.hist[keep].astype(np.float64)
    ratios = np.linspace(1.0 / _ASYM_GRID, 1.0, _ASYM_GRID)
    lo = (obs.min * ratios)[:, None, None]
    hi = (obs.max * ratios)[None, :, None]
    err = _expected_sq_error(c[None, None, :], h[None, None, :], lo, hi, levels)
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(min(obs.min * ratios[i], 0.0)), float(max(obs.max * ratios[j], 0.0))


def weight_threshold(w: np.ndarray, bits: int, method: str = "max", channel_axis: int | None = None):
    """Symmetric threshold of a weight tensor: a float, or a vector along ``channel_axis``.

    ``"max"`` takes max |w|; ``"mse"`` searches clipping ratios of it for the smallest exact
    quantization error (all channels at once, one array pass per candidate ratio).

    >>> float(weight_threshold(np.array([[1.0, -2.0], [0.5, 0.25]]), 8))
    2.0
    >>> weight_threshold(np.array([[1.0, -2.0], [0.5, 0.25]]), 8, channel_axis=0).tolist()
    [2.0, 0.5]
    """
    if method not in ("max", "mse"):
        raise ConfigError(f"weight method must be 'max' or 'mse', got {method!r}")
    w = np.asarray(w, dtype=np.float64)
    if channel_axis is None:
        flat = w.reshape(1, -1)
    else:
        flat = np.moveaxis(w, channel_axis, 0).reshape(w.shape[channel_axis], -1)
    tmax = np.abs(flat).max(axis=1)
    if method == "mse":
        qmax = _qmax(bits)
        best, best_err = tmax.copy(), np.full(tmax.shape, np.inf)
        for r in _WEIGHT_MSE_RATIOS:
            t = tmax * r
            s = np.where(t > 0, t / qmax, 1.0)[:, None]
            err = np.sum((flat - np.clip(np.round(flat / s), -qmax, qmax) * s) ** 2, axis=1)
            better = err < best_err
            best = np.where(better, t, best)
            best_err = np.where(better, err, best_err)
        tmax = best
    return float(tmax[0]) if channel_axis is None else tmax
