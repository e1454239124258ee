"""`prepare`: attach an adapter to every targeted quantized site, in eager, on the model itself.

Parameters are created here, before any tracing, as ordinary submodules of the quantized layer
(`<layer>.qpass_adapters.<adapter_name>`), so state_dict, optimizers, DDP and dynamo's guards all see
them. Each site's `forward` is replaced (on the instance) by one that, under torch.compile, calls the
`qpass::site` op — one graph node per site — and in eager runs the library's kernel plus the spec's math.

Everything that can be checked is checked before the model is touched; if anything still fails while
attaching, every change is undone, so a failed prepare leaves the model exactly as it was.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from . import adapter_io
from .config import AdapterConfig, to_config
from .errors import AdapterLoadError, QpassError
from .ops import join_names
from .quant import QuantInfo, Unsupported
from .report import Report, Row
from .site import Site
from .sites import discover
from .spec import AdapterSlot, SiteShape, spec_for

SLOTS_ATTR = "qpass_adapters"


@dataclass
class QpassState:
    """What qpass keeps on a prepared model (as `model._qpass`)."""

    sites: dict  # path -> Site
    configs: dict  # adapter name -> AdapterConfig
    report: Report
    requires_grad_before: dict = field(default_factory=dict)
    graph_break_mark: int = 0


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind a torch.compile wrapper."""
    return getattr(model, "_orig_mod", model)


def state_of(model: nn.Module) -> QpassState:
    state = getattr(unwrap(model), "_qpass", None)
    if state is None:
        raise QpassError(f"{type(unwrap(model)).__name__} is not prepared by qpass; call qpass.prepare(model, config) first")
    return state


def _site_forward(self, x: torch.Tensor) -> torch.Tensor:
    site: Site = self._qpass_site
    if x.shape[-1] != site.info.in_features:
        raise QpassError(
            f"{site.path}: input has {x.shape[-1]} features, the layer expects {site.info.in_features}"
        )
    names = site.active_names()
    slots = self.qpass_adapters
    if torch.compiler.is_compiling():
        xa = site.adapter_inputs(x, names, self.training)
        adapter = [t for n in names for t in slots[n].tensors()]
        return torch.ops.qpass.site(x, xa, site.base_tensors(), adapter, site.id, join_names(names))
    if not names:
        return type(self).forward(self, x)
    xa = site.adapter_inputs(x, names, self.training)
    adapter = [t for n in names for t in slots[n].tensors()]
    return site.run(x, xa, [], adapter, names, site.library_base)


def _device_of(module: nn.Module, info: QuantInfo) -> torch.device:
    return getattr(module, info.buffers[0]).device


def _build_slots(candidates, cfg: AdapterConfig, spec, adapter_dtype) -> dict:
    """path -> AdapterSlot for every targeted, supported site; raises naming the site on any check."""
    slots = {}
    for c in candidates:
        if not c.targeted or not isinstance(c.info, QuantInfo):
            continue
        info = c.info
        shape = SiteShape(c.path, info.in_features, info.out_features, info.bits, info.group_size, info.method)
        site_cfg = cfg.for_site(c.path)
        if info.method not in spec.formats:
            raise QpassError(f"{c.path}: adapter {spec.name!r} does not support {info.method} layers ({info.cls_name})")
        spec.check(shape, site_cfg)
        slots[c.path] = AdapterSlot(spec, site_cfg, shape, adapter_dtype, _device_of(c.module, info))
    return slots


def _load_into(slots: dict, weights: dict, source: str) -> None:
    expected = {f"{path}.{name}": (slot, name) for path, slot in slots.items() for name in slot.param_names}
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise AdapterLoadError(
            f"{source}: {len(unknown)} tensor(s) belong to no rewritten site of this model, e.g. {unknown[:3]}; "
            "was the adapter trained for another base model or other target_modules?"
        )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise AdapterLoadError(f"{source}: missing tensor(s) {missing[:3]} ({len(missing)} in all); the adapter file is incomplete")
    for key, (slot, name) in expected.items():
        target = slot.get(name)
        value = weights[key]
        if tuple(value.shape) != tuple(target.shape):
            raise AdapterLoadError(
                f"{source}: {key} has shape {tuple(value.shape)}, this model needs {tuple(target.shape)}; "
                "the adapter was trained for another base model or rank"
            )
    with torch.no_grad():
        for key, (slot, name) in expected.items():
            slot.get(name).copy_(weights[key])


