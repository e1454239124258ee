"""Splicing a lowered function into a dynamo graph: what the rewrite's passes share.

A lowered function (`qpass.lowering`) replaces one `qpass::site` node, or a group of them, by one
`call_function` node. Tensors the lowering made for itself (repacked weights, `fn.qpass_constants`) become
buffers of the graph module read through `get_attr` nodes; the site records the lowering's label for the
report (`site.lowerings_used`).
"""

from __future__ import annotations

import torch

from . import lowering as _lowering


def example(node):
    """The fake tensor dynamo recorded for a node (None for a non-node argument)."""
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def constants(gm, fn) -> tuple:
    """Tensors a lowering reads besides the site's own (repacked weights): registered on `gm` as buffers and
    read through get_attr nodes, so AOTAutograd lifts them like any module buffer."""
    tensors = getattr(fn, "qpass_constants", None)
    if not tensors:
        return ()
    nodes = []
    for t in tensors:
        name = f"_qpass_kernel_{len([n for n in gm._buffers if n.startswith('_qpass_kernel_')])}"
        gm.register_buffer(name, t, persistent=False)
        sources = getattr(gm, "_param_name_to_source", None)
        if sources is not None:  # dynamo graphs: AOTAutograd looks every lifted tensor up here
            sources[name] = torch._dynamo.source.ConstantSource(name)
        nodes.append(gm.graph.get_attr(name))
    return (nodes,)


def record(site, label: str) -> None:
    """Add `label` to the lowerings the report lists for `site`."""
    used = site.__dict__.setdefault("lowerings_used", [])
    if label not in used:
        used.append(label)


def reason(site, x, needs_grad: bool, chosen: str) -> str:
    """" (why this decode-shaped site fell back from the int4 kernel)", or "" (for the report)."""
    why = _lowering.fallback_reason(site, example(x), needs_grad, chosen)
    return f" ({why})" if why else ""
