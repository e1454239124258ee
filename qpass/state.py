"""What qpass keeps on a prepared model, and the changes of it that `prepare` and the adapter lifecycle share.

`QpassState` (as `model._qpass`): the model's sites, its adapters' configs, its report, its adapter pool and its
swap lock. `state_of(model)` finds it (through a torch.compile wrapper: `unwrap`). The helpers below are the
steps of attaching and switching adapters that both `qpass.prepare` (the first adapter) and `qpass.lifecycle`
(load_adapter, set_adapter, hotswap_adapter) take: `check_name`, `check_weights`, `install`, `set_active`.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from . import pool, transaction
from .errors import AdapterLoadError, QpassError

if TYPE_CHECKING:  # qpass.report imports SLOTS_ATTR from here
    from .report import Report

# each quantized layer's adapters: `<layer>.qpass_adapters.<adapter_name>` (an nn.ModuleDict of AdapterSlots)
SLOTS_ATTR = "qpass_adapters"


@dataclass
class QpassState:
    """What qpass keeps on a prepared model (as `model._qpass`)."""

    sites: dict  # path -> Site (every recognised quantized layer)
    configs: dict  # adapter name -> AdapterConfig
    report: Report
    requires_grad_before: dict = field(default_factory=dict)
    graph_break_mark: int = 0
    graph_keys: set = field(default_factory=set)  # (compile id, sites) of each graph counted in the report
    max_rank: Optional[int] = None
    adapter_dtype: torch.dtype = torch.float32
    pool: pool.PoolState = field(default_factory=pool.PoolState)  # the adapter pool's state (qpass.pool)
    lock: transaction.SwapLock = field(default_factory=transaction.SwapLock)  # forwards read, changes write

    # Copying and pickling (copy.deepcopy, pickle, torch.save of the prepared model). A copy never shares a pool
    # with the original (`PoolState` copies as off and stale). Locks are not copied: an attribute holding a
    # threading primitive is dropped, and on load every field missing from the state gets its default
    # (`_fill_defaults`: a fresh lock from the field's default_factory; also the new fields of an older
    # pickle), so a lock must be a field with a default_factory.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, _LOCKS)}

    def __setstate__(self, state: dict) -> None:
        if "pool_stale" in state:  # pickled before `PoolState`: its pool was off, stale if it had one
            stale = state["pool_stale"]
            state = {k: v for k, v in state.items() if k not in ("pool", "pool_stale", "pool_retired")}
            state["pool"] = pool.PoolState(stale=stale)
        self.__dict__.update(state)
        _fill_defaults(self)
        # nn.Module's own copy drops `_compiled_call_impl`, where the swap lock's reading side sits; the model is
        # still being restored here, and the module's __setstate__ only adds its keys, so this one stays
        if self.report is not None:
            transaction.install_lock(self.report._model_ref)


_LOCKS = (type(threading.Lock()), type(threading.RLock()), threading.Condition, threading.Semaphore,
          threading.Event, threading.Barrier)


def _fill_defaults(obj) -> None:
    """Set every dataclass field of `obj` missing from its `__dict__` to its default."""
    for f in dataclasses.fields(obj):
        if f.name in obj.__dict__:
            continue
        if f.default_factory is not dataclasses.MISSING:
            obj.__dict__[f.name] = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            obj.__dict__[f.name] = f.default
        else:
            raise TypeError(f"{type(obj).__name__}.{f.name}: not in the pickled state and without a default")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind a torch.compile wrapper."""
    return getattr(model, "_orig_mod", model)


def state_of(model: nn.Module) -> QpassState:
    state = getattr(unwrap(model), "_qpass", None)
    if state is None:
        from .peft_interop import peft_layers  # cycle: peft_interop imports this module (from_peft)

        found = peft_layers(unwrap(model))
        if found is not None:
            raise QpassError(f"{found}, not a model prepared by qpass; call qpass.from_peft(peft_model) to take "
                             "PEFT's adapters over (it returns the prepared base model)")
        raise QpassError(f"{type(unwrap(model)).__name__} is not prepared by qpass; call qpass.prepare(model, config) first")
    return state


