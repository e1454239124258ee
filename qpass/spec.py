"""Pattern specs: what one adapter kind computes, which parameters it owns, and how it treats dtypes.

A spec is declared once (one small file under `patterns/`) and applied by the engine to every matching
quantized site, whatever library quantized it. Adding an adapter kind = adding one spec file and calling
`register(spec)`; nothing in the engine changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Optional

import torch
from torch import nn

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
    """A trainable tensor of the adapter; `init` fills it in place (under no_grad)."""

    shape: tuple
    init: Callable[[torch.Tensor], None]


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

    def __post_init__(self):
        if self.dtype_policy not in POLICIES:
            raise QpassError(f"spec {self.name!r}: dtype_policy must be one of {POLICIES}; got {self.dtype_policy!r}")
        if self.attach not in ("output", "input"):
            raise QpassError(f"spec {self.name!r}: attach must be 'output' or 'input'; got {self.attach!r}")


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


_loaded = False


def _load_builtin_patterns() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        import qpass.patterns  # noqa: F401  (each spec file registers itself on import)


class AdapterSlot(nn.Module):
    """One adapter on one site: its parameters under PEFT's dotted names, and its constants as buffers."""

    def __init__(self, spec: AdapterSpec, cfg, shape: SiteShape, dtype: torch.dtype, device):
        super().__init__()
        self.spec = spec
        self.cfg = cfg
        self.param_names: list = []
        for name, decl in spec.params(shape, cfg).items():
            tensor = torch.empty(decl.shape, dtype=dtype, device=device)
            with torch.no_grad():
                decl.init(tensor)
            self._set(name, nn.Parameter(tensor))
            self.param_names.append(name)
        self.constant_names: list = []
        for name, value in spec.constants(shape, cfg).items():
            self.register_buffer(name, torch.tensor(float(value), dtype=torch.float32, device=device), persistent=False)
            self.constant_names.append(name)
        self.tensor_names = self.param_names + self.constant_names
        self.dropout_p = float(spec.dropout(cfg))

    def _set(self, dotted: str, value) -> None:
        owner = self
        *parents, leaf = dotted.split(".")
        for part in parents:
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]
        owner.register_parameter(leaf, value)

    def get(self, dotted: str) -> torch.Tensor:
        owner = self
        *parents, leaf = dotted.split(".")
        for part in parents:
            owner = owner._modules[part]
        return getattr(owner, leaf)

    def tensors(self) -> list:
        return [self.get(n) for n in self.tensor_names]

    @property
    def dtype(self) -> torch.dtype:
        return self.get(self.param_names[0]).dtype if self.param_names else torch.float32

    def extra_repr(self) -> str:
        return f"spec={self.spec.name}, policy={self.spec.dtype_policy}, rank={self.spec.rank(self.cfg)}"
