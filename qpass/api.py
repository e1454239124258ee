"""The public entry points besides `prepare`: compile, report, save_adapter."""

from __future__ import annotations

import torch
from torch import nn

from . import adapter_io
from .backend import QpassBackend
from .errors import QpassError
from .guards import guard_filter
from .prepare import prepare, state_of, unwrap


def compile(model: nn.Module, adapter, *, adapter_name: str = "default", inner: str = "inductor", max_rank=None,
            base_layout: str = "library", **torch_compile_kwargs):
    """`prepare(model, adapter)` then `torch.compile` with the qpass backend; returns the compiled module.
    `base_layout="int4pack"` holds 4-bit weights once, in the CPU int4 kernel's layout (see `qpass.prepare`).

    Extra keyword arguments go to `torch.compile` (e.g. `dynamic=True`, `fullgraph=True`, `options=...`).
    Unless `options` names its own `guard_filter_fn` (or `mode` is given, which torch does not allow together
    with `options`), dynamo's guards on qpass's own state are replaced by one key per site and adapter
    (`qpass.guard_filter`, see qpass/guards.py).
    """
    if "backend" in torch_compile_kwargs:
        raise QpassError("qpass.compile chooses the backend; pass inner='inductor'|'aot_eager'|'eager' instead of backend=")
    prepare(model, adapter, adapter_name=adapter_name, max_rank=max_rank, base_layout=base_layout)
    state = state_of(model)
    if "mode" not in torch_compile_kwargs:
        options = dict(torch_compile_kwargs.pop("options", None) or {})
        options.setdefault("guard_filter_fn", guard_filter)
        torch_compile_kwargs["options"] = options
    return torch.compile(model, backend=QpassBackend(inner, state=state), **torch_compile_kwargs)


def report(model: nn.Module):
    """The rewrite report of `model` (prepared or compiled): `print()` it, or `.to_dict()`."""
    return state_of(model).report


def save_adapter(model: nn.Module, path, *, adapter_name: str = "default") -> None:
    """Write `adapter_name` in PEFT's format (adapter_config.json + adapter_model.safetensors)."""
    state = state_of(model)
    if adapter_name not in state.configs:
        raise QpassError(f"no adapter named {adapter_name!r}; this model has {sorted(state.configs)}")
    tensors = {}
    for path_, site in state.sites.items():
        if adapter_name not in site.slots:
            continue
        slot = site.slots[adapter_name]
        for name, tensor in slot.export(state.configs[adapter_name]).items():
            tensors[f"{path_}.{name}"] = tensor
    base = unwrap(model)
    config = getattr(base, "config", None)
    task_type = "CAUSAL_LM" if type(base).__name__.endswith("ForCausalLM") else None
    adapter_io.write(path, state.configs[adapter_name], tensors,
                     base_model_name_or_path=getattr(config, "_name_or_path", None) or None, task_type=task_type)
