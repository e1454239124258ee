"""The rewrite: replace every `qpass::site` node of a dynamo graph by the site's decomposed math.

A pass manager. It first chooses each site's base lowering (`qpass.lowering.choose`: device, activation
dtype, token count, whether the graph needs gradients), then runs three passes, in this order:
1. the pool pass (`qpass.pool.unpool_pass`): pooled nodes that no lowering reads as a pool get views;
2. sibling fusion (`qpass.fusion`): sites on the same input become one node;
3. the site pass (below): every node left becomes one `call_function` of the site's lowered function
   (`Site.lowered`: the base lowering, the spec's adapter math and its dtype policy).
AOTAutograd traces through the lowered functions, so inductor fuses the dequantize, the adapter matmuls and
the adds, and derives the backward from the decomposition (the op's own autograd formula is not used).
"""

from __future__ import annotations

import torch

from . import fusion, pool, splice
from . import lowering as _lowering
from . import site as _site
from .ops import SiteArgs, is_site_node


def rewrite(gm: torch.fx.GraphModule, *, lowering: str = "auto", needs_grad: bool = False, fuse_siblings: bool = True) -> list:
    """Rewrite `gm` in place; returns the Site objects rewritten (one per node).

    `lowering` picks the base computation ("auto" chooses per site); each site records what it got in
    `site.lowerings_used`. With `fuse_siblings`, sites that read the same input are lowered together."""
    nodes = [n for n in gm.graph.nodes if is_site_node(n)]
    args = [SiteArgs.of(n) for n in nodes]  # read before the passes replace the nodes
    sites = [_site.get(a.site_key) for a in args]
    chosen = {n: _lowering.choose(s, splice.example(a.x), needs_grad, lowering) for n, a, s in zip(nodes, args, sites)}
    pool.unpool_pass(gm, nodes, chosen, needs_grad, fuse_siblings)
    fused = set(fusion.fuse(gm, nodes, chosen, needs_grad)) if fuse_siblings else set()
    for node in nodes:
        if node not in fused:
            _lower_site(gm, node, chosen[node], needs_grad)
    if nodes:
        gm.graph.lint()
        gm.recompile()
    return sites


def _lower_site(gm, node, chosen: str, needs_grad: bool) -> None:
    """The site pass for one node: its lowered function in its place."""
    a = SiteArgs.of(node)
    if a.pooled:
        raise RuntimeError(f"qpass: site {a.site_key} reached the site pass still pooled (pool.unpool_pass)")
    site = _site.get(a.site_key)
    fn = site.lowered(a.names, chosen, needs_grad)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, args=(a.x, a.xa, a.base, a.adapter) + splice.constants(gm, fn))
    splice.record(site, _lowering.label(fn.qpass_lowering) + splice.reason(site, a.x, needs_grad, chosen))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
