"""`prepare`: make every quantized layer a traceable site and attach an adapter, in eager, on the model itself.

Every quantized layer qpass recognises becomes a site: its `forward` is replaced (on the instance) by one
that, under torch.compile, calls the `qpass::site` op — one graph node per layer, no library code traced,
no graph break — and in eager runs the library's kernel plus the adapters' math. Layers the config does
not target are sites too (base only), so they do not break the graph either.

Adapter parameters are created here, before any tracing, as ordinary submodules of the quantized layer
(`<layer>.qpass_adapters.<adapter_name>`), so state_dict, optimizers, DDP and dynamo's guards see them.

Everything that can be checked is checked before the model is touched; if anything still fails while
attaching, every change is undone, so a failed prepare leaves the model exactly as it was.

What qpass keeps on the prepared model (`QpassState`) and the steps of attaching an adapter that
`qpass.lifecycle` shares (`check_name`, `check_weights`, `install`) are in `qpass.state`.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
from torch import nn

from . import adapter_io, compile_hook, pool, resident, transaction
from .config import AdapterConfig, to_config
from .errors import QpassError
from .ops import join_names
from .quant import QuantInfo, Unsupported, normal_storage
from .report import Report, Row
from .site import Site
from .slot import AdapterSlot
from .spec import SiteShape, spec_for
from .state import SLOTS_ATTR, QpassState, check_name, check_weights, install, state_of, unwrap
from .targeting import discover, selection_error


def _site_forward(self, x: torch.Tensor) -> torch.Tensor:
    site: Site = self._qpass_site
    if x.shape[-1] != site.info.in_features:
        raise QpassError(f"{site.path}: input has {x.shape[-1]} features, the layer expects {site.info.in_features}")
    if not x.is_floating_point():
        raise QpassError(f"{site.path}: input dtype {x.dtype} cannot be served; pass float16, bfloat16 or float32 activations")
    device = getattr(self, site.info.buffers[0]).device
    if x.device != device:
        raise QpassError(f"{site.path}: input is on {x.device} but the layer's weights are on {device}; "
                         "move the model or the input so they match")
    names = site.active_names()
    slots = self.qpass_adapters
    if torch.compiler.is_compiling():
        # Branch on the guard keys so dynamo guards them (qpass.guards: with its filter, they stand in for
        # the guards on every field of the site and its adapters).
        if not site.trace_key or not all(slots[n].trace_key for n in names):
            raise QpassError(f"{site.path}: qpass state without a trace key")
        # no-grad steps read the model's adapter pool: 2 graph inputs, not 3 per site (not with dropout: the
        # pooled lowerings serve eval-shaped steps only)
        dropout = self.training and any(slots[n].dropout_p > 0 for n in names)
        found = None if dropout else pool.pooled(site, names)
        if found is not None:
            xa = site.adapter_inputs(x, names, self.training, found.data.dtype)
            return torch.ops.qpass.site(x, xa, site.base_tensors(), [found.data, found.scalings], site.key,
                                        join_names(names), True)
        xa = site.adapter_inputs(x, names, self.training, None)
        adapter = [t for n in names for t in slots[n].tensors()]
        return torch.ops.qpass.site(x, xa, site.base_tensors(), adapter, site.key, join_names(names))
    if not names:
        return site.eager_base(x)
    xa = site.adapter_inputs(x, names, self.training, None)
    adapter = [t for n in names for t in slots[n].tensors()]
    return site.run(x, xa, site.base_tensors(), adapter, names, site.eager_base_fn)


# ---- resolving what to attach ----------------------------------------------------------------------


def _resolve(adapter):
    """(config, weights or None, source) from a config object, a peft config, an adapter directory, or an
    adapter already in memory (`adapter_io.InMemoryAdapter`)."""
    if isinstance(adapter, adapter_io.InMemoryAdapter):
        return to_config(adapter.config), adapter.weights, adapter.source
    if adapter_io.is_adapter_path(adapter):
        return adapter_io.read_config(adapter), adapter_io.read_weights(adapter), str(adapter)
    return to_config(adapter), None, "config"


def _no_target_error(cfg, candidates) -> QpassError:
    quantized = [c.path for c in candidates if c.info is not None]
    if not quantized:
        return QpassError("the model has no quantized linear layer qpass recognises (gptqmodel / autoawq); nothing to adapt")
    plain = [c.path for c in candidates if c.info is None]
    hint = f" (it matched only non-quantized layers: {plain[:4]})" if plain else ""
    names = sorted({p.rsplit(".", 1)[-1] for p in quantized})
    return QpassError(
        f"target_modules={cfg.target_modules!r} matches no quantized layer{hint}. "
        f"Quantized layers: {names} (e.g. {quantized[0]!r}); set target_modules to some of them or 'all-linear'"
    )


def _build_slots(targeted, cfg: AdapterConfig, spec, adapter_dtype, max_rank=None) -> dict:
    """path -> AdapterSlot for every targeted site; raises naming the site on any failed check."""
    slots = {}
    for c in targeted:
        info = c.info
        shape = SiteShape(c.path, info.in_features, info.out_features, info.bits, info.group_size, info.method)
        site_cfg = cfg.for_site(c.path)
        if info.method not in spec.formats:
            raise QpassError(f"{c.path}: adapter {spec.name!r} does not support {info.method} layers ({info.cls_name})")
        spec.check(shape, site_cfg)
        if max_rank is not None and spec.rank(site_cfg) > max_rank:
            raise QpassError(f"{c.path}: rank {spec.rank(site_cfg)} exceeds max_rank={max_rank}; raise max_rank")
        device = getattr(c.module, info.buffers[0]).device
        slots[c.path] = AdapterSlot(spec, site_cfg, shape, adapter_dtype, device, alloc_rank=max_rank)
        if max_rank is not None and not slots[c.path].rank_dims:
            raise QpassError(f"max_rank: adapter kind {spec.name!r} has no rank dimension to pad; leave max_rank unset")
    return slots


def _load_into(slots: dict, weights: dict, source: str, skipped: dict) -> None:
    for slot, name, tensor in check_weights(slots, weights, source, skipped):
        slot.load(name, tensor)


def _rows(candidates) -> list:
    rows = []
    for c in candidates:
        if isinstance(c.info, QuantInfo):
            rows.append(Row.for_site(c.path, c.info))
        elif isinstance(c.info, Unsupported):
            reason = f"skipped: {c.info.reason}" if c.targeted else "skipped: not in target_modules"
            rows.append(Row.unsupported(c.path, c.info.library, c.info.cls_name, reason))
        else:
            rows.append(Row.unsupported(c.path, "torch", c.cls_name, "skipped: not a quantized layer"))
    return rows


# ---- the public entry --------------------------------------------------------------------------------


def prepare(model: nn.Module, adapter, *, adapter_name: str = "default", adapter_dtype: torch.dtype = torch.float32,
            max_rank: Optional[int] = None, base_layout: str = "library") -> nn.Module:
    """Attach `adapter` (a config, a peft config, or a PEFT adapter directory) to `model` in place; returns `model`.

    `max_rank` allocates rank-shaped parameters at that rank (zero-padded), so that adapters of any rank up
    to it can later be hot-swapped (`qpass.hotswap_adapter`) without recompiling.

    `base_layout="int4pack"` holds eligible 4-bit layers' weights once, in the CPU int4 kernel's layout,
    instead of the library's layout plus a repacked copy for decode (`qpass.resident`); "library" (default)
    leaves the library's buffers as they are.

    A `peft.PeftModel` (or a model holding PEFT's adapter layers) is refused: qpass would attach its adapter
    under PEFT's, and the two would run stacked. `qpass.from_peft(peft_model)` takes PEFT's adapters over.
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise QpassError(
            "this model is already wrapped by torch.compile; call qpass.prepare / qpass.compile on the original "
            "module (model._orig_mod), then compile once"
        )
    if not isinstance(model, nn.Module):
        raise QpassError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    _refuse_peft(model)
    if getattr(model, "_qpass", None) is not None:
        raise QpassError("this model is already prepared by qpass; use qpass.load_adapter(model, path, name) to add an adapter")
    check_options(adapter_name, max_rank, base_layout)
    compile_hook.install()  # idempotent: every torch.compile of a prepared model must find the pass in place
    cfg, spec, candidates, slots = plan_adapter(model, adapter, adapter_dtype, max_rank)

    requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    with transaction.changing(model, "prepare"):  # a failure at any point leaves the model as it was
        sites = {c.path: _make_site(c) for c in candidates if isinstance(c.info, QuantInfo)}
        layouts = _convert_layouts(sites, base_layout)
        state = QpassState(
            sites=sites, configs={}, report=Report(rows=_rows(candidates), model=model),
            requires_grad_before=requires_grad_before, graph_break_mark=len(torch._dynamo.utils.graph_break_reasons),
            max_rank=max_rank, adapter_dtype=adapter_dtype,
        )
        for site in sites.values():
            site.owner = weakref.ref(state)
        for row in state.report.rows:
            if row.module in layouts:
                row.base = layouts[row.module]
        install(state, model, cfg, slots, adapter_name)
        model._qpass = state
        transaction.install_lock(model)
    return model


def _convert_layouts(sites: dict, base_layout: str) -> dict:
    """base_layout="int4pack": convert every eligible site (`qpass.resident`); path -> report note."""
    if base_layout == "library":
        return {}
    notes, reasons = {}, {}
    for path, site in sites.items():
        reason = resident.convert(site)
        if reason is None:
            module = site.module
            module.train = _bound(nn.Module.train, module)  # the library's train()/eval() hooks repack
            notes[path] = "int4pack layout (resident), torch dequant (eager)"
        else:
            reasons[path] = reason
            notes[path] = f"library layout (not int4pack: {reason})"
    if reasons and len(reasons) == len(sites):
        path, reason = next(iter(reasons.items()))
        raise QpassError(f"base_layout='int4pack': no layer can be held in the int4pack layout, e.g. {path}: {reason}")
    return notes


def check_options(adapter_name, max_rank, base_layout) -> None:
    """`prepare`'s own arguments (the adapter aside)."""
    check_name(adapter_name)
    resident.check_layout(base_layout)
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0):
        raise QpassError(f"max_rank must be a positive integer or None; got {max_rank!r}")


