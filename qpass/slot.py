"""Adapter slots, the runtime: one adapter on one site, as a module of the model.

An `AdapterSlot` is what a spec (qpass.spec.AdapterSpec, the declaration) becomes on each targeted site: its
parameters under PEFT's dotted names (`lora_A.weight`, on `_Holder` submodules), its constants as buffers, and the
`trace_key` the compiled model guards (qpass.guards). Slots live at `<layer>.qpass_adapters.<adapter_name>`
(qpass.state.SLOTS_ATTR); while the model's adapter pool is built their tensors are views of it (qpass.pool).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from . import pool
from .spec import AdapterSpec, SiteShape


def _no_slot():
    """A holder's `_qpass_slot` when its slot was gone at pickling time."""
    return None


class _Holder(nn.Module):
    """A module under a slot holding some of its parameters (PEFT's dotted names: `lora_A.weight`). A
    parameter registered on it anew (`holder.weight = nn.Parameter(...)`, `load_state_dict(assign=True)`) is
    not a view of the adapter pool: the pool is turned off for the model (qpass.pool)."""

    def __init__(self, slot):
        super().__init__()
        object.__setattr__(self, "_qpass_slot", weakref.ref(slot))

    # Copying/pickling: the weak reference to the slot travels as a strong one and is weak again on load.
    def __getstate__(self):
        state = super().__getstate__()
        state["_qpass_slot"] = state["_qpass_slot"]()
        return state

    def __setstate__(self, state):
        slot = state["_qpass_slot"]
        super().__setstate__({**state, "_qpass_slot": weakref.ref(slot) if slot is not None else _no_slot})

    def register_parameter(self, name, param) -> None:
        slot = self.__dict__["_qpass_slot"]()
        if slot is not None:
            pool.invalidate_slot(slot)
        super().register_parameter(name, param)
        # What was registered here through the module API (qpass, `holder.weight = ...`, load_state_dict with
        # assign): the parameters qpass may move into a pool. FSDP2 swaps its own in through `_parameters[...]`
        # (no register_parameter), and those must stay where FSDP2 keeps them. Copies and pickles keep the
        # identity (one memo with `_parameters`).
        self.__dict__.setdefault("_qpass_registered", {})[name] = param

    def registered(self, name: str) -> bool:
        """Whether the parameter `name` holds now is the one last registered through `register_parameter`."""
        registered = self.__dict__.get("_qpass_registered")
        if registered is None:  # pickled before qpass kept this record: every parameter counts as registered
            return True
        return registered.get(name) is self._parameters.get(name)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        slot = self.__dict__["_qpass_slot"]()
        if slot is not None:
            pool.check_slot(slot)
        return out


