"""Quantization matchers: one file per library, each recognising its quantized-linear classes.

A matcher answers, for any module, either None (not mine), a `QuantInfo` (a site qpass can rewrite) or
an `Unsupported` (mine, but this layout/bit width cannot be served; the reason goes in the report).
Each matcher also says how the base matmul can be computed (`lowerings`) and implements them.
Adding a library = adding one matcher file and listing it in `MATCHERS`.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


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
    # How the base can be computed, best first: "torch-dequant" (plain torch, inductor fuses it) ...
    lowerings: tuple = ("torch-dequant",)
    matcher: object = field(default=None, compare=False, repr=False)
    # Base computation outside torch.compile: "library" (the layer's own forward) or "torch" (`torch_forward`),
    # for layers whose own forward cannot run here (no CPU kernel, no backward) or repacks its buffers in place.
    eager_base: str = "library"

    @property
    def group(self) -> int:
        """Input rows per quantization group (group_size -1/0 means one group over all of them)."""
        return self.in_features if self.group_size in (-1, 0) else self.group_size

    # Copying and pickling (a prepared model must survive copy.deepcopy, pickle and torch.save). The info is
    # immutable, so a deep copy is the info itself. The matcher is a module (qpass.quant.gptqmodel) or a
    # namespace in one (qpass.quant.layouts.awq): code compares it by identity (`info.matcher is layouts.awq`),
    # and neither pickles by value, so it travels as its import path and is imported again on load.
    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        return {**self.__dict__, "matcher": _matcher_path(self.matcher)}

    def __setstate__(self, state):
        state = dict(state)
        state["matcher"] = _import_matcher(state["matcher"])
        for name, value in state.items():
            object.__setattr__(self, name, value)  # frozen


def _matcher_path(matcher):
    """(module name, attribute or None) naming `matcher`, or the matcher itself if it is neither a module nor
    a namespace of the quant modules (pickled by value then, if it can be)."""
    if matcher is None:
        return None
    if isinstance(matcher, types.ModuleType):
        return (matcher.__name__, None)
    from . import layouts

    for module in (layouts, *_matchers()):
        for name, value in vars(module).items():
            if value is matcher:
                return (module.__name__, name)
    return matcher


def _import_matcher(path):
    if not isinstance(path, tuple):
        return path
    module = importlib.import_module(path[0])
    return module if path[1] is None else getattr(module, path[1])


@dataclass(frozen=True)
class Unsupported:
    library: str
    cls_name: str
    reason: str


def _matchers() -> list:
    from . import autoawq as _autoawq
    from . import gptqmodel as _gptqmodel
    from . import gptqmodel_awq as _gptqmodel_awq

    return [_gptqmodel, _gptqmodel_awq, _autoawq]


def match(module: nn.Module):
    """QuantInfo | Unsupported | None for `module`."""
    for m in _matchers():
        found = m.match(module)
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
    return info.matcher.torch_forward(info, x, tensors)
