"""The public entry points besides `prepare`: compile, report, save_adapter."""

from __future__ import annotations

import torch
from torch import nn

from . import adapter_io, transaction
from .backend import QpassBackend
from .errors import QpassError
from .guards import guard_filter
from .prepare import prepare, unprepare
from .state import SLOTS_ATTR, state_of, unwrap


def compile(model: nn.Module, adapter, *, adapter_name: str = "default", inner: str = "inductor", max_rank=None,
            base_layout: str = "library", mode=None, options=None, **torch_compile_kwargs) -> nn.Module:
    """`prepare(model, adapter)`, then compile `model` in place (`nn.Module.compile`) with the qpass backend;
    returns `model` itself, so it keeps its class, `forward` signature, `generate`, `config`,
    `save_pretrained` and `state_dict` keys (Trainer, generate and PEFT see the model they expect).
    Compilation happens on the first call. `base_layout="int4pack"` holds 4-bit weights once, in the CPU int4
    kernel's layout (see `qpass.prepare`).

    `mode` and `options` are inductor's (`"reduce-overhead"`: CUDA graphs on CUDA); other keyword arguments go
    to `torch.compile` (`dynamic=`, `fullgraph=`, ...). dynamo's guards on qpass's own state are replaced by one
    key per site and adapter (`qpass.guard_filter`) unless `options` names its own `guard_filter_fn`.
    """
    if "backend" in torch_compile_kwargs:
        raise QpassError("qpass.compile chooses the backend; pass inner='inductor'|'aot_eager'|'eager' instead of backend=")
    options = dict(options or {})
    guards = options.pop("guard_filter_fn", guard_filter)
    prepare(model, adapter, adapter_name=adapter_name, max_rank=max_rank, base_layout=base_layout)
    try:
        compiler = QpassBackend(inner, state=state_of(model), mode=mode, options=options or None)
        model.compile(backend=compiler, options={"guard_filter_fn": guards}, **torch_compile_kwargs)
        transaction.install_lock(model)  # model.compile replaced the call that held the swap lock
    except BaseException:
        unprepare(model)
        raise
    return model


def report(model: nn.Module):
    """The rewrite report of `model` (prepared or compiled): `print()` it, or `.to_dict()`."""
    return state_of(model).report


def save_adapter(model: nn.Module, path, *, adapter_name: str = "default") -> None:
    """Write `adapter_name` in PEFT's format (adapter_config.json + adapter_model.safetensors).

    The file's `target_modules` select, under PEFT's matching rule, exactly the layers that carry the adapter,
    so `peft.PeftModel.from_pretrained(base, path)` adapts the same layers: the config's own value when it
    already does, else the short module names (e.g. ["k_proj", "q_proj"]) or the full module paths.
    "all-linear" is always written out that way (PEFT expands it to nn.Linear layers only, which quantized
    layers are not). The adapter's config in memory is not changed."""
    state = state_of(model)
    if adapter_name not in state.configs:
        raise QpassError(f"no adapter named {adapter_name!r}; this model has {sorted(state.configs)}")
    tensors = {}
    targeted = []
    for path_, site in state.sites.items():
        if adapter_name not in site.slots:
            continue
        targeted.append(path_)
        slot = site.slots[adapter_name]
        for name, tensor in slot.export(state.configs[adapter_name]).items():
            tensors[f"{path_}.{name}"] = tensor
    base = unwrap(model)
    config = getattr(base, "config", None)
    task_type = "CAUSAL_LM" if type(base).__name__.endswith("ForCausalLM") else None
    # the module names PEFT will see on a fresh base: qpass's own adapter holders are not among them
    module_names = [n for n, _ in base.named_modules() if SLOTS_ATTR not in n.split(".")]
    adapter_io.write(path, state.configs[adapter_name], tensors,
                     base_model_name_or_path=getattr(config, "_name_or_path", None) or None, task_type=task_type,
                     module_names=module_names, targeted=targeted)
