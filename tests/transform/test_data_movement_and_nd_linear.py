"""Linear layers on N-D inputs are quantized (flattened to 2-D dense in prepare), and slicing / permuting a
quantized tensor stays integer; realized == numpy reference, bit for bit."""
import numpy as np
import pytest

import relayq
from relayq.analysis.reference import reference_run

torch = pytest.importorskip("torch")


class _Tokens(torch.nn.Module):
    """Linear on (1, T, C), a channel split (strided slice) and a permute, as transformers / ShuffleNet do."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(16, 8, bias=False)

    def forward(self, x):
        h = self.a(x).relu()                    # (1, 6, 32)
        left = h[:, :, :16]                      # strided slice
        t = left.permute(0, 2, 1)                # (1, 16, 6)
        return self.b(t.permute(0, 2, 1))


def _quantize(fe):
    torch.manual_seed(0)
    net = _Tokens().eval()
    x = torch.randn(1, 6, 16)
    if fe == "torch":
        mod, params = relayq.frontend.from_torch(net, (x,))
    else:
        from relayq.testing import torchvision_zoo as tz
        mod, params = relayq.frontend.from_onnx(tz.onnx_export(net, x.numpy()))
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((1, 6, 16)).astype(np.float32) for _ in range(4)]
    q = relayq.quantize_model(mod, params, dataset=data,
                              config=relayq.QConfig(per_channel=True, show_progress=False, check_accuracy=False))
    return net, q, data


@pytest.mark.parametrize("fe", ["torch", pytest.param("onnx", marks=pytest.mark.slow)])
def test_nd_linear_and_slices_quantize_bit_exact(fe):
    net, q, data = _quantize(fe)
    assert sorted(q.layers.values()) == ["dense", "dense"]        # both linear layers, though the input is 3-D
    from relayq.transform.annotate import float_ops
    assert not float_ops(q.prepared, q.config), "slice / permute / linear left float"
    lib = relayq.build(q)
    x = data[0]
    got = lib(x)
    np.testing.assert_array_equal(got, reference_run(q.annotated, q.qpoints, x))
    ref = net(torch.from_numpy(x)).detach().numpy()
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
