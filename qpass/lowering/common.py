"""What every lowering shares: the `Base` a lowering builds for its sites, the cache of tensors derived from
the sites' buffers, and the adapter matmul form for decode steps."""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from ..quant.layout import named


class Base:
    """The base computation (y = x W + bias) of one site or of sibling sites reading the same x, as a lowering
    builds it for the graph. `__call__(x, bases, kernel)` returns one y per site, in the activation dtype or
    wider; `bases` are the sites' own tensors (`info.buffers` order) and `kernel` the `constants`, both graph
    tensors. Kernels that can also compute a low-rank adapter in the same call say so (`takes_low_rank`,
    `takes_folded_up`, `reads_pool`) and implement the matching method."""

    lowering: str = ""  # what runs: a kernel lowering that cannot take these sites falls back to "torch-dequant"
    fused: bool = False  # one call computes every site's base
    constants: list = []  # tensors read besides the sites' own (repacked weights, derived scales)
    takes_low_rank = False  # `low_rank(x, bases, [(A, B, scaling)])`: the whole adapter in the kernel call
    takes_folded_up = False  # `folded_up(x, bases, [(t, (s B)^T)])`: the up-projection inside the GEMM
    reads_pool = False  # `pooled(x, bases, data, scalings, entries)`: A, B, scaling read from the adapter pool

    def __call__(self, x, bases, kernel) -> list:
        raise NotImplementedError

    def low_rank(self, x, bases, adapters) -> list:
        raise NotImplementedError

    def folded_up(self, x, bases, ups) -> list:
        raise NotImplementedError

    def pooled(self, x, bases, data, scalings, entries) -> list:
        raise NotImplementedError


def add_bias(site, y: torch.Tensor, base: list) -> torch.Tensor:
    bias = named(site.info, base).get("bias")
    return y if bias is None else y + bias.to(y.dtype)


def decode(x, needs_grad: bool) -> bool:
    n = tokens(x)
    return n is not None and n <= DECODE_MAX_TOKENS and not needs_grad


def tokens(x) -> Optional[int]:
    """Rows of x (all dims but the last), or None if symbolic: then it is not known to be a decode step."""
    n = 1
    for d in x.shape[:-1]:
        if not isinstance(d, int):
            return None
        n *= d
    return n


DECODE_MAX_TOKENS = 16  # at most this many tokens, and no gradient: a decode step
REDUCE_MAX_ROWS = 1  # adapter matmuls with at most this many rows (static) use the multiply + sum form


def adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias=None, *, reduce: bool = False) -> torch.Tensor:
    """F.linear for an adapter's small matmul. With `reduce` (one row, no gradient: a decode step) it is
    written as a multiply + sum in float32 instead, which inductor fuses with its neighbours into one loop
    instead of calling a GEMM library per projection; float32 accumulation as in the GEMM, one rounding at
    the end."""
    if not reduce:
        return F.linear(x, weight, bias)
    y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.promote_types(x.dtype, weight.dtype))


# ---- tensors derived once from the sites' buffers --------------------------------------------------------

_CACHE: dict = {}  # (kind, site ids) -> (buffer ids and versions, derived object with nbytes()/tensors())


def cached(kind: str, sites, make):
    """`make()` (tensors derived from `sites`' buffers) once per (kind, sites); re-made if a base buffer was
    replaced or changed in place. A None result is not cached. The entry goes when a site goes."""
    key = (kind, tuple(s.id for s in sites))
    versions = tuple((id(b), b._version) for s in sites for b in s.base_tensors())
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == versions:
        return hit[1]
    with torch.no_grad():
        made = make()
    if made is not None:
        _CACHE[key] = (versions, made)
        for s in sites:
            weakref.finalize(s, _CACHE.pop, key, None)
    return made


def repacked_bytes(sites=None) -> int:
    """Bytes held by repacked or derived weights (memory accounting): all of them, or those covering `sites`."""
    ids = None if sites is None else {s.id for s in sites}
    return sum(p.nbytes() for (_, key), (_, p) in _CACHE.items() if ids is None or ids & set(key))
