"""The `qpass::site` custom op: each prepared quantized layer is exactly one node of the dynamo graph.

The prepared module calls this op while dynamo traces it, passing everything the site reads as
arguments (input, adapter inputs, the base's buffers, the adapters' tensors), so dynamo lifts them as
graph inputs and no quantization-library code is traced (no graph breaks). The qpass backend replaces
each node by the site's decomposed math (`Site.lowered`) before inductor sees the graph.

When a graph reaches another backend unrewritten, the op still works: its kernel is the same math, its
fake kernel gives the output's shape, and its autograd formula recomputes the site under `torch.func.vjp`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import site as _site

OP_NAME = "qpass::site"


def join_names(names) -> str:
    """Active adapter names travel as one comma-joined string (they are identifiers)."""
    return ",".join(names)


def split_names(names: str) -> tuple:
    return tuple(n for n in names.split(",") if n)


class SiteArgs(NamedTuple):
    """A `qpass::site` node's arguments by name. `pooled`: the adapter tensors are the model's adapter pool
    ([data, scalings], qpass.pool) rather than the active slots' own tensors; only traces without gradients
    are pooled, so the op's backward never sees a pooled call (dynamo guards grad mode)."""

    x: object
    xa: list
    base: list
    adapter: list
    site_key: str
    names: tuple
    pooled: bool

    @classmethod
    def of(cls, node) -> "SiteArgs":
        x, xa, base, adapter, site_key, names, *rest = node.args
        pooled = rest[0] if rest else node.kwargs.get("pooled", False)
        return cls(x, list(xa), list(base), list(adapter), site_key, split_names(names), bool(pooled))


def adapter_tensors(site, adapter: list, names: tuple, pooled: bool) -> list:
    """The active slots' tensors, in order: the op's own list, or views of the pool it was given."""
    if not pooled:
        return list(adapter)
    from . import pool

    return pool.expand([site.slots[n] for n in names], list(adapter))


@torch.library.custom_op(OP_NAME, mutates_args=())
def site_op(
    x: torch.Tensor,
    xa: list[torch.Tensor],
    base: list[torch.Tensor],
    adapter: list[torch.Tensor],
    site_key: str,
    names: str,
    pooled: bool = False,
) -> torch.Tensor:
    site = _site.get(site_key)
    names = split_names(names)
    return site.run(x, xa, base, adapter_tensors(site, adapter, names, pooled), names, site.torch_base)


@site_op.register_fake
def _(x, xa, base, adapter, site_key, names, pooled=False):
    site = _site.get(site_key)
    return x.new_empty((*x.shape[:-1], site.info.out_features))


def _setup_context(ctx, inputs, output):
    x, xa, base, adapter, site_key, names, *_ = inputs  # never pooled (see SiteArgs)
    ctx.site_key = site_key
    ctx.names = split_names(names)
    ctx.counts = (len(xa), len(base), len(adapter))
    ctx.save_for_backward(x, *xa, *base, *adapter)


def _backward(ctx, grad):
    n_xa, n_base, n_adapter = ctx.counts
    saved = ctx.saved_tensors
    x = saved[0]
    xa = list(saved[1 : 1 + n_xa])
    base = list(saved[1 + n_xa : 1 + n_xa + n_base])
    adapter = list(saved[1 + n_xa + n_base :])
    site = _site.get(ctx.site_key)
    float_adapter = [t.is_floating_point() for t in adapter]

    def f(x, xa, trainable):
        it = iter(trainable)
        full = [next(it) if flt else t for t, flt in zip(adapter, float_adapter)]
        return site.run(x, xa, base, full, ctx.names, site.torch_base)

    trainable = [t for t, flt in zip(adapter, float_adapter) if flt]
    _, vjp = torch.func.vjp(f, x, xa, trainable)
    gx, gxa, gtrain = vjp(grad)
    it = iter(gtrain)
    gadapter = [next(it) if flt else None for flt in float_adapter]
    # one entry per input as called: torch 2.11's dispatcher drops a trailing `pooled` equal to its default and
    # then wants no entry for it (2.14 takes either count)
    return (gx, list(gxa), [None] * n_base, gadapter, None, None, None)[: len(ctx.needs_input_grad)]


site_op.register_autograd(_backward, setup_context=_setup_context)


def is_site_node(node) -> bool:
    return node.op == "call_function" and node.target in (torch.ops.qpass.site, torch.ops.qpass.site.default)
