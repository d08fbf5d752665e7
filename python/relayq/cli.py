"""The ``relayq`` command: quantize an ONNX model with calibration data from a .npy file and export it.

Example::

    relayq model.onnx calib.npy --calibration kl --per-channel -o model_int8.so
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="relayq", description="Post-training quantization of an ONNX model with TVM.")
    ap.add_argument("model", help="an .onnx file")
    ap.add_argument("data", help="a .npy file of calibration inputs, first axis = samples")
    ap.add_argument("--batch", type=int, default=1, help="calibration batch size (the compiled model's batch)")
    ap.add_argument("--calibration", default="kl", help="naive | kl | percentile | mse")
    ap.add_argument("--per-channel", action="store_true", help="per-output-channel weight scales")
    ap.add_argument("--weight-bits", type=int, default=8)
    ap.add_argument("--act-bits", type=int, default=8)
    ap.add_argument("-o", "--output", default=None, help="export the compiled INT8 model here (.so)")
    args = ap.parse_args(argv)

    import relayq

    try:
        x = np.load(args.data).astype("float32")
        shape = [args.batch] + list(x.shape[1:])
        mod, params = relayq.frontend.from_onnx(args.model, shapes=None)
        batches = [x[i:i + args.batch] for i in range(0, len(x) - args.batch + 1, args.batch)]
        config = relayq.QConfig(per_channel=args.per_channel, weight_bits=args.weight_bits, act_bits=args.act_bits)
        q = relayq.quantize_model(mod, params, batches, args.calibration, config)
        print(q.summary())
        if args.output:
            relayq.build(q).export(args.output)
            print(f"wrote {args.output} (input shape {shape})")
    except relayq.RelayqError as e:
        print(f"relayq: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
