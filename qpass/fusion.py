"""The sibling-fusion pass: site nodes that read the same input become one node.

Contract. Input: a graph whose `qpass::site` nodes each have a chosen lowering. Output: every group found
is replaced by ONE `call_function` node of `qpass.lowering.lowered_group` and a `getitem` per former node;
the other site nodes are left for the per-site pass. A group is either
- sites with the same input x, one active adapter each of a spec that declares `low_rank` (same names,
  dtype policy and adapter dtype), equal adapter inputs, the same lowering, layout and down-projection input
  width: one down-projection for all of them, and their bases in one kernel call where the lowering can
  (q/k/v; gate/up); or
- two or more sites with no active adapter (disabled, untargeted) on the same input and a lowering that
  computes sibling bases in one call.
Only nodes whose inputs all exist before the first of them are grouped (the fused node stands there).
Sites with dropout never group: their adapter inputs are random per site.
"""

from __future__ import annotations

import operator

import torch

from . import lowering as _lowering
from . import site as _site
from . import splice
from .ops import SiteArgs

_CASTS = ("to", "float", "half", "bfloat16", "type")


def fuse(gm, nodes: list, chosen: dict, needs_grad: bool) -> list:
    """Replace each sibling group among `nodes`; returns the nodes it replaced (now erased)."""
    done = []
    for group in groups(gm, nodes, chosen):
        args = [SiteArgs.of(n) for n in group]
        sites = [_site.get(a.site_key) for a in args]
        fn = _lowering.lowered_group(sites, args[0].names, chosen[group[0]], needs_grad, pooled=args[0].pooled)
        with gm.graph.inserting_before(group[0]):
            xa = args[0].xa[0] if args[0].xa else None
            new = gm.graph.call_function(fn, args=(args[0].x, xa, [a.base for a in args], [a.adapter for a in args])
                                         + splice.constants(gm, fn))
            new.meta.update(group[0].meta)
            outs = [gm.graph.call_function(operator.getitem, (new, i)) for i in range(len(group))]
        siblings = "+".join(s.path.rsplit(".", 1)[-1] for s in sites) if len(sites) > 1 else ""
        label = _lowering.label(fn.qpass_lowering)
        for node, a, out, site in zip(group, args, outs, sites):
            splice.record(site, f"{label}, fused {siblings}" if siblings
                          else label + splice.reason(site, a.x, needs_grad, chosen[node]))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            done.append(node)
    return done


def _input_key(x, xa):
    """Nodes computing the same adapter input from x compare equal: x itself, or the same dtype cast of x.
    Anything else (dropout: random per site) is never shared."""
    if xa is x:
        return ("x",)
    if xa.op == "call_method" and xa.target in _CASTS and xa.args and xa.args[0] is x:
        if not any(isinstance(a, torch.fx.Node) for a in (*xa.args[1:], *xa.kwargs.values())):
            return (xa.target, repr(xa.args[1:]), repr(sorted(xa.kwargs.items())))
    return None


def _key(node, chosen: dict):
    """The bucket a node groups in: ("bare", ...) for no active adapter, ("low_rank", ...), or None."""
    a = SiteArgs.of(node)
    site = _site.get(a.site_key)
    if not isinstance(a.x, torch.fx.Node):
        return None
    if not a.names and not a.adapter and _lowering.shares_bare_call(chosen[node]):
        return ("bare", a.x, chosen[node], site.info.layout.name, site.info.in_features)
    if len(a.xa) != 1 or not _lowering.fusable(site, a.names):
        return None
    key_xa = _input_key(a.x, a.xa[0])
    if key_xa is None:
        return None
    slot = site.slots[a.names[0]]
    # the down-projection's input width too: a declared `down_input` (QA-LoRA's pooling) may make it differ
    down_width = slot.get(slot.spec.low_rank.a).shape[-1]
    return ("low_rank", a.x, a.names, key_xa, site.policy(slot), slot.dtype, chosen[node], site.info.in_features,
            down_width, site.info.layout.name)


def groups(gm, nodes: list, chosen: dict) -> list:
    """The sibling groups among `nodes` (see the module docstring)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    buckets: dict = {}
    for node in nodes:
        key = _key(node, chosen)
        if key is not None:
            buckets.setdefault(key, []).append(node)
    found = []
    for key, group in buckets.items():
        if key[0] == "bare" and len(group) < 2:
            continue
        first = order[group[0]]
        flat = []
        # the fused node reads x, the FIRST site's adapter input, and every site's base and adapter tensors
        torch.fx.node.map_arg((group[0].args[:2], tuple(n.args[2:4] for n in group)), flat.append)
        if all(order[a] < first for a in flat):
            found.append(group)
    return found