def _rows(candidates, slots: dict, spec, cfg: AdapterConfig, adapter_name: str) -> list:
    rows = []
    for c in candidates:
        info = c.info
        if isinstance(info, QuantInfo):
            slot = slots.get(c.path)
            status = "prepared" if slot is not None else "skipped: not in target_modules"
            rows.append(Row.for_site(c.path, info, spec if slot else None, slot, adapter_name, status))
        elif isinstance(info, Unsupported):
            status = f"skipped: {info.reason}" if c.targeted else "skipped: not in target_modules"
            rows.append(Row.unsupported(c.path, info.library, info.cls_name, status))
        else:
            rows.append(Row.unsupported(c.path, "torch", c.cls_name, "skipped: not a quantized layer"))
    return rows


def prepare(model: nn.Module, adapter, *, adapter_name: str = "default", adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Attach `adapter` (a config, a peft config, or a PEFT adapter directory) to `model` in place; returns `model`."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise QpassError(
            "this model is already wrapped by torch.compile; call qpass.prepare / qpass.compile on the original "
            "module (model._orig_mod), then compile once"
        )
    if not isinstance(model, nn.Module):
        raise QpassError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if getattr(model, "_qpass", None) is not None:
        raise QpassError("this model is already prepared by qpass; prepare a fresh model")
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise QpassError(f"adapter_name must be a Python identifier; got {adapter_name!r}")

    weights = None
    source = "config"
    if adapter_io.is_adapter_path(adapter):
        source = str(adapter)
        cfg = adapter_io.read_config(adapter)
        weights = adapter_io.read_weights(adapter)
    else:
        cfg = to_config(adapter)
    spec = spec_for(cfg)

    candidates = discover(model, cfg)
    targeted = [c for c in candidates if c.targeted and isinstance(c.info, QuantInfo)]
    if not targeted:
        quantized = [c.path for c in candidates if c.info is not None]
        if not quantized:
            raise QpassError("the model has no quantized linear layer qpass recognises (gptqmodel GPTQ); nothing to adapt")
        plain = [c.path for c in candidates if c.info is None]
        hint = f" (it matched only non-quantized layers: {plain[:4]})" if plain else ""
        names = sorted({p.rsplit(".", 1)[-1] for p in quantized})
        raise QpassError(
            f"target_modules={cfg.target_modules!r} matches no quantized layer{hint}. "
            f"Quantized layers: {names} (e.g. {quantized[0]!r}); set target_modules to some of them or 'all-linear'"
        )
    slots = _build_slots(candidates, cfg, spec, adapter_dtype)
    if weights is not None:
        _load_into(slots, weights, source)

    rows = _rows(candidates, slots, spec, cfg, adapter_name)
    requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    sites = {}
    touched = []
    try:
        for c in targeted:
            site = Site.create(c.path, c.info, c.module)
            sites[c.path] = site
            container = nn.ModuleDict({adapter_name: slots[c.path]})
            c.module.add_module(SLOTS_ATTR, container)
            touched.append(c.module)
            site.slots = container
            site.active = (adapter_name,)
            c.module._qpass_site = site
            c.module.forward = types.MethodType(_site_forward, c.module)
        adapter_params = {id(p) for s in slots.values() for p in s.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in adapter_params)
        report = Report(rows=rows, model=model)
        state = QpassState(sites=sites, configs={adapter_name: cfg}, report=report,
                           requires_grad_before=requires_grad_before,
                           graph_break_mark=len(torch._dynamo.utils.graph_break_reasons))
        for site in sites.values():
            site.owner = weakref.ref(state)
        model._qpass = state
    except BaseException:
        _undo(model, touched, sites, requires_grad_before)
        raise
    return model


def _undo(model, touched, sites, requires_grad_before) -> None:
    for module in touched:
        for attr in (SLOTS_ATTR,):
            if attr in module._modules:
                del module._modules[attr]
        for attr in ("forward", "_qpass_site"):
            if attr in module.__dict__:
                del module.__dict__[attr]
    for site in sites.values():
        site.release()
    for name, p in model.named_parameters():
        if name in requires_grad_before:
            p.requires_grad_(requires_grad_before[name])
    if "_qpass" in model.__dict__:
        del model.__dict__["_qpass"]
