"""LoRA on gptqmodel TorchLinear: qpass against PEFT's GPTQLoraLinear (the oracle), in eager and compiled.

A PEFT adapter with non-zero lora_B is saved to a directory; qpass loads that directory; logits,
gradients after one optimizer step, and the adapter qpass saves back (loaded by PEFT) are compared. The save /
reload round trip is tested here for LoRA, QA-LoRA and OFT at once.
"""

import pytest
import torch

peft = pytest.importorskip("peft")

import qpass

from adapter_parity import assert_close, make_model as eager_model, max_rel, randomize, sgd_updates
from conftest import LAYERS, LOGIT_TOL, SITES, input_ids, make_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "lora_bias": {"lora_bias": True},
}


def peft_model(dtype, variant, seed=0, dropout=0.0):
    base = make_model(dtype)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL, lora_dropout=dropout, **VARIANTS[variant])
    model = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    dirs = {}
    for variant in VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        peft_model(torch.float32, variant).save_pretrained(str(path))
        dirs[variant] = path
    return dirs


def _close(a, b, dtype):
    tol = LOGIT_TOL[dtype]
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol, f"max |Δlogit| {err:.3g} > {tol} ({dtype})"
    return err


# Every variant and every dtype once: each variant's math is the same code in every dtype, and the dtype
# policies are checked per dtype against PEFT on random layers in tests/test_fuzz.py.
@pytest.mark.parametrize("variant,dtype", [("lora", torch.float32), ("rslora", torch.float16),
                                           ("lora_bias", torch.bfloat16)], ids=str)
def test_logits_match_peft(adapter_dirs, dtype, variant):
    ids = input_ids()
    reference = peft.PeftModel.from_pretrained(make_model(dtype), str(adapter_dirs[variant]))
    with torch.no_grad():
        ref = reference(ids).logits
        base_only = make_model(dtype)(ids).logits
    assert (ref.float() - base_only.float()).abs().max() > 10 * LOGIT_TOL[dtype], "adapter must change the logits"

    model = qpass.prepare(make_model(dtype), str(adapter_dirs[variant]))
    with torch.no_grad():
        eager = model(ids).logits
    _close(eager, ref, dtype)
    compiled = torch.compile(model, backend=qpass.backend("inductor"))
    with torch.no_grad():
        out = compiled(ids).logits
    _close(out, ref, dtype)
    assert qpass.report(compiled).summary()["sites_rewritten"] == SITES


def test_one_optimizer_step_matches_peft(adapter_dirs):
    """float32; bf16 training is compared with eager qpass (PEFT's numerics, the logits above) through every
    compiled lowering in tests/test_kernels.py."""
    dtype = torch.float32
    ids, labels = input_ids(seed=1), input_ids(seed=2)
    path = str(adapter_dirs["lora_bias"])
    ref = sgd_updates(peft.PeftModel.from_pretrained(make_model(dtype), path, is_trainable=True), ids, labels)
    model = qpass.prepare(make_model(dtype), path)
    ours = sgd_updates(torch.compile(model, backend=qpass.backend("inductor")), ids, labels)
    assert set(ours) == set(ref) and len(ref) == SITES * 3
    assert all(u.norm() > 0 for u in ref.values()), "every adapter tensor must move"
    assert max_rel(ours, ref) < 1e-3


# What qpass saves, PEFT loads (its config and logits) and qpass loads back bit for bit: one adapter per kind of
# slot whose file layout differs (LoRA with rsLoRA, QA-LoRA with its pooled A, OFT's packed skew blocks). Each
# starts from PEFT's own save (non-zero tensors), and its tensors are scaled after loading, so the file qpass
# writes is not the one it read. (Was three copies: here, tests/test_qalora.py, tests/test_oft.py.)
ROUND_TRIPS = {  # PEFT config; the tensors given random values (std) in PEFT; those scaled in qpass (factor); config
    "lora-rslora": (lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL, use_rslora=True),
                    "lora_", 0.1, "lora_A", 1.5, {"use_rslora": True}),
    "qalora-G32-rslora": (lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL, use_qalora=True,
                                                  qalora_group_size=32, use_rslora=True),
                          "lora_", 0.1, "lora_A", 1.5, {"use_qalora": True, "qalora_group_size": 32, "use_rslora": True}),
    "oft-neumann3-r4": (lambda: peft.OFTConfig(target_modules=ALL, oft_block_size=0, r=4, num_cayley_neumann_terms=3),
                        "oft_R", 0.15, "oft_R", 1.3, {"r": 4, "oft_block_size": 0, "num_cayley_neumann_terms": 3}),
}


@pytest.mark.parametrize("kind", list(ROUND_TRIPS))
def test_saved_adapter_loads_in_peft_and_back(tmp_path, kind):
    config, randomized, std, scaled, factor, expect = ROUND_TRIPS[kind]
    source = peft.get_peft_model(eager_model(), config())
    randomize(source, (randomized,), std=std)
    source.save_pretrained(str(tmp_path / "peft"))
    ids = input_ids()
    model = qpass.prepare(eager_model(), str(tmp_path / "peft"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if scaled in name:
                p.mul_(factor)  # diverge from the loaded file, so the round trip is not trivially equal
        ours = model(ids).logits
    qpass.save_adapter(model, tmp_path / "saved")
    reloaded = peft.PeftModel.from_pretrained(eager_model(), str(tmp_path / "saved")).eval()
    cfg = reloaded.peft_config["default"]
    assert {k: getattr(cfg, k) for k in expect} == expect
    with torch.no_grad():
        assert_close(reloaded(ids).logits, ours)
    # and back into qpass, bit-exact
    again = qpass.prepare(eager_model(), str(tmp_path / "saved"))
    mine, back = (sorted((n, p) for n, p in m.named_parameters() if p.requires_grad) for m in (model, again))
    assert len(mine) == len(back) > 0
    for (n1, p1), (n2, p2) in zip(mine, back):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_peft_config_object_is_accepted():
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_rslora=True)
    model = qpass.prepare(make_model(), cfg)
    rows = [r for r in qpass.report(model).rows if r.adapter]
    assert len(rows) == LAYERS and all(r.rank == 2 for r in rows)
    slot = model.model.layers[0].self_attn.q_proj.qpass_adapters["default"]
    assert slot.scaling.item() == pytest.approx(4 / 2**0.5)
