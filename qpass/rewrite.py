"""The graph pass: replace every `qpass::site` node of a dynamo graph by the site's decomposed math.

Each op node becomes one `call_function` node whose target is the site's lowered function
(`Site.lowered`: base dequant + matmul in plain torch, adapters per their spec and dtype policy).
AOTAutograd traces through it, so inductor fuses the dequantize, the adapter matmuls and the adds,
and derives the backward from the decomposition (the op's own autograd formula is not used).

The base computation of each site is chosen by `qpass.lowering.choose` (device, activation dtype, token
count, whether the graph needs gradients). Sibling sites reading the same input with one LoRA adapter each
(q/k/v; gate/up) become ONE node computing their down-projections as one matmul (and, with an int4 kernel,
their bases as one kernel call); so do siblings with no active adapter (disabled, or untargeted), on qpass's C++ kernels (one
call for their bases). Each former site node is replaced by a `getitem` of its output.
"""

from __future__ import annotations

import operator

import torch

from . import pool
from . import site as _site
from .ops import is_site_node, join_names, pooled_names, split_names


def rewrite(gm: torch.fx.GraphModule, *, lowering: str = "auto", needs_grad: bool = False, fuse_siblings: bool = True) -> list:
    """Rewrite `gm` in place; returns the Site objects rewritten (one per node).

    `lowering` picks the base computation (`qpass.lowering`: "auto" chooses per device, dtype, token count
    and `needs_grad`); each site records what it got in `site.lowerings_used`. With `fuse_siblings`, sites
    that read the same input (q/k/v; gate/up) are lowered together (`_sibling_groups`)."""
    from . import lowering as _lowering

    nodes = [n for n in gm.graph.nodes if is_site_node(n)]
    chosen = {}
    for node in nodes:
        site = _site.get(node.args[4])
        x = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
        chosen[node] = _lowering.choose(site, x, needs_grad, lowering)
    for node in nodes:  # adapters read from the model's pool: only the gemv kernel takes the pool as it is
        x, xa, base, adapter, site_id, names = node.args
        if pooled_names(names):
            site = _site.get(site_id)
            split = split_names(names)
            if not (fuse_siblings and _lowering.pool_lowering(chosen[node], needs_grad) and _lowering.fusable(site, split)):
                _unpool(gm, node, site, split)
    groups = _sibling_groups(gm, nodes, chosen) if fuse_siblings else []
    grouped = {n for g in groups for n in g}
    rewritten = []
    for group in groups:
        sites = [_site.get(n.args[4]) for n in group]
        names = split_names(group[0].args[5])
        if names:
            fn, fused_base = _lowering.lowered_group(sites, names, chosen[group[0]], needs_grad,
                                                     pooled=pooled_names(group[0].args[5]))
        else:  # no active adapter on any of them (disabled): one kernel call for their bases
            fn, fused_base = _lowering.lowered_bases(sites, chosen[group[0]]), True
        bases = [list(n.args[2]) for n in group]
        adapters = [list(n.args[3]) for n in group]
        with gm.graph.inserting_before(group[0]):
            xa = group[0].args[1][0] if group[0].args[1] else None
            args = (group[0].args[0], xa, bases, adapters) + _constants(gm, fn)
            new = gm.graph.call_function(fn, args=args)
            new.meta.update(group[0].meta)
            outs = [gm.graph.call_function(operator.getitem, (new, i)) for i in range(len(group))]
        siblings = "+".join(s.path.rsplit(".", 1)[-1] for s in sites) if len(sites) > 1 else ""
        label = _lowering.label(chosen[group[0]] if fused_base else "torch-dequant")
        for node, out, site in zip(group, outs, sites):
            _used(site, f"{label}, fused {siblings}" if siblings else label + _reason(site, node, needs_grad, chosen))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            rewritten.append(site)
    for node in nodes:
        if node in grouped:
            continue
        x, xa, base, adapter, site_id, names = node.args
        site = _site.get(site_id)
        fn = site.lowered(split_names(names), chosen[node], needs_grad)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(fn, args=(x, list(xa), list(base), list(adapter)) + _constants(gm, fn))
        _used(site, _lowering.label(chosen[node]) + _reason(site, node, needs_grad, chosen))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        rewritten.append(site)
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def _unpool(gm, node, site, names: tuple) -> None:
    """Give a node whose adapters are the model's pool (qpass.pool) the active slots' own tensors instead, as
    views of the pool made at the top of the graph (so that sibling grouping sees them before every site)."""
    x, xa, base, adapter, site_id, _ = node.args
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    entries = [site.slots[n].pool_entry for n in names]
    with gm.graph.inserting_before(first):
        out = gm.graph.call_function(pool.entry_views, (list(adapter), pool.flat(entries)))
        views = [gm.graph.call_function(operator.getitem, (out, i)) for i in range(3 * len(entries))]
    node.args = (x, xa, base, views, site_id, join_names(names))


