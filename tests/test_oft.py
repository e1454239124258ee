"""OFT on gptqmodel TorchLinear: qpass against PEFT's OFT Linear (the oracle), which PEFT uses for GPTQ layers.

Options: Cayley–Neumann (3 and 5 terms) or exact Cayley, blocks given by oft_block_size or by r, block_share,
COFT (its in-place projection, persisted across steps), init_weights=False. Logits eager and compiled,
SGD steps, the base running once per forward, and module_dropout. PEFT's directories load here; the adapter
qpass saves back is tested in tests/test_lora_parity.py::test_saved_adapter_loads_in_peft_and_back.
"""

import pytest
import torch

peft = pytest.importorskip("peft")

import qpass

from adapter_parity import (check_logits_match_peft, save_peft_dirs, ALL, N_SITES, assert_close, make_model, max_err, max_rel, randomize,
                            sgd_updates)
from conftest import LOGIT_TOL, input_ids
from qpass.patterns.oft import coft_project

OPTIONS = {
    "neumann5_b16": dict(oft_block_size=16, r=0),
    "neumann3_r4": dict(oft_block_size=0, r=4, num_cayley_neumann_terms=3),
    "cayley_b8": dict(oft_block_size=8, r=0, use_cayley_neumann=False),
    "share_b16": dict(oft_block_size=16, r=0, block_share=True),
    # eps chosen so the projection is active (||Q||_F of these random blocks is ~2.3)
    "coft_cayley_b16": dict(oft_block_size=16, r=0, coft=True, eps=1.0, use_cayley_neumann=False),
}


def peft_model(option, dtype=torch.float32):
    model = peft.get_peft_model(make_model(dtype), peft.OFTConfig(target_modules=ALL, **OPTIONS[option]))
    randomize(model, ("oft_R",), std=0.15)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_peft_dirs(tmp_path_factory, "oft", OPTIONS, peft_model)


CASES = [(o, torch.float32, "eager") for o in OPTIONS] + [
    ("neumann5_b16", torch.bfloat16, "eager"), ("cayley_b8", torch.float32, "aot_eager"),
    # inductor on the Neumann series (bmm chain + skew scatter) compiles for ~70 s on a loaded 2-core box
    pytest.param("neumann5_b16", torch.float32, "inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("option,dtype,mode", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_logits_match_peft(dirs, option, dtype, mode):
    reference = peft.PeftModel.from_pretrained(make_model(dtype), str(dirs[option]))
    # a rotation preserves norms, so its effect on logits is bounded (~0.5 here): 5x the tolerance
    model = check_logits_match_peft(reference, dirs[option], dtype, mode, min_effect=5)
    assert model.model.layers[0].mlp.down_proj.qpass_adapters["default"].spec.name == "oft"


@pytest.mark.parametrize("option,mode", [("coft_cayley_b16", "aot_eager"), ("share_b16", "eager"), ("neumann3_r4", "eager")])
def test_sgd_steps_match_peft(dirs, option, mode):
    """Two SGD steps (COFT's in-place projection must persist between them as in PEFT)."""
    ids, labels = input_ids(seed=1), input_ids(seed=2)
    ref = sgd_updates(peft.PeftModel.from_pretrained(make_model(), str(dirs[option]), is_trainable=True),
                      ids, labels, lr=0.2, steps=2)
    model = qpass.prepare(make_model(), str(dirs[option]))
    run = model if mode == "eager" else torch.compile(model, backend=qpass.backend(mode))
    ours = sgd_updates(run, ids, labels, lr=0.2, steps=2)
    assert len(ref) == N_SITES
    err = max_rel(ours, ref)
    assert err < 1e-3, f"update rel. error {err:.3g}"
    if option.startswith("coft"):
        w = model.model.layers[0].self_attn.q_proj.qpass_adapters["default"].get("oft_R.weight")
        before = w.detach().clone()
        with torch.no_grad():
            torch.compile(model, backend=qpass.backend("aot_eager"))(ids)
        assert torch.equal(w, coft_project(before, 1.0)), "the compiled forward projects the weight in place"


def test_base_runs_once_per_forward(dirs, monkeypatch):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    calls = []
    original = TorchLinear.forward

    def counting(self, x):
        calls.append(self)
        return original(self, x)

    monkeypatch.setattr(TorchLinear, "forward", counting)
    ids = input_ids()
    model = qpass.prepare(make_model(), str(dirs["neumann5_b16"]))
    with torch.no_grad():
        model(ids)
    assert len(calls) == N_SITES and len(set(map(id, calls))) == N_SITES
    calls.clear()
    ref_model = peft.PeftModel.from_pretrained(make_model(), str(dirs["neumann5_b16"]))
    with torch.no_grad():
        ref_model(ids)
    assert len(calls) == N_SITES  # PEFT >= 0.19 runs it once too (its old GPTQOFTLinear ran it twice)


def test_module_dropout_replaces_blocks_by_identity_in_training(dirs):
    """PEFT builds a MultiplicativeDropoutLayer and never calls it; qpass applies it (training only)."""
    ids = input_ids()
    cfg = qpass.OFTConfig(target_modules=ALL, oft_block_size=16, r=0, module_dropout=0.5)
    model = qpass.prepare(make_model(), cfg)
    randomize(model, ("oft_R",))
    ref = peft.get_peft_model(make_model(), peft.OFTConfig(target_modules=ALL, oft_block_size=16, r=0, module_dropout=0.5))
    ref.load_state_dict({k.replace("qpass_adapters.default.", "").replace("oft_R.weight", "oft_R.default.weight")
                         .replace("model.", "base_model.model.model.", 1): v for k, v in model.state_dict().items()
                         if "oft_R" in k}, strict=False)
    with torch.no_grad():
        model.eval(), ref.eval()
        assert_close(model(ids).logits, ref(ids).logits)  # eval: no dropout, PEFT's numbers
        model.train()
        torch.manual_seed(0)
        dropped = model(ids).logits
        slot = model.model.layers[0].self_attn.q_proj.qpass_adapters["default"]
        mask = slot.oft_dropped.clone()
        assert mask.sum().item() == 2 and mask.numel() == 4  # int(0.5 * 4) blocks are the identity
        assert max_err(dropped, ref(ids).logits) > 10 * LOGIT_TOL[torch.float32]
        # the same forward with those blocks' parameters zeroed (Cayley(0) = I) and no dropout
        for s in (m.qpass_adapters["default"] for m in model.modules() if hasattr(m, "qpass_adapters")):
            keep = (1 - s.oft_dropped).view(-1, 1)
            s.get("oft_R.weight").mul_(keep)
        model.eval()
        assert_close(model(ids).logits, dropped)


def test_blocks_must_tile_in_features():
    with pytest.raises(qpass.QpassError, match=r"q_proj: oft_block_size=24 does not divide in_features=64; pick oft_block_size"):
        qpass.prepare(make_model(), qpass.OFTConfig(target_modules=["q_proj"], oft_block_size=24))
    with pytest.raises(qpass.QpassError, match="exactly one of `r`"):
        qpass.OFTConfig(r=4, oft_block_size=16)
    model = qpass.prepare(make_model(), peft.OFTConfig(target_modules=["down_proj"], r=4, oft_block_size=0, block_share=True))
    assert model.model.layers[0].mlp.down_proj.qpass_adapters["default"].get("oft_R.weight").shape == (1, 32 * 31 // 2)
