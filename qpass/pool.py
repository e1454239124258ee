"""The adapter pool: every LoRA tensor of a prepared model in one flat tensor, so a compiled step reads one.

A compiled decode step pays per graph input, outside the kernels: dynamo fetches each tensor from the module
tree and checks its guards, AOTAutograd and inductor's wrapper check it again, and each kernel call parses
it, and every LoRA site holds three (A, B, scaling); what pooling them saves per decode step is in
benchmarks/README.md, "The adapter pool".

So `build` puts the A and B of every LoRA slot of a model in one 1-D tensor (`Pool.data`: float32 or
bfloat16, the adapters' dtype) and every scaling in one float32 tensor (`Pool.scalings`), and makes the
slots' own tensors VIEWS of them (`param.data = view`: the Parameter objects stay, so optimizers, state_dict,
load_state_dict, hot-swap and eager forwards are unchanged and write into the pool). A no-grad trace of a
site whose active adapters are all pooled passes the two pool tensors to the `qpass::site` op instead of the
slots' tensors; the gemv kernel reads A, B and scaling at the offsets in its `Entry`
(`kernels.gemv_pooled`), other lowerings take views. Graphs that need gradients read the Parameters as before.

The model's whole pool state is one `PoolState` (`QpassState.pool`): the pool's key, whether it is stale, the
retired key and each pooled slot's `Entry`. `Site.pool` and `AdapterSlot.pool_entry` are read from it, never
stored on the site or slot, and every change here refreshes the trace keys that cover them.

What could break the aliasing, and what happens then:
- `model.to(...)`, `.half()`, `.cuda()` (`nn.Module._apply`) give the slots new tensors: `_apply` of a slot or
  of its holder modules notices and calls `invalidate`, which turns the pool off for the model (the sites'
  trace keys change, so a compiled model retraces with the slots' own tensors); before the new graph's first
  call qpass.compile_hook `ensure`s a fresh pool, and the next call retraces onto it.
- A Parameter registered anew on a slot (`module.weight = nn.Parameter(...)`, `load_state_dict(assign=True)`):
  the holder modules call `invalidate` the same way.
- Every trace checks, as it runs, that the slots it would read through the pool are still its views
  (`pooled`), so a new trace never reads a pool its slots have left; `ensure` rebuilds the pool if qpass may
  take the tensors that replaced the views (not FSDP2's).
- Assigning `p.data = t` or `torch.utils.swap_tensors` on an adapter parameter is not seen by a graph ALREADY
  compiled onto the pool: it keeps reading the old values until something recompiles (README: Limits). Copy
  in place (`p.copy_(t)`), `load_state_dict`, or `qpass.hotswap_adapter`.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import site as _site

DTYPES = (torch.float32, torch.bfloat16)
ALIGN = 16  # every tensor starts a multiple of 16 elements in: inductor assumes 16-byte aligned inputs

_POOLS: dict = {}  # key -> Pool
_keys = itertools.count()
# On a pooled slot: a weak reference to its model's QpassState (a site has its own, `Site.owner`).
_OWNER = "_qpass_pool_state"


@dataclass(eq=False)
class Pool:
    key: str
    data: torch.Tensor  # 1-D: every pooled A and B
    scalings: torch.Tensor  # 1-D float32: every pooled scaling, ALIGN apart


@dataclass(frozen=True)
class Entry:
    """Where one slot's tensors sit: A (r, k) at `a`, B (n, r) at `b` in `Pool.data`, scaling at `s` in
    `Pool.scalings` (elements)."""

    a: int
    b: int
    r: int
    s: int
    k: int
    n: int

    def ints(self) -> list:
        """The kernel's four ints (`kernels.gemv_pooled`)."""
        return [self.a, self.b, self.r, self.s]


