"""Per-layer error, sensitivity, reports with plots.

* :func:`sensitivity` -- per-layer SQNR and the metric with one layer at a time float or lower;
* :mod:`relayq.analysis.check` -- the accuracy check after calibration;
* :mod:`relayq.analysis.report` -- ``QuantizedModel.report(path)``: an HTML page with plots;
* :mod:`relayq.analysis.reference` -- a numpy executor of the integer semantics.

Example::

    res = relayq.analysis.sensitivity(qmodel, batches)
    print(res.table())
"""
from .sensitivity import SensitivityResult, sensitivity

__all__ = ["sensitivity", "SensitivityResult"]
