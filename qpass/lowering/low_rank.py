"""The lowered functions the rewrite splices into the graph: one site around its base, and sibling sites
whose active adapter is a declared low-rank product (`AdapterSpec.low_rank`).

Siblings read the same input (q/k/v; gate/up): one down-projection x @ [A_1; A_2; ...]^T for all of them,
their bases in one kernel call where the lowering can (`Base.fused`), and, on kernels that can, the whole
adapter inside that call (`Base.takes_low_rank`, `takes_folded_up`, `reads_pool`). Nothing here knows an
adapter by name: any spec that declares `low_rank` gets these forms, and `compute` stays its definition
(eager, the op's own kernel, training through other backends)."""

from __future__ import annotations

import torch

from .. import policy
from .common import REDUCE_MAX_ROWS, adapter_linear, tokens
from .cpp import LOW_RANK_DTYPES


def fusable(site, names: tuple) -> bool:
    """One active output-attached low-rank adapter (no input adapter): its down-projection can join its
    siblings'."""
    if len(names) != 1 or names[0] not in site.slots:
        return False
    spec = site.slots[names[0]].spec
    return spec.low_rank is not None and spec.attach == "output"


def _named_fn(fn, sites, prefix: str, base):
    fn.__name__ = fn.__qualname__ = (
        f"qpass_{prefix}_" + "_".join(s.path.rsplit(".", 1)[-1] for s in sites) if len(sites) > 1
        else "qpass_site_" + sites[0].path.replace(".", "_"))
    fn.qpass_constants = list(base.constants)
    fn.qpass_lowering = base.lowering
    return fn


def lower_site(site, names: tuple, base):
    """One site: the spec's math (`Site.run`) around `base`. The function takes a fifth argument, the
    tensors listed in `fn.qpass_constants` (the rewrite passes them as graph tensors)."""

    def fn(x, xa, own, adapter, kernel=()):
        return site.run(x, list(xa), list(own), list(adapter), names, lambda h, b: base(h, [b], list(kernel))[0])

    return _named_fn(fn, [site], "site", base)


def lower_bases(sites: list, base):
    """Sibling sites with no active adapter (all disabled): their bases from one `base` call."""

    def fn(x, xa, bases, adapters, kernel=()):
        return tuple(base(x, bases, list(kernel)))

    return _named_fn(fn, sites, "bases", base)


def _downs(h, weights: list, ranks: list, reduce: bool) -> list:
    """Each site's down-projection h @ A^T: per site in the multiply + sum form (`reduce`, which fuses per
    site; concatenating would copy every A) or alone, else one GEMM for every sibling."""
    if reduce or len(weights) == 1:
        return [adapter_linear(h, a, reduce=reduce) for a in weights]
    return adapter_linear(h, torch.cat(weights, 0)).split(ranks, -1)


def lower_group(sites: list, names: tuple, base, needs_grad: bool = False, pooled: bool = False):
    """Sibling sites with the same input and one active low-rank adapter each: `(x, xa, bases, adapters) ->
    tuple of outputs`, xa the shared adapter input. A group of one site is the same math for a single site.
    `pooled` (only where `base.reads_pool`): each site's adapters are the model's adapter pool [data,
    scalings], read by the kernel at each slot's entry. The siblings' adapter is one adapter name, so one spec:
    one `LowRank` declaration, and one `down_input` of xa for all of them."""
    slots = [s.slots[names[0]] for s in sites]
    decl = slots[0].spec.low_rank
    ranks = [slot.get(decl.a).shape[0] for slot in slots]
    pols = [s.policy(slot) for s, slot in zip(sites, slots)]
    biased = decl.bias is not None and any(decl.bias in slot.tensor_names for slot in slots)
    if pooled and not base.reads_pool:
        raise ValueError(f"qpass: a pooled sibling group cannot take the {base.lowering} lowering")
    entries = [slot.pool_entry for slot in slots] if pooled else None

    def fn(x, xa, bases, adapters, kernel=()):
        if pooled:
            data, scalings = adapters[0]
            return tuple(base.pooled(x, bases, data, scalings, entries))
        ps = [dict(zip(slot.tensor_names, a)) for slot, a in zip(slots, adapters)]
        a_s, b_s, s_s = [decl.down(p) for p in ps], [p[decl.b] for p in ps], [decl.scale(p) for p in ps]
        # A kernel that takes the delta into its call rounds t and s B to x's dtype (dequant-cpu) or adds the delta
        # before the output's rounding (gemv-cpu); the `float32` policy (PEFT's SVDQuantLinear) keeps the whole
        # delta in float32 and adds it afterwards, so with x narrower than float32 its delta stays in the graph.
        in_kernel = not biased and (x.dtype == torch.float32 or "float32" not in pols)
        # a kernel that takes the whole adapter computes x A^T itself, so it needs f(x) = x
        readable = decl.down_input is None and all(a.dtype == b.dtype in LOW_RANK_DTYPES for a, b in zip(a_s, b_s))
        if base.takes_low_rank and in_kernel and readable:
            return tuple(base.low_rank(x, bases, [(a, b, s.float()) for a, b, s in zip(a_s, b_s, s_s)]))
        h = xa if decl.down_input is None else decl.down_input(xa, a_s[0])
        if base.takes_folded_up and in_kernel:
            downs = _downs(h, a_s, ranks, reduce=False)
            # (s B)^T written contiguous by the graph's own kernel (the GEMM copies its rows chunk by chunk)
            ups = [(t.to(x.dtype), (b * s).to(x.dtype).t().contiguous()) for t, b, s in zip(downs, b_s, s_s)]
            return tuple(base.folded_up(x, bases, ups))
        ys = base(x, bases, list(kernel))
        rows = tokens(xa)
        reduce = not needs_grad and rows is not None and rows <= REDUCE_MAX_ROWS
        downs = _downs(h, a_s, ranks, reduce)
        outs = []
        for y, t, p, b, s, pol in zip(ys, downs, ps, b_s, s_s, pols):
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            bias = p.get(decl.bias) if decl.bias is not None else None
            outs.append(policy.add_output(pol, y, adapter_linear(t, b, bias, reduce=reduce) * s))
        return tuple(outs)

    return _named_fn(fn, sites, "siblings", base)
