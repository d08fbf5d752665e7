"""Errors raised by relayq.

Every error a user can provoke with bad input is a :class:`RelayqError` subclass whose message names
the node, op, input or option at fault, so that nothing surfaces as a stack trace from deep inside TVM.

Example::

    try:
        relayq.quantize_model(mod, params, dataset=[], calibration="naive")
    except relayq.DatasetError as e:
        print(e)        # "calibration dataset is empty: ..."
"""


class RelayqError(Exception):
    """Base class of every error relayq raises on purpose."""


class ConfigError(RelayqError, ValueError):
    """An option or QConfig value is invalid (unknown calibration method, bad bit width ...)."""


class DatasetError(RelayqError, ValueError):
    """The calibration dataset is empty, or a batch does not match the model's inputs."""


class ModelError(RelayqError, ValueError):
    """The model itself is malformed: a weight missing from params, an unreadable file, a bad op."""


class FrontendError(ModelError):
    """A frontend (MXNet, ONNX, PyTorch) cannot read or convert its input."""


class UnsupportedOpError(FrontendError):
    """A frontend met an op it cannot import (the quantizer itself falls back to float instead)."""


class OverflowRiskError(RelayqError, ValueError):
    """The worst-case integer accumulator of a layer would overflow its storage type."""


class MissingDependencyError(RelayqError, ImportError):
    """An optional package a feature needs is not installed (the message names it and how to install it)."""


class BuildError(RelayqError, RuntimeError):
    """Lowering or compiling the quantized model failed for the requested target."""


class RemoteError(RelayqError, RuntimeError):
    """A remote device reached through TVM's RPC tracker failed: the message names the tracker
    (``host:port``), the device key and, once a device was assigned, the server's address."""


class TrackerUnreachableError(RemoteError):
    """Nothing answers as an RPC tracker at the ``rpc="host:port"`` given (the message names it)."""


class NoFreeDeviceError(RemoteError):
    """The tracker has no server registered with the device key, or none became free within the
    timeout; the message names the key and what the tracker reports (servers, free, pending)."""


class ArtefactError(ModelError):
    """A saved or exported model file (``.so`` + ``.so.json``, ``.rqz``) cannot be written, or is missing,
    corrupt, truncated, of an unknown format version, or does not match its metadata; names the file."""


class UnsupportedCPUError(RelayqError, RuntimeError):
    """A compiled model needs CPU features (an instruction set) that this machine lacks, e.g. a library built
    for ``x86-vnni`` on an AVX2-only host; names what the model needs and what the host has. Running it
    would kill the process with SIGILL, so relayq refuses before any of its code runs."""


class FloatFallbackWarning(UserWarning):
    """Ops left in float (unsupported by the quantizer, or skipped by the QConfig), named in the message."""


class BiasClampWarning(UserWarning):
    """A layer's bias does not fit int32 at the accumulator scale s_x*s_w and was clamped; names the layer."""


class NothingQuantizedWarning(UserWarning):
    """The model has no quantizable op: the float model is returned."""


class CalibrationWarning(UserWarning):
    """Calibration saw degenerate data at a point (all zero, or one constant value), named in the message."""


class AccuracyCollapseWarning(UserWarning):
    """The quantized model disagrees badly with the float model on the check batches (see
    :mod:`relayq.analysis.check`); the message names the points with the worst quantization noise."""


class SlowKernelWarning(UserWarning):
    """A quantized layer falls back to slower code than its target's fast integer kernels (the build lists
    the layers and says what would put them on the fast path)."""
