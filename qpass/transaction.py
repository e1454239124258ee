"""All-or-nothing changes to a model, and swaps that running forwards never see half-done.

`changing(model, what, values=...)` wraps every qpass operation that changes a model (prepare, load_adapter,
hotswap_adapter, set_adapter, merge, unprepare). Before the operation starts it records everything the
operation may change, and if the operation raises anything (a `KeyboardInterrupt` included) it puts all of
it back before the exception propagates:

- every module's attributes, parameters, buffers, submodules and hooks (its `__dict__`, and the contents of
  the dicts, sets and lists in it: `_parameters`, `_buffers`, `_modules`, `_forward_hooks`, ...);
- every parameter's and buffer's `requires_grad` and storage (`p.data`: the adapter pool re-points them);
- the values of the tensors the operation writes in place (`values`: adapter tensors, small). Nothing else is
  copied, so the record costs a walk over the module tree;
- qpass's own objects (the model's `QpassState`, its pool state, sites, report and rows) the same way as modules;
- qpass's registries of sites and adapter pools, for this model's entries.

A tensor the operation writes in place must be in `values`; `restore` checks the version counters of the
others and raises if one was written, so a missing entry shows in the tests, not in a user's model.

The swap lock (`SwapLock`, one per prepared model): forwards share it, changes take it alone. A change waits
for the running forwards and holds new ones until it is done, so a forward sees the adapters as they were
before the change or after it. The forward side is taken around the model's call (`install_lock`), outside
torch.compile's graphs: a lock cannot be traced, and the compiled graph itself reads whatever the tensors hold.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import weakref

import torch
from torch import nn

from .errors import QpassError

_CONTAINERS = (dict, set, list)


class _Record:
    """One object's attributes, and the contents of the containers among them, as they were."""

    __slots__ = ("obj", "attrs", "contents")

    def __init__(self, obj):
        self.obj = obj
        self.attrs = dict(obj.__dict__)
        self.contents = [(v, v.copy()) for v in self.attrs.values() if isinstance(v, _CONTAINERS)]

    def restore(self) -> None:
        d = self.obj.__dict__
        d.clear()
        d.update(self.attrs)
        for container, saved in self.contents:
            if isinstance(container, list):
                container[:] = saved
            else:
                container.clear()
                container.update(saved)


class Snapshot:
    """What `changing` puts back (see the module docstring)."""

    def __init__(self, model: nn.Module, values=()):
        self.model = model
        state = model.__dict__.get("_qpass")
        objects = list(model.modules())
        if state is not None:
            objects += [state, state.pool, state.report, *state.report.rows, *state.sites.values()]
        self.records = [_Record(o) for o in objects]
        self.tensors = []
        for module in model.modules():
            for t in (*module._parameters.values(), *module._buffers.values()):
                if t is not None:
                    self.tensors.append((t, t.data, t.requires_grad, t._version))
        self.values = [(t, t.detach().clone()) for t in values]
        self.sites = _sites_of(model)
        self.pools = _pools_of(state)

    def restore(self) -> None:
        from . import pool, site

        failed_sites = _sites_of(self.model)
        failed_pools = _pools_of(self.model.__dict__.get("_qpass"))
        for record in reversed(self.records):
            record.restore()
        written = set()
        for t, data, requires_grad, version in self.tensors:
            if t.data.untyped_storage().data_ptr() != data.untyped_storage().data_ptr() or t.shape != data.shape \
                    or t.stride() != data.stride() or t.storage_offset() != data.storage_offset() \
                    or t.dtype != data.dtype or t.device != data.device:
                t.data = data
            if t.requires_grad != requires_grad:
                t.requires_grad_(requires_grad)
        with torch.no_grad():
            for t, saved in self.values:
                t.copy_(saved)
                written.add(id(t))
        for key, s in failed_sites.items():
            if key not in self.sites:
                s.release()
        site._SITES.update(self.sites)
        for key in failed_pools.keys() - self.pools.keys():
            pool._POOLS.pop(key, None)
        pool._POOLS.update(self.pools)
        changed = [t for t, _, _, version in self.tensors if t._version != version and id(t) not in written]
        if changed:
            raise RuntimeError(f"qpass internal error: {len(changed)} tensor(s) were written in place by an operation "
                               "that did not declare them; the model could not be fully restored")


