"""Discovery and targeting: which modules of a model are candidate sites, which of them the config targets,
and why not.

PEFT's `target_modules` semantics: a list matches a module whose name equals an entry or ends with
"." + entry; a string is a regex that must match the whole name; "all-linear" means every quantized
linear layer (the output head is never quantized by GPTQ/AWQ, so it is not a candidate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from . import quant
from .quant import QuantInfo
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


DEFAULT_LAYER_PATTERNS = ["layers", "h", "blocks", "layer"]


def _layer_index(patterns, path: str):
    """(pattern, layer index) of `path`: the number after the first of `patterns` found in it, or None."""
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for pat in patterns:
        m = re.match(rf"(?:^|.*?\.){pat}\.(\d+)\.", path)  # PEFT's rule: the first match, also at the start
        if m:
            return pat, int(m.group(1))
    return None


def _wanted_layers(cfg: AdapterConfig) -> list:
    return [cfg.layers_to_transform] if isinstance(cfg.layers_to_transform, int) else list(cfg.layers_to_transform)


def _layer_ok(cfg: AdapterConfig, path: str) -> bool:
    """PEFT's layer filter (`check_target_module_exists`): none for None or an empty list, and none for a
    target_modules entry equal to the module's full name (it matches before the filter)."""
    wanted = cfg.layers_to_transform
    if wanted is None or (isinstance(wanted, (list, tuple)) and not wanted):
        return True
    if not isinstance(cfg.target_modules, str) and cfg.target_modules is not None and path in cfg.target_modules:
        return True
    found = _layer_index(cfg.layers_pattern or DEFAULT_LAYER_PATTERNS, path)
    return found is not None and found[1] in _wanted_layers(cfg)


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


def selection_error(model: nn.Module, cfg: AdapterConfig, candidates: list):
    """Why `cfg` targets no quantized layer although `target_modules` matches some: a QpassError naming the
    field that removed them all (`exclude_modules`, or `layers_to_transform` / `layers_pattern`, with the layer
    indices the model has), or None when `target_modules` itself matches none (`prepare._no_target_error`)."""
    targets = resolve_targets(model, cfg)
    named = [c.path for c in candidates if isinstance(c.info, QuantInfo) and (targets == "all-linear" or _matches(targets, c.path))]
    if not named:
        return None
    kept = [p for p in named if not _matches(cfg.exclude_modules, p)]
    if not kept:
        return QpassError(
            f"exclude_modules={cfg.exclude_modules!r} excludes every quantized layer target_modules={targets!r} matches "
            f"({len(named)}, e.g. {named[0]!r}); narrow exclude_modules or widen target_modules"
        )
    if cfg.layers_to_transform is None or any(_layer_ok(cfg, p) for p in kept):
        return None
    patterns = cfg.layers_pattern or DEFAULT_LAYER_PATTERNS
    found = {p: _layer_index(patterns, p) for p in kept}
    numbered = {p: f for p, f in found.items() if f is not None}
    if not numbered:
        default = {p: _layer_index(DEFAULT_LAYER_PATTERNS, p) for p in kept}
        default = {p: f for p, f in default.items() if f is not None}
        if cfg.layers_pattern and default:
            path, (pat, _) = next(iter(default.items()))
            indices = sorted({i for _, i in default.values()})
            return QpassError(
                f"layers_pattern={cfg.layers_pattern!r} is in none of the paths target_modules={targets!r} matches "
                f"(e.g. {path!r}), so layers_to_transform={cfg.layers_to_transform!r} selects nothing; set "
                f"layers_pattern to the name before the layer index (here {pat!r}: layers {indices}), or unset it"
            )
        return QpassError(
            f"layers_to_transform={cfg.layers_to_transform!r} selects nothing: the layers target_modules={targets!r} "
            f"matches have no layer index (a number after {patterns!r} in the path, e.g. {kept[0]!r}); unset "
            "layers_to_transform (and layers_pattern), or name the layers in target_modules"
        )
    indices = sorted({i for _, i in numbered.values()})
    path, (pat, _) = next(iter(numbered.items()))
    via = f" with layers_pattern={cfg.layers_pattern!r}" if cfg.layers_pattern else ""
    return QpassError(
        f"layers_to_transform={cfg.layers_to_transform!r}{via} selects none of the {len(kept)} quantized layers "
        f"target_modules={targets!r} matches: their layer indices (the number after {pat + '.'!r} in the path, e.g. "
        f"{path!r}) are {indices}; set layers_to_transform to some of {indices}, or unset it"
    )
