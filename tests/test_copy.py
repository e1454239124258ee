"""A prepared model survives copy.deepcopy, pickle and torch.save/torch.load: same outputs, an independent copy
(its own sites, ids, adapter tensors and pool), still a prepared qpass model (report, save/load/set/hot-swap
adapters, unprepare, torch.compile). EMA, Trainer checkpoints and accelerate copy models this way.

gptqmodel's TorchLinear does not pickle even unprepared (its `post_init` stores a torch.compile'd bound method
on the instance), so pickle and torch.save are tested on AutoAWQ's layers; deepcopy on both.
"""

import copy
import gc
import io
import pickle
import threading
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file

import qpass
from qpass import pool, site as site_mod
from qpass.log import import_autoawq_quietly
from qpass.prepare import _site_forward
from qpass.quant import layouts
from qpass.quant.gptqmodel import gptq_packed
from qpass.state import QpassState

from conftest import input_ids, make_model, randomize_adapters

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")
EXACT = dict(rtol=0, atol=0)  # fp32, the same ops on the same values


def _lora():
    return qpass.LoraConfig(**LORA)


def _oft():
    return qpass.OFTConfig(target_modules="all-linear", oft_block_size=16, r=0)


def _randomize(model, seed=0):
    randomize_adapters(model, seed=seed, match="qpass_adapters")  # every kind (OFT's R too)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _sites(model):
    return list(model._qpass.sites.values())


def _adapter_ptrs(model):
    return {t.untyped_storage().data_ptr() for s in _sites(model) for slot in s.slots.values() for t in slot.tensors()}


def _check_copy(original, copied):
    """The copy's qpass objects are its own, registered, and point at the copy's modules."""
    ids = {s.id for s in _sites(original)}
    assert not ids & {s.id for s in _sites(copied)}  # two live copies never share a site id
    for path, s in copied._qpass.sites.items():
        module = copied.get_submodule(path)
        assert site_mod._SITES[s.id] is s and s.module is module and s.owner() is copied._qpass
        assert s.slots is module.qpass_adapters and module._qpass_site is s
        assert module.forward.func is _site_forward and module.forward.args[0] is module
        assert s.info == original._qpass.sites[path].info
        assert s.info.layout is original._qpass.sites[path].info.layout
        for name, slot in s.slots.items():
            assert slot.spec is original._qpass.sites[path].slots[name].spec
    assert not _adapter_ptrs(original) & _adapter_ptrs(copied)  # no adapter tensor shared
    assert copied._qpass.pool.key is None and copied._qpass.pool.retired is None  # the copy builds its own pool


def test_deepcopy_gives_an_equal_independent_prepared_model():
    ids = input_ids(batch=1, seq=6)
    model = qpass.prepare(make_model(), _lora())
    _randomize(model)
    before = _logits(model, ids)
    pooled = model._qpass.pool.key
    assert pooled is not None

    copied = copy.deepcopy(model)
    torch.testing.assert_close(_logits(copied, ids), before, **EXACT)
    _check_copy(model, copied)
    assert copied._qpass.pool.stale  # rebuilt at the copy's next compile
    # the copy's forwards hold its own swap lock (nn.Module's copy drops the call wrapper; qpass puts it back)
    assert copied.__dict__["_compiled_call_impl"]._qpass_locked and copied._qpass.lock is not model._qpass.lock
    assert model._qpass.pool.key == pooled and all(pool.aliased(slot) for s in _sites(model) for slot in s.slots.values())

    # changing the copy's adapters leaves the original as it was, and vice versa (optimizer steps: the AWQ test)
    _randomize(copied, seed=3)
    after_copy = _logits(copied, ids)
    assert (after_copy - before).abs().max() > 1e-4
    torch.testing.assert_close(_logits(model, ids), before, **EXACT)
    _randomize(model, seed=1)
    torch.testing.assert_close(_logits(copied, ids), after_copy, **EXACT)

    # a copy dropped without unprepare leaves the site registry (and with it its adapters)
    copy_ids = [s.id for s in _sites(copied)]
    del copied
    gc.collect()
    assert not any(i in site_mod._SITES for i in copy_ids) and all(s.id in site_mod._SITES for s in _sites(model))


def test_the_copy_is_a_full_prepared_model(tmp_path):
    ids = input_ids(batch=1, seq=6)
    model = qpass.prepare(make_model(), _lora())
    _randomize(model)
    before = _logits(model, ids)
    with qpass.disable_adapters(model):
        base = _logits(model, ids)
    copied = copy.deepcopy(model)

    assert qpass.report(copied).summary()["sites_prepared"] == 7
    qpass.save_adapter(model, tmp_path / "a")
    qpass.save_adapter(copied, tmp_path / "copy")
    ours, theirs = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "copy" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # load / set_adapter / hot-swap on the copy: the original keeps its adapters and outputs
    qpass.load_adapter(copied, str(tmp_path / "a"), "b")
    qpass.set_adapter(copied, "b")
    torch.testing.assert_close(_logits(copied, ids), before, **EXACT)
    _randomize(copied, seed=2)
    qpass.hotswap_adapter(copied, str(tmp_path / "a"), "b")
    torch.testing.assert_close(_logits(copied, ids), before, **EXACT)
    assert qpass.active_adapters(model) == ("default",) and "b" not in model._qpass.configs
    torch.testing.assert_close(_logits(model, ids), before, **EXACT)

    # unprepare the copy: a plain model again (the base alone); the original stays prepared
    copy_ids = [s.id for s in _sites(copied)]
    plain = qpass.unprepare(copied)
    assert not hasattr(plain, "_qpass") and not any(id_ in site_mod._SITES for id_ in copy_ids)
    assert not any("qpass_adapters" in n for n, _ in plain.named_modules())
    assert not any("forward" in m.__dict__ or "_qpass_site" in m.__dict__ for m in plain.modules())
    torch.testing.assert_close(_logits(plain, ids), base, **EXACT)
    torch.testing.assert_close(_logits(model, ids), before, **EXACT)


