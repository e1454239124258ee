"""A site: one quantized-linear module of the model with the adapters attached to it.

The site owns the math that every path shares — eager, the custom op's eager kernel, and the function
the backend splices into the compiled graph — so there is one definition of what a site computes:

    h  = input-attached adapters applied to x (OFT)       policy casts around each
    y  = base(h)                                           library kernel or plain-torch dequant + matmul
    y  = y (+) output-attached adapters of xa (LoRA, ...)  policy decides the dtype of each add
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import policy, pool as _pool
from .lowering import lowered_site
from .quant import QuantInfo, base_forward

_SITES: dict = {}
_ids = itertools.count()


def get(key: str) -> "Site":
    """The site a `qpass::site` node names. The key is a string, never an int: dynamo may turn an int that
    differs between compiles of the same code (one decoder layer's sites vs the next's) into a SymInt."""
    try:
        return _SITES[int(key)]
    except (KeyError, ValueError):
        raise RuntimeError(f"qpass site {key!r} no longer exists (its model was unprepared or freed)") from None


def _freed():
    """A `module_ref` whose module is gone (a site pickled after its module was freed)."""
    return None


@dataclass(eq=False)
class Site:
    path: str
    info: QuantInfo
    module_ref: Callable
    id: int = field(default_factory=lambda: next(_ids))
    # adapter name -> AdapterSlot, in attach order
    slots: dict = field(default_factory=dict)
    active: tuple = ("default",)
    disabled: bool = False
    owner: Optional[Callable] = None  # weakref to the model's QpassState

    # The fields the traced forward reads; assigning any of them refreshes `trace_key` (see qpass.guards).
    # `slots` is a ModuleDict: code that adds or removes an adapter calls `refresh_trace_key()`. The key also
    # covers `pool`, which qpass.pool refreshes whenever the model's pool state changes.
    trace_fields = ("id", "info", "slots", "active", "disabled")

    def __post_init__(self):
        _SITES[self.id] = self
        self.refresh_trace_key()

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name in self.trace_fields and "trace_key" in self.__dict__:
            self.refresh_trace_key()

    def refresh_trace_key(self) -> None:
        """One string for everything of this site the trace reads: the compiled model guards it (and, with
        `qpass.guard_filter`, not the fields one by one)."""
        active = "disabled" if self.disabled else ",".join(self.active)
        key = f"{self.id}|{active}|{','.join(self.slots)}|{self.info!r}|{self.pool}"
        object.__setattr__(self, "trace_key", key)

    @property
    def key(self) -> str:
        return str(self.id)

    @property
    def pool(self) -> Optional[str]:
        """The key of the model's adapter pool while a trace of this site may read it (held by qpass.pool)."""
        return _pool.site_pool(self)

    @classmethod
    def create(cls, path: str, info: QuantInfo, module: nn.Module) -> "Site":
        site = cls(path=path, info=info, module_ref=weakref.ref(module))
        site._forget_with(module)
        return site

    def _forget_with(self, module: nn.Module) -> None:
        """Leave `_SITES` when the module is freed (a model dropped without unprepare, a discarded copy): the
        registry must not keep a freed model's sites, and with them its adapters, alive."""
        weakref.finalize(module, _SITES.pop, self.id, None)

    def release(self) -> None:
        _SITES.pop(self.id, None)

    # ---- copying and pickling (copy.deepcopy, pickle, torch.save of the prepared model) ------------------
    # Invariants of a restored site: it has a NEW id, registered in `_SITES` (two live copies never share an
    # id: graphs name their site by it); `module_ref` and `owner` are weak again, to the copied module and
    # QpassState (in the state they travel as strong references, so the copy brings them along).

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["module_ref"] = self.module_ref()
        state["owner"] = self.owner() if self.owner is not None else None
        state.pop("trace_key", None)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        module, owner = state.pop("module_ref"), state.pop("owner")
        state.pop("pool", None)  # a field before qpass.pool.PoolState held it
        self.__dict__.update(state)
        object.__setattr__(self, "module_ref", weakref.ref(module) if module is not None else _freed)
        object.__setattr__(self, "owner", weakref.ref(owner) if owner is not None else None)
        object.__setattr__(self, "id", next(_ids))
        _SITES[self.id] = self
        if module is not None:
            self._forget_with(module)
        self.refresh_trace_key()

    @property
    def module(self) -> nn.Module:
        module = self.module_ref()
        if module is None:
            raise RuntimeError(f"qpass site {self.path}: its module was freed")
        return module

    def active_names(self) -> tuple:
        if self.disabled:
            return ()
        return tuple(n for n in self.active if n in self.slots)

    def base_tensors(self) -> list:
        module = self.module
        return [getattr(module, n) for n in self.info.buffers]

    # ---- the math -------------------------------------------------------------------------------

    def adapter_inputs(self, x: torch.Tensor, names: tuple, training: bool, dtype: Optional[torch.dtype]) -> list:
        """Per output-attached adapter: x cast by its policy, then dropout (PEFT's order). Done outside the
        op so that the op itself is deterministic and its backward can recompute it. `dtype`: the adapters'
        dtype if the caller knows it (pooled slots: the pool's; reading a slot's tensor to learn it would
        make dynamo guard that tensor), else None. No default: dynamo would guard the function's defaults."""
        out = []
        for name in names:
            slot = self.slots[name]
            if slot.spec.before_forward is not None:  # in-place upkeep of the slot's tensors (COFT, OFT block dropout)
                slot.spec.before_forward(slot, training)
            if slot.spec.attach != "output":
                continue
            xa = policy.cast_input(self.policy(slot), x, slot.dtype if dtype is None else dtype)
            if training and slot.dropout_p > 0:  # in eval dropout_p is never read, so changing it never recompiles
                xa = torch.nn.functional.dropout(xa, slot.dropout_p, True)
            out.append(xa)
        return out

    def policy(self, slot) -> str:
        return slot.cfg.dtype_policy or slot.spec.dtype_policy

    def run(self, x, xa: list, base: list, adapter: list, names: tuple, base_fn) -> torch.Tensor:
        slots = [self.slots[n] for n in names]
        tensors = []
        offset = 0
        for slot in slots:
            n = len(slot.tensor_names)
            tensors.append(dict(zip(slot.tensor_names, adapter[offset : offset + n])))
            offset += n
        h = x
        for slot, p in zip(slots, tensors):
            if slot.spec.attach == "input":
                h = slot.spec.apply(policy.cast_input(self.policy(slot), h, slot.dtype), p, slot.cfg)
                if h.dtype != x.dtype:  # the base runs in the model's dtype (PEFT: rotate, cast back, base)
                    h = h.to(x.dtype)
        y = base_fn(h, base)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        inputs = iter(xa)
        for slot, p in zip(slots, tensors):
            if slot.spec.attach == "output":
                y = policy.add_output(self.policy(slot), y, slot.spec.apply(next(inputs), p, slot.cfg))
        return y

    def torch_base(self, h, base):
        return base_forward(self.info, h, base)

    def eager_base(self, h):
        """The base outside torch.compile: the library's own kernel (PEFT's numerics exactly), unless the
        matcher says that kernel cannot serve here (`QuantInfo.eager_base == "torch"`: no CPU kernel, no
        backward, or it repacks its buffers in place) — then the same plain-torch base as under compile."""
        if self.info.eager_base == "torch":
            return self.torch_base(h, self.base_tensors())
        module = self.module
        return type(module).forward(module, h)

    def eager_base_fn(self, h, base):
        return self.eager_base(h)

    def lowered(self, names: tuple, lowering: str = "torch-dequant", needs_grad: bool = False):
        """The function the backend splices into the graph in place of this site's op node (chosen in
        `qpass.lowering`: device int4 kernels, or plain torch with any derived constants)."""
        return lowered_site(self, names, lowering, needs_grad)

    def plain_lowered(self, names: tuple):
        """The site's math on its plain-torch base, reading nothing but its own tensors."""

        def fn(x, xa, base, adapter):
            return self.run(x, list(xa), list(base), list(adapter), names, self.torch_base)

        fn.__name__ = fn.__qualname__ = "qpass_site_" + self.path.replace(".", "_")
        return fn
