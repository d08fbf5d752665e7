"""PyTorch input: ``from_torch(module, example_inputs) -> (IRModule, params)`` via ``torch.export``.

The module is exported in eval mode; parameters and buffers come back as a ``params`` dict keyed by
the names of the Relax function's parameters, so BatchNorm stays in the graph for ``prepare`` to fold.

Example::

    mod, params = relayq.frontend.from_torch(net, (torch.randn(1, 3, 32, 32),))
"""
from __future__ import annotations

from ..errors import FrontendError


def from_torch(module, example_inputs):
    """Export a ``torch.nn.Module`` and import it as ``(IRModule, params)``.

    ``example_inputs`` is a tuple of tensors (or one tensor); their shapes become the static input shapes.
    The data inputs keep the names of ``forward``'s arguments.
    """
    try:
        import torch
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FrontendError(f"from_torch needs torch: {e}") from None
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    module = module.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(module, tuple(example_inputs))
        mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    except Exception as e:
        raise FrontendError(f"torch export/import failed: {str(e).splitlines()[0]}") from None
    from ..utils.names import attach
    from .source_names import torch_source_names

    mod = attach(mod, torch_source_names(ep, module, mod))      # module paths of the weights
    mod, detached = relax.frontend.detach_params(mod)
    func = mod["main"]
    n_in = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else len(example_inputs)
    names = [p.name for p in func.params[n_in:]]
    params = {n: v.numpy() for n, v in zip(names, detached.get("main", []))}
    return mod, params