def _sites_of(model: nn.Module) -> dict:
    """id -> Site for every site on the model's modules (also those of a prepare that has not finished)."""
    found = {}
    for module in model.modules():
        s = module.__dict__.get("_qpass_site")
        if s is not None:
            found[s.id] = s
    return found


def _pools_of(state) -> dict:
    from . import pool

    if state is None:
        return {}
    return {k: pool._POOLS[k] for k in state.pool.keys() if k in pool._POOLS}


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C waits until the block is done (main thread only: elsewhere signals do not arrive anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(signal.SIGINT, pending[0])


@contextlib.contextmanager
def changing(model: nn.Module, what: str, values=()):
    """Run the block as one change of `model` (prepared or being prepared): all of it, or — whatever it raises —
    none of it. `values`: the tensors the block writes in place. Holds the model's swap lock, if it has one."""
    state = model.__dict__.get("_qpass")
    with state.lock.writing(what) if state is not None else contextlib.nullcontext():
        snapshot = Snapshot(model, values)
        try:
            yield
        except BaseException:
            with _interrupts_deferred():
                snapshot.restore()
            raise


class SwapLock:
    """Readers (forwards) share it, a writer (a change of adapters) holds it alone; a waiting writer goes before
    new readers. Nested forwards of one thread, and forwards run by a change itself, pass through."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = None
        self._waiting = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def reading(self):
        depth = getattr(self._local, "depth", 0)
        if depth or self._writer == threading.get_ident():
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self._cond:
            while self._writer is not None or self._waiting:
                self._cond.wait()
            self._readers += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self, what: str):
        me = threading.get_ident()
        if self._writer == me:  # a change made by a change (merge -> unprepare)
            yield
            return
        if getattr(self._local, "depth", 0):
            raise QpassError(f"{what} was called from inside a forward of this model; call it between forwards")
        with self._cond:
            self._waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()

    def __getstate__(self):
        return {}

    def __setstate__(self, _):
        self.__init__()

    def __deepcopy__(self, memo):
        return SwapLock()


def install_lock(model: nn.Module) -> None:
    """Make every call of `model` (eager, or compiled in place by `model.compile()` before this) hold the
    model's swap lock for reading. It goes where `nn.Module.__call__` looks first, `_compiled_call_impl`;
    inside a torch.compile trace of the model it steps aside (dynamo folds `is_compiling()` to True), so
    `torch.compile(model)` traces the model as before. Idempotent."""
    inner = model.__dict__.get("_compiled_call_impl")
    if getattr(inner, "_qpass_locked", False):
        return
    ref = weakref.ref(model)

    def locked_call(*args, **kwargs):
        m = ref()
        call = inner if inner is not None else m._call_impl
        if torch.compiler.is_compiling():
            return call(*args, **kwargs)
        state = m.__dict__.get("_qpass")
        if state is None:
            return call(*args, **kwargs)
        with state.lock.reading():
            return call(*args, **kwargs)

    locked_call._qpass_locked = True
    locked_call._qpass_inner = inner
    model.__dict__["_compiled_call_impl"] = locked_call  # also on a model being unpickled (QpassState.__setstate__)


def remove_lock(model: nn.Module) -> None:
    """Undo `install_lock`: the model's call is what it was before (compiled in place or not)."""
    current = model.__dict__.get("_compiled_call_impl")
    if getattr(current, "_qpass_locked", False):
        inner = current._qpass_inner
        if inner is None:
            model.__dict__.pop("_compiled_call_impl", None)
        else:
            model.__dict__["_compiled_call_impl"] = inner