def _refuse_peft(model: nn.Module) -> None:
    from .peft_interop import peft_layers  # cycle: peft_interop imports this module (from_peft)

    found = peft_layers(model)
    if found is not None:
        raise QpassError(
            f"{found}; qpass would attach its adapter under PEFT's and run both. Call qpass.from_peft(peft_model) "
            "to take PEFT's adapters over (it returns the base model prepared by qpass), or pass the base model "
            "without PEFT's layers"
        )


def plan_adapter(model: nn.Module, adapter, adapter_dtype, max_rank, *, modules=None):
    """Everything that can fail, before the model is touched: config, spec, targets, slots, weights.
    `modules`: see `targeting.discover`."""
    cfg, weights, source = _resolve(adapter)
    if isinstance(adapter, adapter_io.InMemoryAdapter):  # a folder's weights were checked as they were read
        adapter_io.check_finite(weights, source)
    spec = spec_for(cfg)
    candidates = discover(model, cfg, modules=modules)
    targeted = [c for c in candidates if c.targeted and isinstance(c.info, QuantInfo)]
    if not targeted:  # the field at fault: exclude_modules / layers_to_transform, else target_modules
        raise selection_error(model, cfg, candidates) or _no_target_error(cfg, candidates)
    slots = _build_slots(targeted, cfg, spec, adapter_dtype, max_rank)
    if weights is not None:
        skipped = {c.path: c.info.reason for c in candidates if isinstance(c.info, Unsupported)}
        _load_into(slots, weights, source, skipped)
    return cfg, spec, candidates, slots