@dataclass(eq=False)
class PoolState:
    """All of a model's pool state (`QpassState.pool`); only this module changes it. Sites and slots keep none
    of their own: `Site.pool` and `AdapterSlot.pool_entry` read it here (`site_pool`, `entry`), and every change
    refreshes the trace keys that cover it (`_refresh`)."""

    key: Optional[str] = None  # the pool (in _POOLS) while the slots' tensors are its views
    # turned off because a slot's tensors left it; rebuilt at the end of the next compile (qpass.compile_hook)
    stale: bool = False
    retired: Optional[str] = None  # the pool before the last rebuild, readable until the next one
    entries: dict = field(default_factory=dict)  # slot -> Entry, for every slot whose tensors are views of `key`

    def keys(self) -> tuple:
        """The keys in _POOLS this model holds."""
        return tuple(k for k in (self.key, self.retired) if k is not None)

    def __getstate__(self) -> dict:
        """A copy (deepcopy, pickle of the model) never shares a pool with the original (its slots' tensors are
        its own, qpass.slot.AdapterSlot): its pool is off, and stale if the original had one, so
        qpass.compile_hook builds the copy's own at its next compile (eager needs none)."""
        return {"key": None, "stale": self.key is not None or self.stale, "retired": None, "entries": {}}


def get(key: str) -> Pool:
    return _POOLS[key]


def _state_of(obj):
    """The QpassState a site (`Site.owner`) or a pooled slot (`_OWNER`) belongs to, or None."""
    ref = obj.owner if isinstance(obj, _site.Site) else obj.__dict__.get(_OWNER)
    return ref() if ref is not None else None


def entry(slot) -> Optional[Entry]:
    """Where the slot's tensors sit in its model's pool, or None (not pooled): `AdapterSlot.pool_entry`."""
    ps = getattr(_state_of(slot), "pool", None)
    return None if ps is None else ps.entries.get(slot)


def site_pool(site) -> Optional[str]:
    """The key of the pool a trace of `site` may read (`Site.pool`): the model's pool while it is on and holds
    one of the site's slots."""
    ps = getattr(_state_of(site), "pool", None)  # (no state yet while a copy of the model is restored)
    if ps is None or ps.key is None or ps.stale:
        return None
    return ps.key if any(slot in ps.entries for slot in site.slots.values()) else None


def _refresh(state, slots: bool = True) -> None:
    """The trace keys that cover the pool state (each site's pool key; with `slots`, each slot's entry)."""
    for site in state.sites.values():
        site.refresh_trace_key()
        if slots:
            for slot in site.slots.values():
                slot.refresh_trace_key()


def _poolable(slot, dtype=None, device=None, shared=()) -> bool:
    """A slot of a low-rank spec whose tensors are exactly A, B and scaling (`LowRank.plain`, no bias) and that
    qpass may move into a pool: plain tensors, each the whole of its storage or a view of one of the `shared`
    storages (the model's pool), registered through the module API (`AdapterSlot.adoptable`): never tensors
    someone else manages (FSDP2's shards are DTensors; its unsharded parameters, each a whole storage, are
    swapped in through `_parameters`)."""
    decl = slot.spec.low_rank
    if decl is None or not decl.plain or list(slot.tensor_names) != [decl.a, decl.b, decl.scaling]:
        return False
    a, b, s = slot.tensors()
    if not all(_plain(t) and _own(t, shared) for t in (a, b, s)):
        return False
    if not all(slot.adoptable(name) for name in slot.tensor_names):  # e.g. FSDP2's unsharded parameters
        return False
    if a.dtype not in DTYPES or b.dtype != a.dtype or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        return False
    if s.dtype != torch.float32 or s.dim() != 0 or not (a.device == b.device == s.device):
        return False
    return (dtype is None or a.dtype == dtype) and (device is None or a.device == device)


def _plain(t: torch.Tensor) -> bool:
    return type(t.data) is torch.Tensor


def _own(t: torch.Tensor, shared) -> bool:
    storage = t.untyped_storage()
    whole = t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
    return whole or storage.data_ptr() in shared


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _storages(key: Optional[str]) -> tuple:
    """The data pointers of pool `key`'s two tensors (none if there is no such pool)."""
    found = _POOLS.get(key) if key is not None else None
    return () if found is None else (found.data.untyped_storage().data_ptr(),
                                     found.scalings.untyped_storage().data_ptr())