# ---- the steps prepare and the lifecycle share ------------------------------------------------------


def check_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise QpassError(f"adapter_name must be a Python identifier; got {adapter_name!r}")


def check_weights(slots: dict, weights: dict, source: str, skipped: dict, ranks: Optional[dict] = None) -> list:
    """Validate an adapter file against the slots; returns [(slot, name, tensor)] to load. `ranks` maps
    path -> the file adapter's rank when it differs from the slot's (hot-swap)."""
    expected = {f"{path}.{name}": (path, slot, name) for path, slot in slots.items() for name in slot.param_names}
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        on_skipped = sorted({k.rsplit(".", 2)[0] for k in unknown} & set(skipped))
        if on_skipped:
            raise AdapterLoadError(
                f"{source}: the adapter has weights for {on_skipped[:3]}, which qpass cannot serve "
                f"({skipped[on_skipped[0]]}); loading without them would silently change the model"
            )
        # a targeted layer's tensor of another name: the file does not match its config, not another base model
        on_targeted = [(k, max((p for p in slots if k.startswith(p + ".")), key=len)) for k in unknown
                       if any(k.startswith(p + ".") for p in slots)]
        if on_targeted:
            key, path = on_targeted[0]
            slot, extra = slots[path], key[len(path) + 1:]
            if extra == "lora_B.bias" and getattr(slot.cfg, "lora_bias", None) is False:
                why = "it was saved with lora_bias=True (a bias on lora_B) while its config says lora_bias=false"
            else:
                why = "it was saved with other options than its config says (e.g. lora_bias=True) or by another adapter kind"
            raise AdapterLoadError(
                f"{source}: layer {path} is targeted, but the tensor {extra!r} there is not one a {slot.spec.name!r} "
                f"adapter with this config has: that layer's tensors are {slot.param_names} ({len(on_targeted)} such "
                f"tensor(s), e.g. {[k for k, _ in on_targeted[:3]]}); {why}. Fix adapter_config.json to match how the "
                "adapter was trained, or re-save it"
            )
        raise AdapterLoadError(
            f"{source}: {len(unknown)} tensor(s) belong to no targeted layer of this model, e.g. {unknown[:3]}; "
            "was the adapter trained for another base model?"
        )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise AdapterLoadError(f"{source}: missing tensor(s) {missing[:3]} ({len(missing)} in all); the adapter file is incomplete")
    plan = []
    for key, (path, slot, name) in expected.items():
        have = tuple(weights[key].shape)
        want = slot.expected_shape(name, None if ranks is None else ranks.get(path))
        if have != want:
            raise AdapterLoadError(
                f"{source}: {key} has shape {have}, this model needs {want}; the adapter was trained for another base model or rank"
            )
        plan.append((slot, name, weights[key]))
    return plan


def install(state: QpassState, model: nn.Module, cfg, slots: dict, adapter_name: str, *, activate: bool = True,
            trainable: bool = True) -> None:
    """Put the built slots on their sites; if `activate`, make this the only active adapter and (if
    `trainable`) the only trainable parameters, as PEFT does."""
    for path, slot in slots.items():
        state.sites[path].slots[adapter_name] = slot
        state.sites[path].refresh_trace_key()
    state.configs[adapter_name] = cfg
    for row in state.report.rows:
        slot = slots.get(row.module)
        if slot is not None:
            row.add_adapter(adapter_name, slot)
    pool.build(state)  # every LoRA tensor of the model, the new ones too, as views of one pool
    if activate:
        adapter_params = {id(p) for site in state.sites.values() for p in site.slots.parameters()}
        for p in model.parameters():  # PEFT's semantics: the base is frozen
            if id(p) not in adapter_params:
                p.requires_grad_(False)
        set_active(state, (adapter_name,), trainable=trainable)
    else:
        for slot in slots.values():
            slot.requires_grad_(False)


def set_active(state: QpassState, names: tuple, *, trainable: bool = True) -> None:
    """Make `names` the active adapters of every site that has them; only their parameters train."""
    for site in state.sites.values():
        site.active = tuple(n for n in names if n in site.slots)
        for name, slot in site.slots.items():
            slot.requires_grad_(trainable and name in site.active)
