"""An Expand whose target shape is a folded Shape (``F.normalize`` as torch exports it) imports with a
static shape, not a run-time (symbolic) one that the build cannot compute."""
import numpy as np
import pytest

import relayq

torch = pytest.importorskip("torch")


class _Normalize(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 6)

    def forward(self, x):
        return torch.nn.functional.normalize(self.fc(x), dim=-1)


def test_normalize_expand_imports_static_and_matches():
    from relayq.testing import torchvision_zoo as tz

    torch.manual_seed(0)
    net = _Normalize().eval()
    x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    model = tz.onnx_export(net, x)
    assert "Expand" in [n.op_type for n in model.graph.node]
    mod, params = relayq.frontend.from_onnx(model)
    text = mod.script()
    assert "broadcast_to" in text and "T.int64()" not in text      # no symbolic dims left
    got = relayq.build(mod, params=params)(x)
    np.testing.assert_allclose(got, net(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
