"""The adapter pool (qpass.pool): every LoRA tensor of a model as a view of one flat tensor, which compiled
no-grad steps read instead of 3 tensors per site. What must hold: the pooled step equals the same step on the
slots' own tensors bit for bit; training, re-registered parameters, `load_state_dict(assign=True)`, moving
the adapters (`.to`) and `p.data = t` followed by a compile never leave a compiled step reading old values."""

import pytest
import torch
from torch import nn

import qpass
from qpass import kernels, pool

from conftest import LOGIT_TOL, SITES, input_ids, make_model, randomize_adapters

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.unavailable_reason()}")

TOL = LOGIT_TOL[torch.float32]


def _model():
    model = qpass.prepare(make_model(), qpass.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    return model


def _lora_tensors(model):
    return [t for site in model._qpass.sites.values() for slot in site.slots.values() for t in slot.tensors()]


def _count_pooled_calls(monkeypatch) -> list:
    """Records each lowering onto the pooled gemv (made while a graph is compiled)."""
    calls, real = [], kernels.gemv_pooled

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(kernels, "gemv_pooled", counted)
    return calls


def _step(compiled, model, ids):
    with torch.no_grad():
        return compiled(ids).logits, model(ids).logits


def test_one_pool_holds_every_lora_tensor_and_a_compiled_step_reads_it(monkeypatch):
    model = _model()
    state = model._qpass
    found = pool.get(state.pool.key)
    tensors = _lora_tensors(model)
    assert len(tensors) == SITES * 3
    shared = {found.data.untyped_storage().data_ptr(), found.scalings.untyped_storage().data_ptr()}
    assert {t.untyped_storage().data_ptr() for t in tensors} == shared
    assert all(t.data_ptr() % 16 == 0 for t in tensors)  # inductor assumes 16-byte aligned inputs
    calls = _count_pooled_calls(monkeypatch)
    ids = input_ids(batch=1, seq=1)
    compiled = torch.compile(model, backend=qpass.backend())
    out, ref = _step(compiled, model, ids)
    assert calls, "the no-grad decode step did not read the pool"
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)
    # the same step on the slots' own tensors (the pool dropped): the same arithmetic, bit for bit
    pool.drop(state)
    assert state.pool.key is None and found.key not in pool._POOLS
    torch._dynamo.reset()
    calls.clear()
    apart, _ = _step(torch.compile(model, backend=qpass.backend()), model, ids)
    assert not calls and torch.equal(out, apart)
    qpass.unprepare(model)
    assert not any(k in pool._POOLS for k in (found.key,))


def test_optimizer_steps_land_in_the_pool():
    model = _model()
    compiled = torch.compile(model, backend=qpass.backend())
    ids = input_ids(batch=1, seq=1)
    before, _ = _step(compiled, model, ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    compiled(input_ids()).logits.float().square().mean().backward()
    opt.step()
    model.eval()
    after, ref = _step(compiled, model, ids)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, ref, rtol=0, atol=TOL)
    assert all(pool.aliased(slot) for site in model._qpass.sites.values() for slot in site.slots.values())


def test_moving_the_adapters_turns_the_pool_off_then_rebuilds_it(monkeypatch):
    model = _model()
    state = model._qpass
    compiled = torch.compile(model, backend=qpass.backend())
    ids = input_ids(batch=1, seq=1)
    _step(compiled, model, ids)
    model.to(torch.device("cpu"), torch.float32)  # nothing moves: the pool stays on
    assert all(site.pool == state.pool.key for site in state.sites.values()) and not state.pool.stale
    for site in state.sites.values():
        for slot in site.slots.values():  # A and B to bfloat16 (the scalings stay float32)
            slot.lora_A.to(torch.bfloat16)
            slot.lora_B.to(torch.bfloat16)
    assert state.pool.stale and all(site.pool is None for site in state.sites.values())
    calls = _count_pooled_calls(monkeypatch)
    out, ref = _step(compiled, model, ids)  # retraced onto the slots' own (bfloat16) tensors; the pool rebuilt
    assert not calls
    # bfloat16 adapters: the kernel multiplies them in float32, eager rounds t and the delta to bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_TOL[torch.bfloat16])
    assert pool.get(state.pool.key).data.dtype == torch.bfloat16 and not state.pool.stale
    again, _ = _step(compiled, model, ids)  # retraced onto the new pool
    assert calls and torch.equal(again, out)


