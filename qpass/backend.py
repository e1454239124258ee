"""The `qpass` torch.compile backend: the qpass rewrite, then an inner backend (inductor by default).

Since every inductor compile runs the rewrite anyway (qpass.compile_hook), the named backend is needed only
to choose what inductor alone cannot: a non-inductor inner backend (`aot_eager`, `eager`, a callable), a
forced lowering, or no sibling fusion. `torch.compile(m, backend="qpass", mode=..., options=...)` passes
`mode` and `options` on to inductor, as the default backend does.
"""

from __future__ import annotations

import torch

from . import compile_hook

INNER = ("inductor", "aot_eager", "eager")


def _inner_compiler(inner, mode=None, options=None):
    if inner == "inductor":
        return torch._TorchCompileInductorWrapper(mode, options, None)
    if mode not in (None, "default") or options:
        raise ValueError(f"qpass.backend: mode= and options= are inductor's; the inner backend is {inner!r}")
    if callable(inner):
        return inner
    if inner == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    raise ValueError(f"qpass.backend: inner must be one of {INNER} or a backend callable; got {inner!r}")


class QpassBackend:
    """Callable torch.compile backend. `state` (set by `qpass.compile`) attributes every graph to one model;
    otherwise graphs are attributed to the models whose sites they contain."""

    def __init__(self, inner="inductor", lowering: str = "auto", state=None, fuse_siblings: bool = True,
                 mode=None, options=None):
        self.inner_name = inner if isinstance(inner, str) else getattr(inner, "__name__", "custom")
        if inner == "inductor" and mode not in (None, "default"):
            self.inner_name = f"inductor:{mode}"
        self._inner_arg = inner
        self.inner = _inner_compiler(inner, mode, options)
        self.lowering = lowering
        self.fuse_siblings = fuse_siblings
        self.state = state

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        inner = self.inner
        if kwargs:  # torch.compile(m, backend=<this object>, mode=..., options=...)
            unknown = set(kwargs) - {"mode", "options"}
            if unknown:
                raise TypeError(f"qpass backend: unexpected keyword argument(s) {sorted(unknown)}")
            inner = _inner_compiler(self._inner_arg, kwargs.get("mode"), kwargs.get("options"))
        compile_hook.apply(gm, example_inputs, lowering=self.lowering, fuse_siblings=self.fuse_siblings,
                           backend=f"qpass+{self.inner_name}", state=self.state)
        return inner(gm, example_inputs)


def backend(inner="inductor", *, lowering: str = "auto", fuse_siblings: bool = True, mode=None, options=None) -> QpassBackend:
    """A torch.compile backend that rewrites qpass sites, then compiles with `inner`
    ("inductor", "aot_eager", "eager", or any backend callable); `mode` and `options` are inductor's."""
    return QpassBackend(inner, lowering, fuse_siblings=fuse_siblings, mode=mode, options=options)


@torch._dynamo.register_backend(name="qpass")
def _qpass_backend(gm, example_inputs, mode=None, options=None):
    return QpassBackend("inductor", mode=mode, options=options)(gm, example_inputs)
