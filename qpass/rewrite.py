"""The graph pass: replace every `qpass::site` node of a dynamo graph by the site's decomposed math.

Each op node becomes one `call_function` node whose target is the site's lowered function
(`Site.lowered`: base dequant + matmul in plain torch, adapters per their spec and dtype policy).
AOTAutograd traces through it, so inductor fuses the dequantize, the adapter matmuls and the adds,
and derives the backward from the decomposition (the op's own autograd formula is not used).
"""

from __future__ import annotations

import torch

from . import site as _site
from .ops import is_site_node, split_names


def rewrite(gm: torch.fx.GraphModule, *, lowering: str = "torch-dequant") -> list:
    """Rewrite `gm` in place; returns the Site objects rewritten (one per node)."""
    rewritten = []
    for node in list(gm.graph.nodes):
        if not is_site_node(node):
            continue
        x, xa, base, adapter, site_key, names = node.args
        site = _site.get(site_key)
        fn = site.lowered(split_names(names), lowering)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(fn, args=(x, list(xa), list(base), list(adapter)))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewritten.append(site)
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