class AdapterSlot(nn.Module):
    """One adapter on one site: its parameters under PEFT's dotted names, and its constants as buffers."""

    def __init__(self, spec: AdapterSpec, cfg, shape: SiteShape, dtype: torch.dtype, device, alloc_rank: Optional[int] = None):
        super().__init__()
        self.spec = spec
        self.cfg = cfg
        self.shape = shape
        self.param_names: list = []
        self.rank_dims: dict = {}
        rank = spec.rank(cfg)
        for name, decl in spec.params(shape, cfg).items():
            tensor = torch.empty(decl.shape, dtype=dtype, device=device)
            with torch.no_grad():
                decl.init(tensor)
            if decl.rank_dim is not None:
                self.rank_dims[name] = decl.rank_dim
                if alloc_rank is not None and alloc_rank > rank:
                    pad = list(tensor.shape)
                    pad[decl.rank_dim] = alloc_rank - rank
                    tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=decl.rank_dim)
            self._set(name, nn.Parameter(tensor))
            self.param_names.append(name)
        self.alloc_rank = max(rank, alloc_rank or 0)
        self.constant_names: list = []
        for name, value in spec.constants(shape, cfg).items():
            # a float, or an fp32 tensor (e.g. a per-block mask) that the graph reads
            tensor = torch.as_tensor(value, dtype=torch.float32, device=device).clone()
            self.register_buffer(name, tensor, persistent=False)
            self.constant_names.append(name)
        self.tensor_names = self.param_names + self.constant_names
        self.dropout_p = float(spec.dropout(cfg))
        self.refresh_trace_key()

    # The attributes the traced forward reads; assigning any of them refreshes `trace_key` (see qpass.guards).
    # The key also covers `pool_entry`, which qpass.pool refreshes whenever the model's pool state changes.
    trace_fields = ("spec", "cfg", "dropout_p", "tensor_names", "param_names", "constant_names")

    @property
    def pool_entry(self):
        """Where this slot's tensors sit in the model's adapter pool (a `qpass.pool.Entry`), or None: held by
        qpass.pool, not by the slot."""
        return pool.entry(self)

    def __setattr__(self, name, value):
        if name in getattr(self, "constant_names", ()) and isinstance(value, torch.Tensor):
            pool.invalidate_slot(self)  # a constant replaced: it no longer aliases the pool
        super().__setattr__(name, value)
        if name in self.trace_fields and "trace_key" in self.__dict__:
            self.refresh_trace_key()

    def register_parameter(self, name, param) -> None:
        pool.invalidate_slot(self)
        super().register_parameter(name, param)

    def _apply(self, fn, recurse=True):
        """`model.to(...)` and kin: if this slot's tensors were moved or converted, they left the pool."""
        out = super()._apply(fn, recurse)
        pool.check_slot(self)
        return out

    # Copying/pickling (with the model): a copy is never in a pool. The weak reference to the original's
    # QpassState (`pool._OWNER`) is dropped; the pickled state records the entry the slot had (`pool_entry`),
    # and a slot that was pooled gets tensors of its own storage (pickle keeps them views of the copied pool
    # tensor, which is no pool: `pool.build` would not take them), so the copy's QpassState can build its own
    # pool (qpass.pool) and nothing aliases the original's.
    def __getstate__(self):
        state = super().__getstate__()
        state.pop(pool._OWNER, None)
        state.pop("trace_key", None)
        state["pool_entry"] = self.pool_entry
        return state

    def __setstate__(self, state):
        state = dict(state)
        pooled = state.pop("pool_entry", None) is not None
        super().__setstate__(state)
        if pooled:
            for t in self.tensors():
                if not pool._own(t, ()):
                    t.data = t.data.clone()
        self.refresh_trace_key()

    def refresh_trace_key(self) -> None:
        traced = {f: getattr(self.cfg, f, None) for f in self.spec.traced_config}
        key = f"{self.spec.name}|{traced!r}|{self.dropout_p!r}|{','.join(self.tensor_names)}|{self.pool_entry!r}"
        object.__setattr__(self, "trace_key", key)

    def _set(self, dotted: str, value) -> None:
        owner = self
        *parents, leaf = dotted.split(".")
        for part in parents:
            if part not in owner._modules:
                owner.add_module(part, _Holder(self))
            owner = owner._modules[part]
        owner.register_parameter(leaf, value)

    def _owner(self, dotted: str) -> tuple:
        """(the module holding tensor `dotted`, its name there)."""
        owner = self
        *parents, leaf = dotted.split(".")
        for part in parents:
            owner = owner._modules[part]
        return owner, leaf

    def adoptable(self, dotted: str) -> bool:
        """Whether qpass may move tensor `dotted` into a pool: not a parameter someone else put on a holder
        (FSDP2's sharded or unsharded parameters; _Holder.register_parameter)."""
        owner, leaf = self._owner(dotted)
        return not isinstance(owner, _Holder) or leaf not in owner._parameters or owner.registered(leaf)

    def get(self, dotted: str) -> torch.Tensor:
        owner, leaf = self._owner(dotted)
        return getattr(owner, leaf)

    def tensors(self) -> list:
        return [self.get(n) for n in self.tensor_names]

    def export(self, adapter_config=None) -> dict:
        """name -> tensor, as `save_adapter` writes this site (PEFT's names), trimmed to the adapter's rank."""
        if self.spec.export is not None:
            return self.spec.export(self, adapter_config if adapter_config is not None else self.cfg)
        return {n: self.unpadded(n) for n in self.param_names}

    def unpadded(self, name: str) -> torch.Tensor:
        tensor = self.get(name)
        dim = self.rank_dims.get(name)
        if dim is None or tensor.shape[dim] == self.spec.rank(self.cfg):
            return tensor
        return tensor.narrow(dim, 0, self.spec.rank(self.cfg))

    def expected_shape(self, name: str, rank: Optional[int] = None) -> tuple:
        """The shape a file tensor `name` must have for an adapter of `rank` (default: this slot's)."""
        shape = list(self.get(name).shape)
        dim = self.rank_dims.get(name)
        if dim is not None:
            shape[dim] = self.spec.rank(self.cfg) if rank is None else rank
        return tuple(shape)

    @torch.no_grad()
    def load(self, name: str, value: torch.Tensor) -> None:
        """Copy a file tensor in, zero-padding along the rank dimension up to the allocated rank."""
        target = self.get(name)
        dim = self.rank_dims.get(name)
        if dim is not None and value.shape[dim] < target.shape[dim]:
            target.zero_()
            target.narrow(dim, 0, value.shape[dim]).copy_(value)
        else:
            target.copy_(value)

    @torch.no_grad()
    def set_constants(self, cfg) -> None:
        """Refresh the constants (e.g. scaling) in place for `cfg`: the graph reads them, nothing recompiles."""
        for name, value in self.spec.constants(self.shape, cfg).items():
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))

    @property
    def dtype(self) -> torch.dtype:
        return self.get(self.param_names[0]).dtype if self.param_names else torch.float32

    def extra_repr(self) -> str:
        return f"spec={self.spec.name}, policy={self.spec.dtype_policy}, rank={self.spec.rank(self.cfg)}"
