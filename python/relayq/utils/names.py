"""The source model's names (ONNX node / initializer names, torch module paths) carried with every layer.

A frontend records, for the bindings of ``main`` it emitted, the node of the source model that produced
each one, and for each weight parameter the user's name for it. The record travels as one function
attribute of ``main`` (:data:`SOURCE_ATTR`, a JSON string, so that it survives every pass that keeps
function attributes) and is keyed by Relax variable names::

    {"framework": "ONNX",
     "vars":   {"lv7": ["/features/3/Conv", "Conv", ["features.3.weight"]], ...},
     "params": {"features.3.weight": ["features.3.weight", "/features/3/Conv", "Conv"], ...}}

``prepare`` resolves ``params`` into the ``vars`` that read them (the parameters vanish when they are
bound), ``annotate`` turns the variables of each layer into a :class:`LayerSource`.

Example::

    >>> src = LayerSource("ONNX", "/features/3/Conv", "Conv", "features.3.weight")
    >>> describe("conv2d_3", src)
    'conv2d_3 (ONNX node "/features/3/Conv", weight "features.3.weight")'
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

#: Function attribute of ``main`` holding the source-name record (a JSON string).
SOURCE_ATTR = "relayq_source_names"

#: How each framework calls the thing a name refers to.
_NODE_WORD = {"ONNX": "ONNX node", "torch": "torch module", "MXNet": "MXNet node"}


@dataclass(frozen=True)
class LayerSource:
    """Where a layer of relayq came from in the user's model."""

    framework: str
    node: Optional[str] = None          # ONNX node name, torch module path, MXNet node name
    op_type: Optional[str] = None       # "Conv", "Gemm", "Conv2d" ...
    weight: Optional[str] = None        # the user's name of the weight (ONNX initializer, torch parameter)
    bias: Optional[str] = None

    def names(self) -> list:
        """The user's names of this layer (node first): what skip lists and overrides may use."""
        return [n for n in (self.node, self.weight) if n]

    def text(self) -> str:
        """``ONNX node "/features/3/Conv", weight "features.3.weight"``."""
        parts = []
        if self.node:
            parts.append(f'{_NODE_WORD.get(self.framework, self.framework + " node")} "{self.node}"')
        if self.weight:
            parts.append(f'weight "{self.weight}"')
        return ", ".join(parts)


def describe(name: str, source: Optional[LayerSource]) -> str:
    """relayq's name with the user's names beside it: ``conv2d_3 (ONNX node "...", weight "...")``."""
    text = source.text() if source is not None else ""
    return f"{name} ({text})" if text else name


def read(func) -> Optional[dict]:
    """The source-name record of a Relax function, or None."""
    attrs = getattr(func, "attrs", None)
    if attrs is None or SOURCE_ATTR not in attrs:
        return None
    try:
        return json.loads(str(attrs[SOURCE_ATTR]))
    except ValueError:
        return None


def attach(mod, record: Optional[dict]):
    """``mod`` with ``record`` stored on ``main`` (unchanged when ``record`` is empty)."""
    if not record:
        return mod
    mod = mod.__class__(dict(mod.functions_items()), attrs=mod.attrs)
    gv = mod.get_global_var("main")
    mod[gv] = mod[gv].with_attr(SOURCE_ATTR, json.dumps(record))
    return mod
