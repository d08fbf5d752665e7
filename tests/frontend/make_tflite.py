"""Small float32 TFLite flatbuffers written with the ``tflite`` package's builder functions (no TensorFlow).

``small_cnn()`` returns the bytes of an NHWC net, CONV_2D (ReLU) -> DEPTHWISE_CONV_2D (ReLU6) -> ADD
(residual) -> RESHAPE -> FULLY_CONNECTED -> SOFTMAX, with random weights, and ``reference(x, weights)``
computes the same net in numpy. Usage::

    data, weights = small_cnn(seed=0)
    open("small.tflite", "wb").write(data)
    ref = reference(x, weights)          # x: [1, 6, 6, 3] float32, NHWC
"""
import flatbuffers
import numpy as np
import tflite

INPUT_SHAPE = (1, 6, 6, 3)
CHANNELS, CLASSES = 8, 10
#: tflite.ActivationFunctionType values.
RELU, RELU6 = 1, 3
#: tflite.Padding.SAME.
SAME = 0


def _int_vector(b, values):
    b.StartVector(4, len(values), 4)
    for v in reversed(values):
        b.PrependInt32(int(v))
    return b.EndVector()


def _offset_vector(b, offsets):
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def build_model(tensors, operators, inputs, outputs):
    """Serialize one subgraph.

    ``tensors``: list of ``(name, shape, data or None)`` (float32); ``operators``: list of
    ``(builtin_code, inputs, outputs, options_type, options_fn)`` where ``options_fn(builder)`` returns
    the options table offset.
    """
    b = flatbuffers.Builder(1024)
    # Buffer 0 is the empty buffer by convention; each constant tensor gets its own.
    buffer_data, tensor_buffer = [None], []
    for _, _, data in tensors:
        if data is None:
            tensor_buffer.append(0)
        else:
            tensor_buffer.append(len(buffer_data))
            buffer_data.append(np.ascontiguousarray(data, dtype="float32"))
    buffers = []
    for data in buffer_data:
        vec = None if data is None else b.CreateNumpyVector(np.frombuffer(data.tobytes(), dtype=np.uint8))
        tflite.BufferStart(b)
        if vec is not None:
            tflite.BufferAddData(b, vec)
        buffers.append(tflite.BufferEnd(b))
    tensor_offsets = []
    for (name, shape, _), buf in zip(tensors, tensor_buffer):
        name_off, shape_off = b.CreateString(name), _int_vector(b, shape)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape_off)
        tflite.TensorAddType(b, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(b, buf)
        tflite.TensorAddName(b, name_off)
        tensor_offsets.append(tflite.TensorEnd(b))
    codes = sorted({op[0] for op in operators})
    code_offsets = []
    for code in codes:
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, code)
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, 1)
        code_offsets.append(tflite.OperatorCodeEnd(b))
    op_offsets = []
    for code, ins, outs, opt_type, opt_fn in operators:
        opts = opt_fn(b) if opt_fn else None
        ins_off, outs_off = _int_vector(b, ins), _int_vector(b, outs)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, codes.index(code))
        tflite.OperatorAddInputs(b, ins_off)
        tflite.OperatorAddOutputs(b, outs_off)
        if opts is not None:
            tflite.OperatorAddBuiltinOptionsType(b, opt_type)
            tflite.OperatorAddBuiltinOptions(b, opts)
        op_offsets.append(tflite.OperatorEnd(b))
    t_vec, i_vec, o_vec = _offset_vector(b, tensor_offsets), _int_vector(b, inputs), _int_vector(b, outputs)
    op_vec, name = _offset_vector(b, op_offsets), b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, t_vec)
    tflite.SubGraphAddInputs(b, i_vec)
    tflite.SubGraphAddOutputs(b, o_vec)
    tflite.SubGraphAddOperators(b, op_vec)
    tflite.SubGraphAddName(b, name)
    subgraph = tflite.SubGraphEnd(b)
    codes_vec, sub_vec = _offset_vector(b, code_offsets), _offset_vector(b, [subgraph])
    buf_vec, desc = _offset_vector(b, buffers), b.CreateString("relayq test model")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, codes_vec)
    tflite.ModelAddSubgraphs(b, sub_vec)
    tflite.ModelAddDescription(b, desc)
    tflite.ModelAddBuffers(b, buf_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _conv_options(stride, act):
    def fn(b):
        tflite.Conv2DOptionsStart(b)
        tflite.Conv2DOptionsAddPadding(b, SAME)
        tflite.Conv2DOptionsAddStrideW(b, stride)
        tflite.Conv2DOptionsAddStrideH(b, stride)
        tflite.Conv2DOptionsAddFusedActivationFunction(b, act)
        tflite.Conv2DOptionsAddDilationWFactor(b, 1)
        tflite.Conv2DOptionsAddDilationHFactor(b, 1)
        return tflite.Conv2DOptionsEnd(b)
    return fn


def _dw_options(act):
    def fn(b):
        tflite.DepthwiseConv2DOptionsStart(b)
        tflite.DepthwiseConv2DOptionsAddPadding(b, SAME)
        tflite.DepthwiseConv2DOptionsAddStrideW(b, 1)
        tflite.DepthwiseConv2DOptionsAddStrideH(b, 1)
        tflite.DepthwiseConv2DOptionsAddDepthMultiplier(b, 1)
        tflite.DepthwiseConv2DOptionsAddFusedActivationFunction(b, act)
        tflite.DepthwiseConv2DOptionsAddDilationWFactor(b, 1)
        tflite.DepthwiseConv2DOptionsAddDilationHFactor(b, 1)
        return tflite.DepthwiseConv2DOptionsEnd(b)
    return fn


def _simple_options(prefix):
    def fn(b):
        getattr(tflite, f"{prefix}Start")(b)
        return getattr(tflite, f"{prefix}End")(b)
    return fn


def _reshape_options(shape):
    def fn(b):
        vec = _int_vector(b, shape)
        tflite.ReshapeOptionsStart(b)
        tflite.ReshapeOptionsAddNewShape(b, vec)
        return tflite.ReshapeOptionsEnd(b)
    return fn


def _softmax_options(b):
    tflite.SoftmaxOptionsStart(b)
    tflite.SoftmaxOptionsAddBeta(b, 1.0)
    return tflite.SoftmaxOptionsEnd(b)


def small_cnn(seed=0):
    """``(bytes, weights)`` of the NHWC test net; ``weights`` feeds :func:`reference`."""
    rng = np.random.RandomState(seed)
    n, h, w, c = INPUT_SHAPE
    flat = h * w * CHANNELS
    weights = {
        "conv_w": rng.randn(CHANNELS, 3, 3, c).astype("float32") * 0.4,         # OHWI
        "conv_b": rng.randn(CHANNELS).astype("float32") * 0.1,
        "dw_w": rng.randn(1, 3, 3, CHANNELS).astype("float32") * 0.4,           # 1HWC
        "dw_b": rng.randn(CHANNELS).astype("float32") * 0.1,
        "fc_w": rng.randn(CLASSES, flat).astype("float32") * (1.0 / flat ** 0.5),
        "fc_b": rng.randn(CLASSES).astype("float32") * 0.1,
    }
    shape_const = np.array([1, flat], "int32")
    tensors = [
        ("input", list(INPUT_SHAPE), None),                                     # 0
        ("conv/weights", list(weights["conv_w"].shape), weights["conv_w"]),     # 1
        ("conv/bias", [CHANNELS], weights["conv_b"]),                           # 2
        ("conv/out", [n, h, w, CHANNELS], None),                                # 3
        ("dw/weights", list(weights["dw_w"].shape), weights["dw_w"]),           # 4
        ("dw/bias", [CHANNELS], weights["dw_b"]),                               # 5
        ("dw/out", [n, h, w, CHANNELS], None),                                  # 6
        ("add/out", [n, h, w, CHANNELS], None),                                 # 7
        ("reshape/out", [1, flat], None),                                       # 8
        ("fc/weights", [CLASSES, flat], weights["fc_w"]),                       # 9
        ("fc/bias", [CLASSES], weights["fc_b"]),                                # 10
        ("fc/out", [1, CLASSES], None),                                         # 11
        ("output", [1, CLASSES], None),                                         # 12
    ]
    B = tflite.BuiltinOperator
    O = tflite.BuiltinOptions
    operators = [
        (B.CONV_2D, [0, 1, 2], [3], O.Conv2DOptions, _conv_options(1, RELU)),
        (B.DEPTHWISE_CONV_2D, [3, 4, 5], [6], O.DepthwiseConv2DOptions, _dw_options(RELU6)),
        (B.ADD, [3, 6], [7], O.AddOptions, _simple_options("AddOptions")),
        (B.RESHAPE, [7], [8], O.ReshapeOptions, _reshape_options(shape_const)),
        (B.FULLY_CONNECTED, [8, 9, 10], [11], O.FullyConnectedOptions, _simple_options("FullyConnectedOptions")),
        (B.SOFTMAX, [11], [12], O.SoftmaxOptions, _softmax_options),
    ]
    return build_model(tensors, operators, [0], [12]), weights


def _conv_nhwc_same(x, w_hwio, b, groups=1):
    """Stride-1 SAME conv, NHWC input, HWIO (or HW1C for depthwise) weights, float64."""
    kh, kw = w_hwio.shape[:2]
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, w_hwio.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + h, j:j + w, :]
            out += patch * w_hwio[i, j, 0] if groups > 1 else patch @ w_hwio[i, j]
    return out + b


def reference(x, weights):
    """The test net in numpy (float64), NHWC."""
    x = x.astype("float64")
    y = np.maximum(_conv_nhwc_same(x, weights["conv_w"].transpose(1, 2, 3, 0), weights["conv_b"]), 0)
    d = np.clip(_conv_nhwc_same(y, weights["dw_w"].transpose(1, 2, 0, 3), weights["dw_b"], groups=CHANNELS), 0, 6)
    z = (y + d).reshape(1, -1)
    logits = z @ weights["fc_w"].T + weights["fc_b"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
