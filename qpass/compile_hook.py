"""qpass inside every torch.compile: the rewrite as an inductor pre-grad pass, compile statistics from dynamo.

Contract:
- `install()` (run once, at `import qpass`) appends `PASS` to inductor's `pre_grad_custom_pass` (passes
  already there stay) and makes pre-grad passes run before inductor's cache lookup. So every
  `torch.compile` whose graphs reach inductor rewrites qpass sites: the default backend, every `mode`,
  `options=`, `dynamic=`, `fullgraph=`, `nn.Module.compile()`, and the pipelines built on them (HF Trainer
  through accelerate, `generate`'s `CompileConfig`). The `qpass` backend (qpass.backend) calls `apply`
  itself, before its inner backend, so `aot_eager`/`eager` inners get the rewrite too.
- `apply(gm, ...)` rewrites the `qpass::site` nodes of a dynamo graph (qpass.rewrite) and records the result
  on the reports of the models whose sites it held; a graph without site nodes is left untouched.
- dynamo's compile-end callback (after the guards are built, before the new graph's first call): each model
  rewritten during that compile gets its adapter pool `ensure`d (qpass.pool) and the compile's wall time.

Why a pre-grad pass and not a backend of its own: pipelines choose their backend and mode themselves (almost
always inductor), so a rewrite that only a named backend performs is one that real pipelines never get.
Why early: the rewrite reads model state the un-rewritten graph does not show (active adapters, lowering,
pool), so a cache keyed on that graph could hand back code compiled for another state.
"""

from __future__ import annotations

import os
import time
import weakref

import torch

from . import pool, resident
from .log import Step
from .ops import is_site_node
from .rewrite import rewrite

_pending: dict = {}  # id -> weakref of each QpassState rewritten during the compile in progress
_started: dict = {}  # compile id -> perf_counter() at its start (the compile in progress only)
_steps: dict = {}  # compile id -> its progress line (qpass.log.Step; silent unless an entry point shows progress)


def needs_grad(gm: torch.fx.GraphModule, example_inputs=None) -> bool:
    """Whether the graph's compiled code must support a backward: grad mode on and some input requiring grad."""
    if not torch.is_grad_enabled():
        return False
    if example_inputs is None:
        example_inputs = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.find_nodes(op="placeholder")]
    return any(getattr(t, "requires_grad", False) for t in example_inputs)


def apply(gm: torch.fx.GraphModule, example_inputs=None, *, lowering: str = "auto", fuse_siblings: bool = True,
          backend: str = "inductor", state=None) -> list:
    """Rewrite `gm`'s qpass sites in place and record them on their models' reports; returns the sites."""
    if not any(is_site_node(n) for n in gm.graph.nodes):
        return []
    _callbacks()  # again: torch._dynamo.reset() clears dynamo's callbacks
    compile_id = str(torch._guards.CompileContext.current_compile_id())
    _started.setdefault(compile_id, time.perf_counter())  # without the start callback: from the rewrite on
    sites = rewrite(gm, lowering=lowering, needs_grad=needs_grad(gm, example_inputs), fuse_siblings=fuse_siblings)
    states = _states(sites, state)
    _record(states, sites, backend, lowering)
    _pending.update({id(s): weakref.ref(s) for s in states})
    return sites


class QpassPreGradPass:
    """The pass inductor runs on every dynamo graph before AOTAutograd (`install`)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        apply(graph.owning_module, backend=_inductor_label(graph))

    def uuid(self):  # None: no cache entry may be keyed on the graph before this pass (see the module doc)
        return None


PASS = QpassPreGradPass()


def _inductor_label(graph: torch.fx.Graph) -> str:
    """"inductor", or "inductor+cudagraphs" where CUDA graphs apply (mode="reduce-overhead" on CUDA)."""
    if not torch._inductor.config.triton.cudagraphs:
        return "inductor"
    values = [n.meta.get("example_value") for n in graph.find_nodes(op="placeholder")]
    on_cuda = any(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in values)
    return "inductor+cudagraphs" if on_cuda else "inductor"


def install() -> None:
    """Put `PASS` into inductor's pre-grad passes (idempotent; other passes kept) and dynamo's callbacks."""
    from torch._inductor import config

    current = config.pre_grad_custom_pass
    passes = list(current) if isinstance(current, (list, tuple)) else ([] if current is None else [current])
    if not any(isinstance(p, QpassPreGradPass) for p in passes):
        config.pre_grad_custom_pass = _chain(passes + [PASS])
    if getattr(config, "pre_grad_pass_timing", "early") == "default":
        config.pre_grad_pass_timing = "early"
    _callbacks()


def _callbacks() -> None:
    """dynamo's compile start/end callbacks (`_on_start`, `_on_end`), registered once."""
    from torch._dynamo.callback import callback_handler

    if _on_end not in callback_handler.end_callbacks:
        callback_handler.register_start_callback(_on_start)
        callback_handler.register_end_callback(_on_end)