def build(state) -> None:
    """(Re)make the model's pool from its slots' current values; every poolable slot's tensors become views
    of it. Slots of another dtype or device than the first poolable one stay as they are (not pooled). The
    previous pool stays readable until the next build: a graph traced onto it may be running its first call."""
    ps = state.pool
    shared = _storages(ps.key)
    _retire(state)
    slots = [slot for site in state.sites.values() for slot in site.slots.values()]
    first = next((slot for slot in slots if _poolable(slot, shared=shared)), None)
    if first is None:
        return
    a0 = first.get(first.spec.low_rank.a)
    members = [slot for slot in slots if _poolable(slot, a0.dtype, a0.device, shared)]
    entries, at = [], 0
    for i, slot in enumerate(members):
        a, b, _ = slot.tensors()
        found = Entry(at, at + _up(a.numel()), a.shape[0], ALIGN * i, a.shape[1], b.shape[0])
        entries.append(found)
        at = found.b + _up(b.numel())
    data = torch.zeros(at, dtype=a0.dtype, device=a0.device)
    scalings = torch.zeros(ALIGN * len(members), dtype=torch.float32, device=a0.device)
    key = str(next(_keys))
    with torch.no_grad():
        for slot, found in zip(members, entries):
            for t, view in zip(slot.tensors(), views(found, data, scalings)):
                view.copy_(t)
                t.data = view
            ps.entries[slot] = found
            object.__setattr__(slot, _OWNER, weakref.ref(state))
    _POOLS[key] = Pool(key, data, scalings)
    weakref.finalize(ps, _POOLS.pop, key, None)
    ps.key, ps.stale = key, False
    _refresh(state)


def views(entry: Entry, data: torch.Tensor, scalings: torch.Tensor) -> list:
    """[A, B, scaling] of one slot, as views of the pool tensors (also inside a graph)."""
    return [data.narrow(0, entry.a, entry.r * entry.k).view(entry.r, entry.k),
            data.narrow(0, entry.b, entry.n * entry.r).view(entry.n, entry.r),
            scalings.narrow(0, entry.s, 1).view(())]


def expand(slots: list, adapter: list) -> list:
    """A pooled op's adapter tensors ([data, scalings]) as the slots' own tensors, in order."""
    return entry_views(list(adapter), flat([slot.pool_entry for slot in slots]))


def flat(entries: list) -> list:
    """Entries as plain ints (what an FX graph node can carry as a constant argument)."""
    return [i for found in entries for i in dataclasses.astuple(found)]


def entry_views(adapter: list, ints: list) -> list:
    """[A, B, scaling] of each slot whose entry is in `ints` (`flat`), as views of the pool tensors."""
    data, scalings = adapter
    n = len(dataclasses.fields(Entry))
    return [t for i in range(0, len(ints), n) for t in views(Entry(*ints[i : i + n]), data, scalings)]


def _retire(state) -> None:
    """The current pool becomes the retired one (still in _POOLS), the retired one before it is forgotten;
    the pool is off."""
    ps = state.pool
    if ps.retired is not None:
        _POOLS.pop(ps.retired, None)
    ps.retired = ps.key
    ps.key, ps.stale = None, False
    ps.entries.clear()
    _refresh(state)


def drop(state) -> None:
    """Forget the model's pools (the slots' tensors keep their storage): nothing reads them any more."""
    _retire(state)
    _POOLS.pop(state.pool.retired, None)
    state.pool.retired = None


def invalidate(state) -> None:
    """Stop reading the pool (a slot's tensors no longer alias it): compiled models retrace onto the slots'
    own tensors; the pool is rebuilt at the end of the next compile (`ensure`, from qpass.compile_hook). The
    entries stay (what `ensure` checks); only the sites' keys change."""
    if state.pool.key is None:
        return
    state.pool.stale = True
    _refresh(state, slots=False)


def invalidate_slot(slot) -> None:
    state = _state_of(slot)
    if state is not None and state.pool.entries.get(slot) is not None:
        invalidate(state)


def check_slot(slot) -> None:
    """After `_apply` (`model.to(...)` and kin): a slot whose tensors were moved or converted left the pool."""
    if slot.pool_entry is not None and not aliased(slot):
        invalidate_slot(slot)


