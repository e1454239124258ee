"""Discovery: which modules of a model are candidate sites, which of them the config targets, and why not.

PEFT's `target_modules` semantics: a list matches a module whose name equals an entry or ends with
"." + entry; a string is a regex that must match the whole name; "all-linear" means every quantized
linear layer (the output head is never quantized by GPTQ/AWQ, so it is not a candidate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from . import quant
from .config import DEFAULT_TARGETS, AdapterConfig
from .errors import QpassError


@dataclass
class Candidate:
    path: str
    module: nn.Module
    info: object  # QuantInfo | Unsupported | None (a plain nn.Linear the config named)
    targeted: bool

    @property
    def cls_name(self) -> str:
        return type(self.module).__name__


def _matches(spec, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == t or path.endswith("." + t) for t in spec)


def _layer_ok(cfg: AdapterConfig, path: str) -> bool:
    if cfg.layers_to_transform is None:
        return True
    wanted = [cfg.layers_to_transform] if isinstance(cfg.layers_to_transform, int) else list(cfg.layers_to_transform)
    patterns = cfg.layers_pattern or ["layers", "h", "blocks", "layer"]
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for pat in patterns:
        m = re.match(rf".*\.{pat}\.(\d+)\.", path)
        if m:
            return int(m.group(1)) in wanted
    return False


def resolve_targets(model: nn.Module, cfg: AdapterConfig):
    targets = cfg.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = DEFAULT_TARGETS.get(model_type)
        if targets is None:
            raise QpassError(
                f"`target_modules` is not set and qpass has no default for model_type={model_type!r}; "
                "pass target_modules (a list of module names, a regex, or 'all-linear')"
            )
    return targets


def discover(model: nn.Module, cfg: AdapterConfig, *, modules=None) -> list:
    """Every quantized-linear module of the model, plus plain nn.Linear modules the config names.
    `modules`: (path, module) pairs to look at instead of `model.named_modules()` (qpass.from_peft passes
    a PEFT model's modules with each adapter layer replaced by its base layer)."""
    targets = resolve_targets(model, cfg)
    out = []
    for path, module in model.named_modules() if modules is None else modules:
        if not path:
            continue
        info = quant.match(module)
        if targets == "all-linear":
            named = info is not None
        else:
            named = _matches(targets, path)
        targeted = named and not _matches(cfg.exclude_modules, path) and _layer_ok(cfg, path)
        if info is not None:
            out.append(Candidate(path, module, info, targeted))
        elif targeted and isinstance(module, nn.Linear):
            out.append(Candidate(path, module, None, True))
    return out