def _chain(passes: list):
    """The value for `pre_grad_custom_pass`: a list where inductor takes one, else one callable running all."""
    if len(passes) == 1:
        return passes[0]
    try:
        from torch._inductor.custom_graph_pass import get_custom_graph_passes  # noqa: F401  (lists accepted)

        return passes
    except ImportError:
        def chained(graph):
            for p in passes:
                p(graph)

        return chained


def _on_start(args) -> None:
    _started.clear()
    _started[str(args.compile_id)] = time.perf_counter()
    _pending.clear()
    for step in _steps.values():
        step.cancel()
    _steps.clear()
    backward = getattr(args.callback_trigger, "name", "") == "LAZY_BACKWARD"
    done = f"torch.compile: compiled {'the backward of ' if backward else ''}graph {args.compile_id}"
    _steps[str(args.compile_id)] = Step(_compiling(args), done).start()


def _compiling(args) -> str:
    """The progress line of a compile (qpass.log): dynamo traces on a call the compiled code cannot serve yet."""
    cid = str(args.compile_id)
    if getattr(args.callback_trigger, "name", "") == "LAZY_BACKWARD":
        return f"torch.compile: compiling the backward of graph {cid} (first backward call)"
    why = "first call" if cid.endswith("/0") else "recompile: new input shapes or model state, e.g. train()"
    return f"torch.compile: compiling graph {cid} ({why})"


def _on_end(args) -> None:
    step = _steps.pop(str(args.compile_id), None)
    if step is not None:
        step.end()
    start = _started.pop(str(args.compile_id), None)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    _started.clear()
    states = [ref() for ref in _pending.values()]
    _pending.clear()
    for state in filter(None, states):
        state.report.stats.compile_seconds += elapsed
        pool.ensure(state)


def _states(sites, state=None) -> list:
    found = {id(state): state} if state is not None else {}
    for site in sites:
        owner = site.owner() if site.owner is not None else None
        if owner is not None:
            found[id(owner)] = owner
    return list(found.values())


def _record(states, sites, backend: str, lowering: str) -> None:
    compile_id = torch._guards.CompileContext.current_compile_id()
    recompile = compile_id is not None and (compile_id.frame_compile_id or 0) > 0
    reasons = torch._dynamo.utils.graph_break_reasons
    by_path = {site.path: site for site in sites}
    # dynamo may compile one frame's graph more than once (a restarted analysis, seen with dynamic=True): the
    # same compile id and the same sites count once
    key = (str(compile_id), tuple(sorted(by_path)))
    for state in states:
        stats = state.report.stats
        if key not in state.graph_keys:
            state.graph_keys.add(key)
            stats.graphs += 1
            stats.recompiles += int(recompile)
        stats.backend = backend
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
                used = "; ".join(getattr(site, "lowerings_used", None) or [lowering])
                layout = "int4pack layout (resident): " if resident.is_resident(site) else ""
                row.base = f"{layout}{used} ({backend.removeprefix('qpass+')})"  # the compiler that ran it


def _library_internal(reason) -> bool:
    """A graph break whose whole stack lies inside a quantization library: gptqmodel compiles its own
    dequantize with torch.compile and breaks there whenever its layers run eagerly (e.g. a PEFT model in the
    same process). qpass never traces library code, so such breaks belong to no qpass graph."""
    stack = getattr(reason, "user_stack", None) or []
    return bool(stack) and all(any(f"{os.sep}{lib}{os.sep}" in frame.filename for lib in _LIBRARIES) for frame in stack)


_LIBRARIES = ("gptqmodel", "awq")
