"""Several adapters, switching and disabling without stale graphs, hot-swap without recompiling."""

import pytest
import torch

import qpass
from qpass.errors import QpassError

from conftest import input_ids, make_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_dir(path, seed, r=4, alpha=8, **kw):
    model = peft.get_peft_model(make_model(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": _peft_dir(root / "a", 1),
        "b": _peft_dir(root / "b", 2, alpha=16, use_rslora=True),
        "c_rank8": _peft_dir(root / "c", 3, r=8, alpha=4),
        "d_rank16": _peft_dir(root / "d", 4, r=16),
    }


@pytest.fixture(scope="module")
def references(dirs):
    """PEFT's logits for every combination (the oracle)."""
    ids = input_ids()
    ref = peft.PeftModel.from_pretrained(make_model(), dirs["a"], adapter_name="a")
    ref.load_adapter(dirs["b"], adapter_name="b")
    out = {}
    with torch.no_grad():
        for combo in (["a"], ["b"], ["a", "b"]):
            ref.base_model.set_adapter(combo)
            out[tuple(combo)] = ref(ids).logits
        with ref.disable_adapter():
            out[()] = ref(ids).logits
    for name in ("c_rank8",):
        m = peft.PeftModel.from_pretrained(make_model(), dirs[name])
        with torch.no_grad():
            out[name] = m(ids).logits
    return out


def _compile(model, filtered):
    """Every guard (a user's own torch.compile), or qpass's per-site keys instead (what qpass.compile does)."""
    options = {"guard_filter_fn": qpass.guard_filter} if filtered else None
    return torch.compile(model, backend=qpass.backend("aot_eager"), options=options)


GUARDS = pytest.mark.parametrize("filtered", [False, True], ids=["all-guards", "qpass-guard-filter"])


@GUARDS
def test_switch_and_disable_give_fresh_outputs_and_no_recompile_after_first(dirs, references, filtered):
    ids = input_ids()
    model = qpass.prepare(make_model(), dirs["a"], adapter_name="a")
    qpass.load_adapter(model, dirs["b"], "b")
    assert qpass.active_adapters(model) == ("a",)
    compiled = _compile(model, filtered)
    stats = qpass.report(compiled).stats

    def run(combo):
        if combo == ():
            with qpass.disable_adapters(model):
                with torch.no_grad():
                    return compiled(ids).logits
        qpass.set_adapter(model, list(combo))
        with torch.no_grad():
            return compiled(ids).logits

    combos = [("a",), ("b",), ("a", "b"), (), ("a",)]
    for combo in combos:
        torch.testing.assert_close(run(combo), references[combo], rtol=0, atol=2e-4, msg=f"combo {combo}")
    first_pass = stats.recompiles
    assert first_pass == 3  # a (first compile), then b, a+b, disabled: one recompile each
    for combo in combos * 2:
        torch.testing.assert_close(run(combo), references[combo], rtol=0, atol=2e-4, msg=f"combo {combo}")
    assert stats.recompiles == first_pass, "switching back to a compiled combination must not recompile"


def test_set_adapter_controls_what_trains(dirs):
    model = qpass.prepare(make_model(), dirs["a"], adapter_name="a")
    qpass.load_adapter(model, dirs["b"], "b")
    trainable = {n.split(".qpass_adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a"}
    qpass.set_adapter(model, "b")
    trainable = {n.split(".qpass_adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"b"}
    with pytest.raises(QpassError, match=r"no adapter named 'z'; loaded adapters: \['a', 'b'\]"):
        qpass.set_adapter(model, "z")
    with pytest.raises(QpassError, match=r"already loaded"):
        qpass.load_adapter(model, dirs["b"], "b")


@GUARDS
def test_hotswap_without_recompile_equals_fresh_compile(dirs, references, filtered):
    ids = input_ids()
    model = qpass.prepare(make_model(), dirs["a"], max_rank=8)
    compiled = _compile(model, filtered)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, references[("a",)], rtol=0, atol=2e-4)
    stats = qpass.report(compiled).stats
    graphs = stats.graphs
    qpass.hotswap_adapter(model, dirs["c_rank8"])  # rank 4 -> 8, alpha 8 -> 4
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, references["c_rank8"], rtol=0, atol=2e-4)
    qpass.hotswap_adapter(model, dirs["b"])  # back to rank 4, rsLoRA scaling
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, references[("b",)], rtol=0, atol=2e-4)
    assert stats.recompiles == 0 and stats.graphs == graphs
    # too large a rank: a clear error, and the adapter in place is untouched
    with pytest.raises(QpassError, match=r"rank 16, more than the 8 allocated; prepare with max_rank=16"):
        qpass.hotswap_adapter(model, dirs["d_rank16"])
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, references[("b",)], rtol=0, atol=2e-4)


def test_hotswapped_adapter_saves_at_its_own_rank(dirs, tmp_path, references):
    model = qpass.prepare(make_model(), dirs["a"], max_rank=8)
    qpass.hotswap_adapter(model, dirs["c_rank8"])
    qpass.hotswap_adapter(model, dirs["a"])
    qpass.save_adapter(model, tmp_path / "out")
    reloaded = peft.PeftModel.from_pretrained(make_model(), str(tmp_path / "out"))
    assert reloaded.peft_config["default"].r == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids()).logits, references[("a",)], rtol=0, atol=2e-4)