def aliased(slot) -> bool:
    """Whether the slot's tensors are still the views of its pool entry."""
    state = _state_of(slot)
    found = None if state is None else state.pool.entries.get(slot)
    pool = _POOLS.get(state.pool.key) if found is not None and state.pool.key is not None else None
    if pool is None:
        return False
    return all(_plain(t) and t.dtype == v.dtype and t.device == v.device and t.data_ptr() == v.data_ptr()
               and t.shape == v.shape for t, v in zip(slot.tensors(), views(found, pool.data, pool.scalings)))


def ensure(state) -> None:
    """At each compile, before the compiled graph's first call: a pool that was turned off, or whose views were
    replaced behind qpass's back (`p.data = t`), is made again from the slots' current values (the sites' trace
    keys change, so the next call retraces onto it)."""
    ps = state.pool
    if ps.stale:
        build(state)
        return
    if ps.key is None or ps.key not in _POOLS:
        return
    shared = _storages(ps.key)
    broken = [slot for site in state.sites.values() for slot in site.slots.values()
              if slot in ps.entries and not aliased(slot)]
    # Rebuilt only if qpass may take the tensors that replaced the views; tensors someone else manages (FSDP2's
    # DTensor shards and unsharded views) are left alone: traces check aliasing (`pooled`) and read them as
    # they are, and a rebuild would only change the trace keys (a recompile every time FSDP2 swaps them).
    if broken and all(_poolable(slot, shared=shared) for slot in broken):
        build(state)


def pooled(site, names: tuple) -> Optional[Pool]:
    """The pool a trace of `site` with active adapters `names` reads, or None (read the slots' tensors):
    only where no gradient is wanted, every active adapter is pooled and, checked as the trace runs, still a
    view of the pool (so a trace never reads a pool its slots have left unseen, e.g. after `p.data = t`)."""
    if not names or torch.is_grad_enabled():
        return None
    key = _pool_at_trace(site.key, tuple(names))
    return None if key is None else _POOLS.get(key)


@torch._dynamo.assume_constant_result
def _pool_at_trace(site_key: str, names: tuple) -> Optional[str]:
    """The key of the pool the trace reads, or None. Run as it is while dynamo traces: its result is a constant
    of the trace, not guarded. What it reads is covered by guarded keys (the site's trace key holds `Site.pool`,
    each slot's its `pool_entry`: `_refresh` changes them with the pool state), except the aliasing, which
    changes only through the hooks that turn the pool off, or unseen, and then the next compile repairs it."""
    site = _site.get(site_key)
    key = site.pool
    if key is None or not all(site.slots[n].pool_entry is not None and aliased(site.slots[n]) for n in names):
        return None
    return key


# ---- the pool pass ------------------------------------------------------------------------------------


def unpool_pass(gm, nodes: list, chosen: dict, needs_grad: bool, fuse_siblings: bool) -> None:
    """Graph pass, run before sibling fusion. Contract: afterwards a site node is pooled only if its lowering
    reads the pool as it is (`lowering.reads_pool`: the gemv kernel, at each slot's entry) and it can join a
    sibling group; every other pooled node gets the active slots' own tensors instead, as views of the pool
    made at the top of the graph (so sibling grouping sees them before every site)."""
    from . import lowering as _lowering
    from .ops import SiteArgs, join_names

    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for node in nodes:
        a = SiteArgs.of(node)
        if not a.pooled:
            continue
        site = _site.get(a.site_key)
        if fuse_siblings and _lowering.reads_pool(chosen[node], needs_grad) and _lowering.fusable(site, a.names):
            continue
        entries = [site.slots[n].pool_entry for n in a.names]
        with gm.graph.inserting_before(first):
            out = gm.graph.call_function(entry_views, (a.adapter, flat(entries)))
            views = [gm.graph.call_function(operator.getitem, (out, i)) for i in range(3 * len(entries))]
        node.args = (a.x, a.xa, a.base, views, a.site_key, join_names(a.names))
        node.kwargs = {}
