"""Calibration: streaming observers and the threshold choosers ``naive``, ``kl``, ``percentile``, ``mse``.

Example::

    from relayq.calibration import HistogramCalibrator
    cal = HistogramCalibrator("kl")
    for batch in activations:
        cal.observe("conv2d_0:out", batch)
    t = cal.threshold("conv2d_0:out", bits=8)
"""
from .methods import (METHODS, Calibrator, HistogramCalibrator, kl_threshold, mse_threshold, percentile_threshold,
                      weight_threshold)
from .observers import HistogramObserver

__all__ = ["METHODS", "Calibrator", "HistogramCalibrator", "HistogramObserver", "kl_threshold", "mse_threshold",
           "percentile_threshold", "weight_threshold"]
