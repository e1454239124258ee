"""Pattern specs, the declaration: what one adapter kind computes, which parameters it owns, and how it
treats dtypes.

A spec is declared once (one small file under `patterns/`) and applied by the engine to every matching
quantized site, whatever library quantized it. Adding an adapter kind = adding one spec file and calling
`register(spec)`; nothing in the engine changes. The runtime object a spec becomes on each targeted site
(its tensors, as a module of the model) is `qpass.slot.AdapterSlot`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Optional, Union

import torch

from .errors import QpassError
from .policy import POLICIES


@dataclass(frozen=True)
class SiteShape:
    """What a spec may know about the site it attaches to."""

    path: str
    in_features: int
    out_features: int
    bits: int
    group_size: int
    method: str  # "gptq" | "awq"


@dataclass(frozen=True)
class Param:
    """A trainable tensor of the adapter; `init` fills it in place (under no_grad).

    `rank_dim` names the dimension whose size is the adapter's rank, if any: slots can then be allocated at
    a larger rank (zero-padded, which leaves the output unchanged) so adapters of any rank up to it can be
    hot-swapped without recompiling, and `save_adapter` trims back to the adapter's own rank.
    """

    shape: tuple
    init: Callable[[torch.Tensor], None]
    rank_dim: Optional[int] = None


@dataclass(frozen=True)
class LowRank:
    """Declares that a spec's output-attached delta is a low-rank product over the spec's tensors `p`,

        delta = ((f(x) (A * E)^T) B^T + bias) * s

    on the adapter input x, with A (r, k), B (out_features, r), an optional bias (out_features), and:
    - `scaling`: s, the name of a 0-d float32 tensor, or a function of `p` giving one (AdaLoRA:
      scaling / (ranknum + 1e-5));
    - `rank_scale`: E, the name of an (r, 1) tensor scaling A's rows (AdaLoRA's `lora_E`), or None;
    - `down_input`: f, a function `(x, A) -> x'` applied before the down-projection (QA-LoRA's group pooling,
      k = in_features // G), or None (f(x) = x, k = in_features). Siblings share one f(x).

    What the fast paths read: sibling fusion (one down-projection for every sibling), the C++ kernels that fold
    the up-projection into the base GEMM or take the whole adapter into the call (those that compute x A^T
    themselves need `down_input` None), and the adapter pool (only a `plain` declaration: it holds the tensors
    as they are). `compute` must compute exactly this; the fused forms are checked against it
    (tests/test_low_rank_spec.py, tests/test_low_rank_variants.py)."""

    a: str = "lora_A.weight"
    b: str = "lora_B.weight"
    scaling: Union[str, Callable[[Mapping[str, torch.Tensor]], torch.Tensor]] = "scaling"
    bias: Optional[str] = "lora_B.bias"
    rank_scale: Optional[str] = None
    down_input: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None

    @property
    def plain(self) -> bool:
        """delta = ((x A^T) B^T + bias) * s with A, B and s stored as they are read (what the pool holds)."""
        return self.rank_scale is None and self.down_input is None and isinstance(self.scaling, str)

    def down(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The down-projection's weight: A, or A * E."""
        return p[self.a] if self.rank_scale is None else p[self.a] * p[self.rank_scale]

    def scale(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """s, the 0-d float32 factor of the delta."""
        return p[self.scaling] if isinstance(self.scaling, str) else self.scaling(p)


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    config: type
    attach: Literal["output", "input"]
    dtype_policy: str
    params: Callable[[SiteShape, object], dict]
    compute: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
    # Tensors the graph reads but the optimizer does not train (e.g. LoRA's scaling): name -> float.
    # Keeping them tensors means changing them (hot-swap, rank allocation) never recompiles.
    constants: Callable[[SiteShape, object], dict] = lambda site, cfg: {}
    applies: Callable[[object], bool] = lambda cfg: True
    formats: frozenset = frozenset({"gptq", "awq"})
    dropout: Callable[[object], float] = lambda cfg: 0.0
    rank: Callable[[object], int] = lambda cfg: getattr(cfg, "r", 0)
    check: Callable[[SiteShape, object], None] = lambda site, cfg: None
    description: str = ""
    # Optional: called outside the op before each forward, `(slot, training)`, to update the slot's tensors in
    # place under no_grad (OFT's COFT projection and block-dropout mask). Traced by dynamo; never recompiles.
    before_forward: Optional[Callable] = None
    # Optional: `(slot, adapter_config) -> {name: tensor}`, what `save_adapter` writes for a site (default: the
    # slot's parameters). AdaLoRA uses it to drop the ranks its allocator pruned, as PEFT does.
    export: Optional[Callable] = None
    # The config fields the traced forward reads outside the op (`before_forward`, the dtype policy): part of
    # each slot's guard key (qpass.guards). Fields read only inside the op (rank, alpha) are not: changing
    # them by hot-swap never recompiles.
    traced_config: tuple = ("dtype_policy",)
    # Optional: the structure of `compute`, where it is a low-rank product (see `LowRank`); a spec that
    # declares it gets the fused lowerings whatever its name.
    low_rank: Optional[LowRank] = None

    def __post_init__(self):
        if self.dtype_policy not in POLICIES:
            raise QpassError(f"spec {self.name!r}: dtype_policy must be one of {POLICIES}; got {self.dtype_policy!r}")
        if self.attach not in ("output", "input"):
            raise QpassError(f"spec {self.name!r}: attach must be 'output' or 'input'; got {self.attach!r}")

    def __reduce_ex__(self, protocol):
        """A registered spec pickles (and deep-copies) as its name: its functions are often lambdas, and code
        compares specs by identity (hot-swap: `spec is old_spec`). Loading needs it registered again."""
        if _REGISTRY.get(self.name) is self:
            return (_registered_spec, (self.name,))
        return super().__reduce_ex__(protocol)

    def apply(self, x: torch.Tensor, p: Mapping[str, torch.Tensor], cfg) -> torch.Tensor:
        """Run `compute`. It may take the site's config as a third argument, for static options that pick
        the math (e.g. OFT's Cayley vs Cayley–Neumann); tensors that change in training belong in `p`."""
        if _takes_config(self.compute):
            return self.compute(x, p, cfg)
        return self.compute(x, p)


def _takes_config(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [q for q in params if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(q.kind == q.VAR_POSITIONAL for q in params)


_REGISTRY: dict = {}


def register(spec: AdapterSpec, *, replace: bool = False) -> AdapterSpec:
    """Make `spec` available to `qpass.prepare`. Returns the spec, so a spec file can end with `SPEC = register(...)`."""
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise QpassError(f"an adapter spec named {spec.name!r} is already registered; pass replace=True to override it")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> dict:
    _load_builtin_patterns()
    return dict(_REGISTRY)


def spec_for(cfg) -> AdapterSpec:
    """The one registered spec that applies to `cfg`."""
    found = [s for s in registered().values() if isinstance(cfg, s.config) and s.applies(cfg)]
    if not found:
        raise QpassError(f"no adapter spec handles {type(cfg).__name__} with these options; registered: {sorted(_REGISTRY)}")
    if len(found) > 1:
        raise QpassError(f"several specs claim {type(cfg).__name__}: {[s.name for s in found]}; make their `applies` exclusive")
    return found[0]


def _registered_spec(name: str) -> AdapterSpec:
    spec = registered().get(name)
    if spec is None:
        raise QpassError(f"adapter spec {name!r} is not registered in this process; import the module that "
                         "registers it (qpass.register) before loading a model prepared with it")
    return spec


_loaded = False


def _load_builtin_patterns() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        # cycle: each spec file (qpass.patterns.*) imports this module to register itself
        import qpass.patterns  # noqa: F401