def _bound(func, module: nn.Module):
    """`func` bound to `module`, to set on the instance (`module.forward = ...`). A partial, not a bound method:
    a bound method pickles as `getattr(module, func.__name__)`, which on load finds the class's own method (the
    library's forward), so a pickled or torch.save'd prepared model would silently lose its sites. A partial
    pickles as `func` plus the module; dynamo traces it like the method (no graph break, same guards)."""
    return functools.partial(func, module)


def _make_site(c) -> Site:
    module = c.module
    site = Site.create(c.path, c.info, module)
    normal_storage(module, c.info.buffers)
    module.add_module(SLOTS_ATTR, nn.ModuleDict())
    site.slots = module._modules[SLOTS_ATTR]
    site.active = ()
    module._qpass_site = site
    module.forward = _bound(_site_forward, module)
    if c.info.eager_base == "torch":
        # qpass computes this base itself, from the layout held now: the library's train()/eval() hooks
        # (which repack buffers, swap zero-point formats, or refuse train mode) must not change it under us.
        module.train = _bound(nn.Module.train, module)
    return site


def unprepare(model: nn.Module) -> nn.Module:
    """Remove qpass from a prepared model: original forwards back, adapters dropped, requires_grad restored."""
    model = unwrap(model)
    state = state_of(model)
    with transaction.changing(model, "unprepare"):
        pool.drop(state)
        for site in state.sites.values():
            resident.restore(site)  # base_layout="int4pack": the library's layout again, bit-exact
            module = site.module
            module._modules.pop(SLOTS_ATTR, None)
            module.__dict__.pop("forward", None)
            module.__dict__.pop("train", None)  # set for sites whose base qpass computes (eager_base == "torch")
            module.__dict__.pop("_qpass_site", None)
        for name, p in model.named_parameters():
            if name in state.requires_grad_before:
                p.requires_grad_(state.requires_grad_before[name])
        transaction.remove_lock(model)
        model.__dict__.pop("_qpass", None)
    for site in state.sites.values():  # after the change: a failed unprepare keeps them registered
        site.release()
    return model
