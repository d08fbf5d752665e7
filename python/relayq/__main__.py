"""``python -m relayq ...`` is the ``relayq`` command (see :mod:`relayq.cli`).

Example::

    python -m relayq quantize model.onnx --calib images/ -o model.rqz
"""
import sys

from .cli import main

sys.exit(main())
