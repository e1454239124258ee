"""Fewer dynamo guards per call: qpass's own Python state is guarded by one key per site and per adapter.

Tracing a prepared layer reads qpass objects (the site's active adapters, its quantization info, each
adapter slot's spec, config and module structure). Dynamo guards every one of them, and evaluates those
guards on every call of the compiled model: dozens of guards per site, before every decode step (what they
cost: benchmarks/README.md, "Kernel tuning figures").

qpass knows exactly when that state changes, because only qpass changes it. So each `Site` and each
`AdapterSlot` keeps a `trace_key` string that summarises everything of it the trace reads, refreshed on
every assignment of those fields (`Site.active`, `Site.disabled`, `Site.info`, adapters added;
`AdapterSlot.cfg`, `.dropout_p`). The traced forward reads the keys, so dynamo guards them, and
`guard_filter` drops every other non-tensor guard on qpass-owned objects. Tensor guards (dtype, shape,
device, requires_grad) are all kept: `model.to(...)`, freezing or a new parameter still recompile.

`qpass.compile` installs the filter; pass it yourself when compiling with the qpass backend:

    torch.compile(model, backend=qpass.backend(), options={"guard_filter_fn": qpass.guard_filter})

What a key covers is declared in one place each (`Site.trace_fields`, `AdapterSlot.trace_fields`, and a
spec's `traced_config`: the config fields its traced code reads), and tests/test_guards.py checks, from
the guards dynamo installs without the filter, that every dropped guard is on a covered field.
"""

from __future__ import annotations

# Source-name fragments of the objects qpass owns on a prepared layer: the site, and the adapters' ModuleDict.
OWNED = ("._qpass_site", "['_qpass_site']", "qpass_adapters")
# Guard kinds that are never dropped: tensor metadata and aliasing, global (grad mode, ...) and shape state.
KEPT_KINDS = ("TENSOR_MATCH", "NO_TENSOR_ALIASING", "GLOBAL_STATE", "SHAPE_ENV", "TORCH_FUNCTION_STATE",
              "DEFAULT_DEVICE", "DETERMINISTIC_ALGORITHMS", "GRAD_MODE")
KEY_ATTR = "trace_key"


def owned(name: str) -> bool:
    return any(part in name for part in OWNED)


def dropped(entry) -> bool:
    """Whether `guard_filter` drops this guard: a non-tensor guard on a qpass-owned object other than a key."""
    kinds = (entry.guard_type, *entry.derived_guard_types)
    if any(k in KEPT_KINDS for k in kinds):
        return False
    return owned(entry.name) and not entry.name.endswith("." + KEY_ATTR)


def guard_filter(entries) -> list:
    """A `guard_filter_fn` for torch.compile: keep every guard except those `dropped` (see the module doc)."""
    return [not dropped(e) for e in entries]
