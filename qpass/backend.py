"""The torch.compile backend: run the qpass rewrite on each dynamo graph, then hand it to an inner backend.

`backend(inner="inductor")` returns the callable; the name "qpass" is registered with dynamo so
`torch.compile(prepared_model, backend="qpass")` works. Report rows and compile statistics are updated
here, on every compile, because this wrapper runs even when inductor's caches skip its own passes.
"""

from __future__ import annotations

import os
import time

import torch

from . import pool, resident
from .rewrite import rewrite

INNER = ("inductor", "aot_eager", "eager")


def _inner_compiler(inner):
    if callable(inner):
        return inner
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    if inner == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    raise ValueError(f"qpass.backend: inner must be one of {INNER} or a backend callable; got {inner!r}")


class _EnsurePools:
    """The compiled graph, which on its first call first `pool.ensure`s its models' adapter pools: a pool turned
    off since the last compile (`model.to(...)`) is made again from the slots' values (the sites' trace keys
    change, so the next call retraces onto it); tensors put in place of its views (`p.data = t`) are copied
    into it. Not in the backend itself: dynamo builds the graph's guards after the backend returns, from the
    values then, and they must be the values the graph was traced with."""

    def __init__(self, compiled, states):
        self.compiled, self.states = compiled, states
        self._boxed_call = getattr(compiled, "_boxed_call", False)  # called as the graph would be (one list)

    def __call__(self, *args):
        if self.states:
            states, self.states = self.states, None
            for state in states:
                pool.ensure(state)
        return self.compiled(*args)


class QpassBackend:
    """Callable torch.compile backend. `state` (set by `qpass.compile`) attributes every graph to one model;
    otherwise graphs are attributed to the models whose sites they contain."""

    def __init__(self, inner="inductor", lowering: str = "auto", state=None, fuse_siblings: bool = True):
        self.inner_name = inner if isinstance(inner, str) else getattr(inner, "__name__", "custom")
        self.inner = _inner_compiler(inner)
        self.lowering = lowering
        self.fuse_siblings = fuse_siblings
        self.state = state

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        start = time.perf_counter()
        needs_grad = torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in example_inputs)
        sites = rewrite(gm, lowering=self.lowering, needs_grad=needs_grad, fuse_siblings=self.fuse_siblings)
        compiled = self.inner(gm, example_inputs)
        states = self._states(sites)
        self._record(sites, time.perf_counter() - start)
        return _EnsurePools(compiled, list(states.values())) if states else compiled

    def _states(self, sites) -> dict:
        states = {id(self.state): self.state} if self.state is not None else {}
        for site in sites:
            state = site.owner() if site.owner is not None else None
            if state is not None:
                states[id(state)] = state
        return states

    def _record(self, sites, elapsed: float) -> None:
        states = self._states(sites)
        compile_id = torch._guards.CompileContext.current_compile_id()
        recompile = compile_id is not None and (compile_id.frame_compile_id or 0) > 0
        reasons = torch._dynamo.utils.graph_break_reasons
        by_path = {site.path: site for site in sites}
        for state in states.values():
            stats = state.report.stats
            stats.graphs += 1
            stats.recompiles += int(recompile)
            stats.compile_seconds += elapsed
            stats.backend = f"qpass+{self.inner_name}"
            mark = state.graph_break_mark if state.graph_break_mark <= len(reasons) else 0
            new = [r for r in reasons[mark:] if not _library_internal(r)]
            stats.graph_breaks += len(new)
            for reason in new:
                text = reason.reason.strip().splitlines()[0][:200]
                if text not in stats.graph_break_reasons:
                    stats.graph_break_reasons.append(text)
            state.graph_break_mark = len(reasons)
            for row in state.report.rows:
                site = by_path.get(row.module)
                if site is not None and state.sites.get(row.module) is site:
                    row.status = "rewritten" if row.adapter else "rewritten (base only: not in target_modules)"
                    used = "; ".join(getattr(site, "lowerings_used", None) or [self.lowering])
                    layout = "int4pack layout (resident): " if resident.is_resident(site) else ""
                    row.base = f"{layout}{used} ({self.inner_name})"


def _library_internal(reason) -> bool:
    """A graph break whose whole stack lies inside a quantization library: gptqmodel compiles its own
    dequantize with torch.compile and breaks there whenever its layers run eagerly (e.g. a PEFT model in the
    same process). qpass never traces library code, so such breaks belong to no qpass graph."""
    stack = getattr(reason, "user_stack", None) or []
    return bool(stack) and all(any(f"{os.sep}{lib}{os.sep}" in frame.filename for lib in _LIBRARIES) for frame in stack)


_LIBRARIES = ("gptqmodel", "awq")


def backend(inner="inductor", *, lowering: str = "auto", fuse_siblings: bool = True) -> QpassBackend:
    """A torch.compile backend that rewrites qpass sites, then compiles with `inner`
    ("inductor", "aot_eager", "eager", or any backend callable)."""
    return QpassBackend(inner, lowering, fuse_siblings=fuse_siblings)


@torch._dynamo.register_backend(name="qpass")
def _qpass_backend(gm, example_inputs):
    return QpassBackend("inductor")(gm, example_inputs)