def _reason(site, node, needs_grad, chosen) -> str:
    """" (why this decode-shaped site fell back from the int4 kernel)", or "" (for the report)."""
    from . import lowering as _lowering

    x = node.args[0]
    reason = _lowering.fallback_reason(site, x.meta.get("example_value") if isinstance(x, torch.fx.Node) else None,
                                       needs_grad, chosen[node])
    return f" ({reason})" if reason else ""


def _constants(gm, fn) -> tuple:
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


def _used(site, label: str) -> None:
    used = site.__dict__.setdefault("lowerings_used", [])
    if label not in used:
        used.append(label)


_CASTS = ("to", "float", "half", "bfloat16", "type")


def _input_key(x, xa):
    """Nodes computing the same adapter input from x compare equal: x itself, or the same dtype cast of x.
    Anything else (dropout: random per site) is never shared."""
    if xa is x:
        return ("x",)
    if xa.op == "call_method" and xa.target in _CASTS and xa.args and xa.args[0] is x:
        if not any(isinstance(a, torch.fx.Node) for a in (*xa.args[1:], *xa.kwargs.values())):
            return (xa.target, repr(xa.args[1:]), repr(sorted(xa.kwargs.items())))
    return None


def _sibling_groups(gm, nodes, chosen) -> list:
    """Lists of site nodes with the same input x, the same single LoRA adapter (same names, policy and
    dtype), equal adapter inputs and the same lowering, whose inputs all exist before the first of them; and
    lists of two or more sites with no active adapter (disabled) on the same input and one of qpass's C++
    lowerings, which compute sibling bases in one call."""
    from .lowering import CPP_LOWERINGS, fusable

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    buckets: dict = {}
    bare: dict = {}
    for node in nodes:
        x, xa, base, adapter, site_id, names = node.args
        site = _site.get(site_id)
        split = split_names(names)
        if isinstance(x, torch.fx.Node) and not split and not adapter and chosen[node] in CPP_LOWERINGS:
            bare.setdefault((x, chosen[node], id(site.info.matcher), site.info.in_features), []).append(node)
            continue
        if not isinstance(x, torch.fx.Node) or len(xa) != 1 or not fusable(site, split):
            continue
        key_xa = _input_key(x, xa[0])
        if key_xa is None:
            continue
        slot = site.slots[split[0]]
        key = (x, names, key_xa, site.policy(slot), slot.dtype, chosen[node], site.info.in_features)
        buckets.setdefault(key, []).append(node)
    groups = []
    for group in [*buckets.values(), *(g for g in bare.values() if len(g) > 1)]:
        first = order[group[0]]
        flat = []
        # the fused node reads x, the FIRST site's adapter input, and every site's base and adapter tensors
        torch.fx.node.map_arg((group[0].args[:2], tuple(n.args[2:4] for n in group)), flat.append)
        if all(order[a] < first for a in flat):
            groups.append(group)
    return groups
