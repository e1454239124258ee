"""qpass.guard_filter: dynamo's guards on qpass state replaced by one key per site and adapter — never stale.

The filter is only safe if every guard it drops is on a field that a key covers, and if every way qpass state
changes refreshes the key. The first is checked here from the guards dynamo installs (for every adapter
kind, in eval and in training); the second by changing each covered field on a compiled model and comparing
with eager.
"""

import re

import pytest
import torch

import qpass
from qpass import guards
from qpass.site import Site
from qpass.slot import AdapterSlot

from conftest import input_ids, make_model, randomize_adapters

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora": lambda: qpass.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.1),
    "qalora": lambda: qpass.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, use_qalora=True, qalora_group_size=16),
    "adalora": lambda: qpass.AdaLoraConfig(init_r=6, target_r=2, total_step=10, target_modules=ALL),
    "oft": lambda: qpass.OFTConfig(target_modules=ALL, oft_block_size=16, r=0, coft=True, module_dropout=0.5),
}
# Guard kinds on an object's type or identity (what the key's owner is, not a value it holds): qpass objects
# keep their types, and a layer's site and adapters are replaced only by prepare/unprepare, which also change
# the layer's `forward` (guarded, not owned).
STRUCTURAL = {"TYPE_MATCH", "ID_MATCH", "NOT_PRESENT_IN_GENERIC_DICT", "CLOSURE_MATCH", "DUPLICATE_INPUT",
              "OBJECT_ALIASING", "DICT_CONTAINS", "DICT_KEYS_MATCH", "DICT_LENGTH", "LENGTH_CHECK"}


def _record(model, train: bool):
    entries = []

    def spy(es):
        entries.extend(es)
        return [True] * len(es)

    compiled = torch.compile(model, backend=qpass.backend("aot_eager"), options={"guard_filter_fn": spy})
    model.train(train)
    with torch.set_grad_enabled(train):
        compiled(input_ids()).logits.sum()
    return entries


def _covered(entry, traced_config) -> bool:
    """Is this dropped guard on something a trace key covers?"""
    if entry.guard_type in STRUCTURAL:
        return True
    name = re.sub(r"\[\d+\]$", "", entry.name)  # an element of a tuple field: the field
    slot = re.search(r"(?:\.slots|\['qpass_adapters'\])\._modules\['\w+'\]\.(\w+)(?:\.(\w+))?$", name)
    if slot:
        field, sub = slot.groups()
        if field == "cfg":
            return sub in traced_config
        return field == "spec" or field in AdapterSlot.trace_fields  # a spec is frozen; the key names it
    site = re.search(r"\._qpass_site\.(\w+)", name)
    return bool(site) and site.group(1) in Site.trace_fields


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_dropped_guard_is_covered_by_a_key(kind, train):
    model = qpass.prepare(make_model(), CONFIGS[kind]())
    spec = next(iter(model._qpass.sites.values())).slots["default"].spec
    entries = _record(model, train)
    dropped = [e for e in entries if guards.dropped(e)]
    kept_keys = [e for e in entries if e.name.endswith(".trace_key") and not guards.dropped(e)]
    assert dropped, "the trace read qpass state: some guards must be on it"
    uncovered = sorted({f"{e.guard_type} {e.name}" for e in dropped if not _covered(e, spec.traced_config)})
    assert not uncovered, f"guards dropped on fields no trace key covers: {uncovered[:5]}"
    n_sites = len(model._qpass.sites)
    assert len(kept_keys) == 2 * n_sites  # one key per site, one per active adapter slot
    assert len(dropped) > 10 * n_sites  # what the filter saves per call (structure, fields, module dicts)


def _compiled(model):
    return torch.compile(model, backend=qpass.backend("aot_eager"), options={"guard_filter_fn": qpass.guard_filter})


def test_direct_assignments_refresh_the_key_and_recompile():
    ids = input_ids()
    model = qpass.prepare(make_model(), qpass.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0))
    randomize_adapters(model)
    compiled = _compiled(model)
    stats = qpass.report(compiled).stats
    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
        torch.testing.assert_close(compiled(ids).logits, adapted, rtol=0, atol=2e-4)
        sites = list(model._qpass.sites.values())
        for site in sites:
            site.disabled = True  # not through the API: the key still changes
        base = model(ids).logits
        assert (base - adapted).abs().max() > 1e-2
        torch.testing.assert_close(compiled(ids).logits, base, rtol=0, atol=2e-4)
        for site in sites:
            site.disabled = False
        torch.testing.assert_close(compiled(ids).logits, adapted, rtol=0, atol=2e-4)
    assert stats.recompiles == 1  # disabled once; back to the first graph without compiling
    # dropout probability: read by the trace in training only; changing it there recompiles
    model.train()
    torch.manual_seed(0)
    compiled(ids).logits.sum().backward()
    before = stats.recompiles
    for site in sites:
        site.slots["default"].dropout_p = 0.5
    torch.manual_seed(0)
    compiled(ids).logits.sum().backward()
    assert stats.recompiles == before + 1


def test_oft_traced_config_change_recompiles_and_matches_eager():
    ids = input_ids()
    model = qpass.prepare(make_model(), qpass.OFTConfig(target_modules=ALL, oft_block_size=16, r=0, coft=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    compiled = _compiled(model)
    model.eval()
    with torch.no_grad():
        compiled(ids)
        for site in model._qpass.sites.values():
            slot = site.slots["default"]
            slot.cfg = type(slot.cfg)(**{**vars(slot.cfg), "coft": True, "eps": 1e-3})  # projects R in before_forward
        out = compiled(ids).logits
        torch.testing.assert_close(out, model(ids).logits, rtol=0, atol=2e-4)
    assert qpass.report(compiled).stats.recompiles == 1


def test_qpass_compile_installs_the_filter_and_a_users_filter_wins(monkeypatch):
    ids = input_ids()
    calls = []

    def spy(entries):
        calls.append(entries)
        return guards.guard_filter(entries)

    monkeypatch.setattr(qpass.api, "guard_filter", spy)
    compiled = qpass.compile(make_model(), qpass.LoraConfig(r=4, lora_alpha=8, target_modules=ALL), inner="aot_eager")
    with torch.no_grad():
        compiled(ids)
    assert calls and any(guards.dropped(e) for es in calls for e in es)

    mine = []
    torch._dynamo.reset()
    compiled = qpass.compile(make_model(), qpass.LoraConfig(r=4, lora_alpha=8, target_modules=ALL), inner="aot_eager",
                             options={"guard_filter_fn": lambda es: mine.append(es) or [True] * len(es)})
    with torch.no_grad():
        compiled(ids)
    calls.clear()
    with torch.no_grad():
        compiled(ids)
    assert mine and not calls