# (load_state_dict(assign=True) registers the new Parameter through the same module setattr as the first case)
@pytest.mark.parametrize("how", ["setattr", "p.data = t, then a compile"])
def test_a_tensor_put_in_place_of_a_pooled_one_is_what_the_compiled_step_reads(how):
    model = _model()
    compiled = torch.compile(model, backend=qpass.backend())
    ids = input_ids(batch=1, seq=1)
    before, _ = _step(compiled, model, ids)
    holder = model.model.layers[0].mlp.down_proj.qpass_adapters["default"].lora_B
    new = torch.randn(holder.weight.shape, generator=torch.Generator().manual_seed(5))
    if how == "setattr":
        holder.weight = nn.Parameter(new)
    elif how.startswith("load_state_dict"):
        name = next(n for n, p in model.named_parameters() if p is holder.weight)
        model.load_state_dict({name: new}, strict=False, assign=True)
    else:
        holder.weight.data = new  # not seen by qpass until the next compile (README: Limits)
        torch._dynamo.reset()
    slot = model.model.layers[0].mlp.down_proj.qpass_adapters["default"]
    if how.startswith("p.data"):
        assert not pool.aliased(slot) and model._qpass.pool.key is not None  # unseen until the compile
    else:
        assert model._qpass.pool.stale and all(site.pool is None for site in model._qpass.sites.values())
    out, ref = _step(compiled, model, ids)
    assert (out - before).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)
    again, _ = _step(compiled, model, ids)
    torch.testing.assert_close(again, ref, rtol=0, atol=TOL)
    assert pool.aliased(slot) and torch.equal(slot.get("lora_B.weight"), new)


@pytest.mark.parametrize("fuse_siblings", [True, False])
def test_other_lowerings_read_views_of_the_pool(fuse_siblings):
    """A no-grad prefill (dequant-cpu) and unfused sites take the slots' tensors as views of the pool made at
    the top of the graph: the same result as on the slots' own tensors, bit for bit."""
    model = _model()
    ids = input_ids(batch=1, seq=12)
    out, ref = _step(torch.compile(model, backend=qpass.backend(fuse_siblings=fuse_siblings)), model, ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)
    pool.drop(model._qpass)
    torch._dynamo.reset()
    apart, _ = _step(torch.compile(model, backend=qpass.backend(fuse_siblings=fuse_siblings)), model, ids)
    assert torch.equal(out, apart)


def test_another_backend_runs_the_pooled_op_as_it_is(monkeypatch):
    """Without qpass's backend the `qpass::site` op stays in the graph; given the pool, its kernel takes views."""
    model = _model()
    expanded, real = [], pool.expand
    monkeypatch.setattr(pool, "expand", lambda slots, adapter: expanded.append(1) or real(slots, adapter))
    out, ref = _step(torch.compile(model, backend="aot_eager"), model, input_ids(batch=1, seq=1))
    assert len(expanded) >= SITES
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)


def test_parameters_swapped_in_by_someone_else_are_never_pooled():
    """FSDP2 swaps its own parameters onto the holders through `module._parameters[...]` (no
    `register_parameter`); a rebuild (`ensure`, after each compile) must leave them where FSDP2 keeps them,
    while a parameter assigned through the module API is taken into the new pool."""
    model = _model()
    state = model._qpass
    slots = [slot for site in state.sites.values() for slot in site.slots.values()]
    theirs, ours = slots[0], slots[1]
    swapped = nn.Parameter(theirs.get("lora_B.weight").detach().clone())
    theirs.lora_B._parameters["weight"] = swapped  # as FSDP2's unsafe_setattr_param does
    ours.lora_B.weight = nn.Parameter(ours.get("lora_B.weight").detach().clone())  # the module API
    pool.invalidate(state)
    ptr = swapped.data_ptr()
    pool.ensure(state)
    assert state.pool.key is not None and not state.pool.stale
    assert theirs.pool_entry is None and swapped.data_ptr() == ptr and theirs.get("lora_B.weight") is swapped
    assert ours.pool_entry is not None and pool.aliased(ours)
    assert sum(slot.pool_entry is not None for slot in slots) == len(slots) - 1
