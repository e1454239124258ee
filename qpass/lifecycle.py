"""Adapter lifecycle on a prepared model: several adapters, switching, disabling, hot-swapping weights.

What the compiled graph reads is either a tensor (weights, scalings: changed in place, never recompiles)
or a small piece of Python state dynamo guards on (which adapters are active, whether adapters are
disabled). Each combination of the latter is compiled once and then served from dynamo's cache, so
switching back and forth costs no recompile after the first time (up to dynamo's `recompile_limit`
cache entries per frame, 8 by default).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import adapter_io, transaction
from .errors import QpassError
from .prepare import plan_adapter
from .spec import spec_for
from .state import check_name, check_weights, install, set_active, state_of, unwrap


def load_adapter(model: nn.Module, adapter, adapter_name: str, *, is_trainable: bool = False) -> None:
    """Add another adapter (config or PEFT directory) to a prepared model. It is not activated (as in PEFT);
    `set_adapter` activates it. A failed load leaves the model as it was."""
    state = state_of(model)
    base = unwrap(model)
    check_name(adapter_name)
    if adapter_name in state.configs:
        raise QpassError(f"an adapter named {adapter_name!r} is already loaded; pick another name or use hotswap_adapter")
    cfg, spec, candidates, slots = plan_adapter(base, adapter, state.adapter_dtype, state.max_rank)
    missing = [path for path in slots if path not in state.sites]
    if missing:
        raise QpassError(f"{missing[0]}: not a site of this prepared model")
    with transaction.changing(base, "load_adapter"):
        install(state, base, cfg, slots, adapter_name, activate=False)
        if is_trainable:
            for slot in slots.values():
                slot.requires_grad_(True)


def set_adapter(model: nn.Module, names) -> None:
    """Activate one adapter (a name) or several (a list; their outputs add up, in order). The active ones train."""
    state = state_of(model)
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise QpassError(f"no adapter named {unknown[0]!r}; loaded adapters: {sorted(state.configs)}")
    if not names:
        raise QpassError("set_adapter needs at least one adapter name; use qpass.disable_adapters(model) for none")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise QpassError(f"set_adapter: {repeated[0]!r} is named more than once in {list(names)}; each adapter can be "
                         "active once (its output would be added twice)")
    with transaction.changing(unwrap(model), "set_adapter"):
        set_active(state, names)


def active_adapters(model: nn.Module) -> tuple:
    state = state_of(model)
    found = []
    for site in state.sites.values():
        for name in site.active:
            if name not in found:
                found.append(name)
    return tuple(found)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """`with qpass.disable_adapters(model): ...` runs the quantized base alone."""
    state = state_of(model)
    before = {path: site.disabled for path, site in state.sites.items()}
    with transaction.changing(unwrap(model), "disable_adapters"):
        for site in state.sites.values():
            site.disabled = True
    try:
        yield model
    finally:
        with state.lock.writing("disable_adapters"):
            for path, site in state.sites.items():
                site.disabled = before[path]


def hotswap_adapter(model: nn.Module, adapter, adapter_name: str = "default") -> None:
    """Replace the weights (and alpha/scaling) of `adapter_name` in place with another adapter of the same kind
    and targets. Ranks up to the slots' allocated rank (`max_rank` at prepare) fit; nothing recompiles."""
    state = state_of(model)
    if adapter_name not in state.configs:
        raise QpassError(f"no adapter named {adapter_name!r} to hot-swap; loaded adapters: {sorted(state.configs)}")
    if adapter_io.is_adapter_path(adapter):
        cfg, weights, source = adapter_io.read_config(adapter), adapter_io.read_weights(adapter), str(adapter)
    else:
        raise QpassError("hotswap_adapter needs a PEFT adapter directory (its weights replace the current ones)")
    spec = spec_for(cfg)
    slots = {path: site.slots[adapter_name] for path, site in state.sites.items() if adapter_name in site.slots}
    old_spec = next(iter(slots.values())).spec
    if spec is not old_spec:
        raise QpassError(f"{source}: a {spec.name!r} adapter cannot replace the {old_spec.name!r} adapter {adapter_name!r}")
    ranks = {}
    for path, slot in slots.items():
        site_cfg = cfg.for_site(path)
        rank = spec.rank(site_cfg)
        if rank != spec.rank(slot.cfg):
            if not slot.rank_dims:
                raise QpassError(f"{path}: {spec.name!r} adapters of another rank cannot be hot-swapped")
            if rank > slot.alloc_rank:
                raise QpassError(
                    f"{path}: the new adapter has rank {rank}, more than the {slot.alloc_rank} allocated; "
                    f"prepare with max_rank={rank} (or more) to hot-swap it"
                )
        ranks[path] = rank
    skipped = {r.module: r.status for r in state.report.rows if r.status.startswith("skipped")}
    plan = check_weights(slots, weights, source, skipped, ranks)
    written = [t for slot in slots.values() for t in slot.tensors()]
    # under the swap lock: a forward running in another thread sees A or B, never a mix
    with transaction.changing(unwrap(model), "hotswap_adapter", values=written), torch.no_grad():
        for path, slot in slots.items():
            slot.cfg = cfg.for_site(path)
            slot.set_constants(slot.cfg)
            slot.dropout_p = float(spec.dropout(slot.cfg))
        for slot, name, tensor in plan:
            slot.load(name, tensor)
        state.configs[adapter_name] = cfg
        for row in state.report.rows:
            if row.module in slots:
                row.rank = spec.rank(slots[row.module].cfg)
