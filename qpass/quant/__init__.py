"""Quantization matchers: one file per library, each recognising its quantized-linear classes.

A matcher answers, for any module, either None (not mine), a `QuantInfo` (a site qpass can rewrite) or
an `Unsupported` (mine, but this layout/bit width cannot be served; the reason goes in the report).
A `QuantInfo` names the registered `Layout` (qpass.quant.layout) of the tensors the module holds: the layout
computes the base and says which kernels can read it.
Adding a library = one matcher file that calls `register_matcher` (and `register_layout`, if its packing is
new); the built-in libraries below are registered the same way, on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .layout import Layout, register_layout  # noqa: F401 (public: qpass.quant.register_layout)


@dataclass(frozen=True)
class QuantInfo:
    library: str
    cls_name: str
    method: str  # "gptq" | "awq"
    bits: int
    group_size: int
    sym: Optional[bool]
    desc_act: bool
    in_features: int
    out_features: int
    buffers: tuple  # names of the module tensors the base computation reads, in order
    layout: Layout = field(default=None, compare=False, repr=False)
    # Base computation outside torch.compile: "library" (the layer's own forward) or "torch" (`torch_forward`),
    # for layers whose own forward cannot run here (no CPU kernel, no backward) or repacks its buffers in place.
    eager_base: str = "library"

    @property
    def group(self) -> int:
        """Input rows per quantization group (group_size -1/0 means one group over all of them)."""
        return self.in_features if self.group_size in (-1, 0) else self.group_size

    # Immutable, so a deep copy is the info itself; the layout pickles as its registered name.
    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class Unsupported:
    library: str
    cls_name: str
    reason: str


_REGISTERED: list = []  # matchers added by register_matcher, asked after the built-in ones


def register_matcher(match_fn):
    """Add a quantization library: `match_fn(module) -> QuantInfo | Unsupported | None`, asked for every module
    `prepare` visits, after the built-in libraries. Returns it (usable as a decorator)."""
    if match_fn not in _REGISTERED:
        _REGISTERED.append(match_fn)
    return match_fn


def _matchers() -> list:
    from . import autoawq as _autoawq
    from . import gptqmodel as _gptqmodel
    from . import gptqmodel_awq as _gptqmodel_awq

    return [_gptqmodel.match, _gptqmodel_awq.match, _autoawq.match, *_REGISTERED]


def match(module: nn.Module):
    """QuantInfo | Unsupported | None for `module`."""
    for m in _matchers():
        found = m(module)
        if found is not None:
            return found
    return None


def normal_storage(module: nn.Module, names=None) -> list:
    """Replace buffers made under `torch.inference_mode` (gptqmodel packs that way) by normal copies, which
    autograd can save for backward. Only `names` if given. Returns [(name, original)] for an undo."""
    replaced = []
    for name, buf in list(module._buffers.items()):
        if buf is not None and buf.is_inference() and (names is None or name in names):
            replaced.append((name, buf))
            module._buffers[name] = buf.clone()
    return replaced


def base_forward(info: QuantInfo, x: torch.Tensor, tensors: list) -> torch.Tensor:
    """The quantized base computed in plain torch from the module's own buffers: y = x @ W + bias."""
    return info.layout.torch_forward(info, x, tensors)
