"""Streaming statistics of one tensor: min, max and a signed histogram of bounded size.

The histogram covers ``[-R, R]`` with ``2 * HALF_BINS`` equal bins. ``R`` starts at the first batch's
max |x| and doubles whenever a later batch exceeds it; doubling merges adjacent bin pairs, which is
exact (no re-sampling), so the result does not depend on how the data was split into batches beyond
the bin width. Memory is two small int64 arrays per point, whatever the dataset size.

Example::

    >>> import numpy as np
    >>> obs = HistogramObserver()
    >>> obs.update(np.array([-1.0, 0.5, 2.0], dtype="float32"))
    >>> obs.update(np.array([8.0], dtype="float32"))
    >>> float(obs.max_abs), int(obs.count)
    (8.0, 4)
"""
from __future__ import annotations

import numpy as np

#: Bins of the |x| histogram: 2048, the resolution of TensorRT's and MXNet's entropy calibration. The
#: signed histogram has twice as many (2048 on each side of zero), so that folding it gives exactly this.
HALF_BINS = 2048


class HistogramObserver:
    """min / max / count and a signed histogram of every value seen (see the module docstring)."""

    def __init__(self, half_bins: int = HALF_BINS):
        self.half = int(half_bins)
        self.hist = np.zeros(2 * self.half, dtype=np.int64)
        self.range = 0.0            # R: the histogram covers [-R, R]
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.zeros = 0              # exact zeros (ReLU outputs, padding): representable at any scale
        self._zeros = 0             # values seen while R == 0 (all of them exactly zero)

    @property
    def max_abs(self) -> float:
        return float(max(abs(self.min), abs(self.max))) if self.count else 0.0

    @property
    def bin_width(self) -> float:
        return self.range / self.half if self.range > 0 else 0.0

    def update(self, x) -> None:
        """Add every value of ``x`` (any shape) to the statistics."""
        x = np.asarray(x)
        if x.dtype.kind != "f":
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.size
        self.zeros += x.size - int(np.count_nonzero(x))
        m = max(abs(lo), abs(hi))
        if m == 0.0 and self.range == 0.0:
            self._zeros += x.size
            return
        if self.range == 0.0:
            self.range = m
            self.hist[self.half] += self._zeros
            self._zeros = 0
        elif m > self.range:
            self._grow(m)
        # Shift by +half before truncating, so that truncation equals floor (every value is >= -R).
        k = np.float32(self.half / self.range)
        idx = (x * k + np.float32(self.half)).astype(np.int64)
        np.minimum(idx, 2 * self.half - 1, out=idx)
        np.maximum(idx, 0, out=idx)
        self.hist += np.bincount(idx, minlength=2 * self.half)

    def _grow(self, m: float) -> None:
        k = int(np.ceil(np.log2(m / self.range)))
        while self.range * (1 << k) < m:     # guard against log2 rounding
            k += 1
        j = np.arange(2 * self.half, dtype=np.int64) - self.half
        new_idx = np.clip((j >> k) + self.half, 0, 2 * self.half - 1)
        self.hist = np.bincount(new_idx, weights=self.hist, minlength=2 * self.half).astype(np.int64)
        self.range *= float(1 << k)

    def abs_hist(self, skip_zeros: bool = False) -> tuple[np.ndarray, float]:
        """The histogram of |x|: ``(counts over [0, R] in HALF_BINS bins, bin width)``.

        With ``skip_zeros`` the exact zeros are left out of the first bin.
        """
        pos = self.hist[self.half:]
        neg = self.hist[:self.half][::-1]
        h = pos + neg
        if skip_zeros and self.range > 0:
            h = h.copy()
            h[0] -= self.zeros
        return h, self.bin_width