def _torch_save(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_save,
}


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("kind", ["lora", "oft"])
def test_awq_model_round_trips(kind, how):
    import_autoawq_quietly()  # first: a plain `import awq` issues its notice past every filter (pyproject.toml)
    pytest.importorskip("awq")
    from qpass.testing import tiny_awq_llama

    ids = input_ids(batch=1, seq=6)
    model = qpass.prepare(tiny_awq_llama(), _lora() if kind == "lora" else _oft())
    _randomize(model)
    before = _logits(model, ids)
    copied = COPIES[how](model)
    torch.testing.assert_close(_logits(copied, ids), before, **EXACT)
    _check_copy(model, copied)
    assert all(s.info.layout is layouts.awq for s in _sites(copied))
    # the copy trains on its own: an optimizer step on it leaves the original as it was
    opt = torch.optim.SGD([p for p in copied.parameters() if p.requires_grad], lr=0.5)
    copied(ids).logits.square().mean().backward()
    opt.step()
    assert (_logits(copied, ids) - before).abs().max() > 1e-4
    torch.testing.assert_close(_logits(model, ids), before, **EXACT)


def test_quant_info_pickles_its_layout_by_name():
    model = qpass.prepare(make_model(), _lora())
    info = _sites(model)[0].info
    assert info.layout is gptq_packed
    loaded = pickle.loads(pickle.dumps(info))
    assert loaded == info and loaded.layout is gptq_packed
    assert copy.deepcopy(info) is info  # immutable


def test_int4pack_layout_deepcopies_with_its_own_train_and_state_dict():
    ids = input_ids(batch=1, seq=6)
    model = qpass.prepare(make_model(torch.bfloat16).to(torch.bfloat16), _lora(),
                          base_layout="int4pack")
    _randomize(model)
    before = _logits(model, ids)
    copied = copy.deepcopy(model)
    _check_copy(model, copied)
    torch.testing.assert_close(_logits(copied, ids), before, **EXACT)
    q = copied.model.layers[0].self_attn.q_proj
    assert q.train.args[0] is q  # qpass's train(), bound to the copy's layer
    copied.train()
    assert q.training and not model.model.layers[0].self_attn.q_proj.training
    copied.eval()
    # the copy's state_dict hook is its own: the library's layout, equal to the original's
    ours, theirs = model.state_dict(), copied.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    library = {k: v for k, v in qpass.unprepare(copied).state_dict().items()}
    assert all(torch.equal(library[k], ours[k]) for k in library)


def test_qpass_compiled_model_deepcopies_as_the_prepared_model_and_recompiles():
    ids = input_ids(batch=1, seq=6)
    model = qpass.compile(make_model(), _lora(), inner="aot_eager")
    _randomize(model)
    eager = model.forward(ids).logits.detach()  # the prepared model, not compiled
    compiled = _logits(model, ids)
    stats = qpass.report(model).stats
    graphs, recompiles = stats.graphs, stats.recompiles
    assert graphs >= 1

    copied = copy.deepcopy(model)
    # nn.Module's pickling drops `_compiled_call_impl`: the copy is the prepared model, uncompiled
    assert copied.__dict__["_compiled_call_impl"]._qpass_inner is None  # only qpass's swap lock, around the eager call
    torch.testing.assert_close(_logits(copied, ids), eager, **EXACT)
    _check_copy(model, copied)
    torch.testing.assert_close(_logits(model, ids), compiled, **EXACT)  # the original still compiled, no recompile
    assert (stats.graphs, stats.recompiles) == (graphs, recompiles)

    # compiling the copy rewrites the copy's own sites (its report counts the graphs) onto its own pool
    copied.compile(backend=qpass.backend("aot_eager"), options={"guard_filter_fn": qpass.guard_filter})
    torch.testing.assert_close(_logits(copied, ids), compiled, rtol=0, atol=1e-6)
    assert qpass.report(copied).stats.graphs > graphs and stats.graphs == graphs
    assert copied._qpass.pool.key is not None and copied._qpass.pool.key != model._qpass.pool.key
    assert not _adapter_ptrs(model) & _adapter_ptrs(copied)
    torch.testing.assert_close(_logits(model, ids), compiled, **EXACT)


@dataclass
class _StateWithLock(QpassState):
    guard: object = field(default_factory=threading.RLock)


def test_state_gets_fresh_locks_and_defaults_on_load():
    state = _StateWithLock(sites={}, configs={}, report=None, pool=pool.PoolState(key="7", retired="6"))
    loaded = pickle.loads(pickle.dumps(state))
    assert isinstance(loaded.guard, type(threading.RLock())) and loaded.guard is not state.guard
    assert (loaded.pool.key, loaded.pool.retired, loaded.pool.stale) == (None, None, True)
    assert (state.pool.key, state.pool.retired, state.pool.stale) == ("7", "6", False)  # the original untouched
    assert copy.deepcopy(state).guard is not state.guard
    old = {"sites": {}, "configs": {}, "report": None}  # a pickle from before fields were added: their defaults
    fresh = QpassState.__new__(QpassState)
    fresh.__setstate__(old)
    assert fresh.graph_keys == set() and fresh.pool.stale is False and fresh.adapter_dtype == torch.float32
