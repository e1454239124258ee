"""Lowerings: how a site's quantized matmul is computed under torch.compile.

A lowering is a registered object with
- `accepts(site, x, needs_grad)`: it can run this site (an explicit `QpassBackend(lowering=...)` request);
- `applies(site, x, needs_grad)`: "auto" picks it (tried in registration order, torch-dequant last);
- `base(sites, needs_grad, switches)`: the `Base` (qpass.lowering.common) computing one site or sibling sites.
`x` is the site's input as the graph sees it (a fake tensor): device, dtype and token count decide.

| name          | computes                                                              | module         |
|---------------|-----------------------------------------------------------------------|----------------|
| gemv-cpu      | qpass's C++ GEMV on the library's 4-bit buffers, adapters in the call | cpp.py         |
| dequant-cpu   | qpass's C++ unpack into the activation dtype + GEMM, no copy kept     | cpp.py         |
| int4pack-cpu  | aten's CPU int4 kernel on a repacked copy (or the layout held)        | int4pack.py    |
| gemv-cuda     | qpass's Triton GEMV on the library's buffers, adapters in the call    | triton.py      |
| int4pack-cuda | aten's tinygemm on a repacked copy                                    | int4pack.py    |
| mm-cuda       | qpass's Triton dequant-GEMM (and dx) on the library's buffers; opt-in | triton_mm.py   |
| torch-dequant | plain-torch dequantize + matmul (`Layout.torch_forward`), any site     | torch_dequant.py |

Around the base, `low_rank.py` builds the function the rewrite splices in: the spec's math for one site, or
one down-projection for sibling low-rank adapters. Which layouts a kernel reads is the layout's answer
(`Layout.cpp_family`, `gemv_packing`, `int4_ok`), never a test of which layout it is. docs/design.md gives the reasons for
each rule.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from .common import DECODE_MAX_TOKENS, REDUCE_MAX_ROWS, adapter_linear, repacked_bytes  # noqa: F401 (public)
from .cpp import DequantCpu, GemvCpu
from .int4pack import GROUPS, Int4pack, codes_ok, codes_scales_zeros, pack, packed_for  # noqa: F401 (public)
from .int4pack import fallback_reason as _int4_fallback_reason
from .low_rank import fusable, lower_bases, lower_group, lower_site
from .torch_dequant import TorchDequant, derived_for  # noqa: F401 (public)
from .triton import GemvCuda
from .triton_mm import MmCuda

# Switches, read when a graph is lowered (tests turn them off to compare with the separate form):
# gemv-cpu takes each site's whole low-rank adapter into its kernel call (and reads it from the adapter pool);
GEMV_LORA = True
# dequant-cpu folds the up-projection (or the whole low-rank adapter) into its GEMM.
FOLD_UP = True


class Switches(NamedTuple):
    gemv_low_rank: bool
    fold_up: bool


def switches() -> Switches:
    return Switches(GEMV_LORA, FOLD_UP)


_REGISTRY: dict = {}  # name -> lowering, in the order "auto" tries them
LOWERINGS: tuple = ("auto",)


def register_lowering(lowering, *, before: Optional[str] = None):
    """Add `lowering` (see the module docstring) to the registry, tried by "auto" before `before` (default:
    before torch-dequant, the fallback, which is always last). Returns it."""
    global LOWERINGS
    if lowering.name in _REGISTRY:
        raise ValueError(f"a lowering named {lowering.name!r} is already registered")
    items = list(_REGISTRY.items())
    anchor = before if before is not None else ("torch-dequant" if "torch-dequant" in _REGISTRY else None)
    at = next((i for i, (name, _) in enumerate(items) if name == anchor), len(items))
    items.insert(at, (lowering.name, lowering))
    _REGISTRY.clear()
    _REGISTRY.update(items)
    LOWERINGS = ("auto",) + tuple(_REGISTRY)
    return lowering


def get(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown base lowering {name!r}; one of {LOWERINGS}")
    return _REGISTRY[name]


for _builtin in (TorchDequant(), GemvCpu(), DequantCpu(), Int4pack("cpu"), GemvCuda(), Int4pack("cuda"), MmCuda()):
    register_lowering(_builtin)


def choose(site, x, needs_grad: bool, requested: str = "auto") -> str:
    """The lowering for `site` given its input (a fake tensor from the graph) and whether the graph needs
    gradients. An explicit request other than "auto" is honoured where it can run, else torch-dequant."""
    if requested != "auto":
        get(requested)
    if requested == "torch-dequant" or x is None:
        return "torch-dequant"
    if requested != "auto":
        return requested if get(requested).accepts(site, x, needs_grad) else "torch-dequant"
    return next(name for name, low in _REGISTRY.items() if low.applies(site, x, needs_grad))


def label(name: str) -> str:
    """What the report calls a lowering."""
    low = _REGISTRY.get(name)
    return low.label if low is not None else name


def fallback_reason(site, x, needs_grad: bool, chosen: str) -> Optional[str]:
    return _int4_fallback_reason(site, x, needs_grad, chosen)


def shares_bare_call(name: str) -> bool:
    """Siblings with no active adapter on this lowering compute their bases in one call."""
    return getattr(_REGISTRY.get(name), "shares_bare_call", False)


def reads_pool(name: str, needs_grad: bool) -> bool:
    """A sibling group on this lowering reads its adapters from the model's adapter pool as it is."""
    fn = getattr(_REGISTRY.get(name), "reads_pool", None)
    return fn is not None and fn(needs_grad, switches())


def base_for(sites, lowering: str, needs_grad: bool):
    return get(lowering).base(sites, needs_grad, switches())


def lowered_site(site, names: tuple, lowering: str, needs_grad: bool = False):
    """One site's function for the graph (`Site.lowered`)."""
    return lower_site(site, names, base_for([site], lowering, needs_grad))


def lowered_group(sites: list, names: tuple, lowering: str, needs_grad: bool = False, pooled: bool = False):
    """Sibling sites with one active low-rank adapter each (`fusable`), or none (disabled): one function."""
    base = base_for(sites, lowering, needs_grad)
    if not names:
        return lower_bases(sites, base)
    return lower_group(sites, names, base, needs_grad, pooled)
