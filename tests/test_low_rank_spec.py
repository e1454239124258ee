"""A user's spec that declares `low_rank` gets the engine's fused forms, whatever its name (qpass/lowering/
low_rank.py): siblings share one down-projection, gemv-cpu takes the adapter into its kernel call and reads it
from the adapter pool, dequant-cpu folds it into its GEMM. Its logits equal its own `compute` run eagerly,
and LoRA's with the same weights."""

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import qpass
from qpass import kernels
from qpass.spec import LowRank

from conftest import LAYERS, LOGIT_TOL, SITES, bases as _bases, eager_and_counted, input_ids, make_model, randomize_adapters


@qpass.register_config
@dataclass
class ScaledLowRankConfig(qpass.AdapterConfig):
    peft_type = "TEST_SCALED_LOW_RANK"
    r: int = 4
    alpha: float = 8.0
    undeclared: bool = False  # selects UNDECLARED: the same math without the `low_rank` declaration


SPEC = qpass.register(
    qpass.AdapterSpec(
        name="scaled-low-rank",
        config=ScaledLowRankConfig,
        attach="output",
        dtype_policy="adapter",
        params=lambda site, cfg: {
            "down.weight": qpass.Param((cfg.r, site.in_features), lambda t: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))),
            "up.weight": qpass.Param((site.out_features, cfg.r), torch.nn.init.zeros_),
        },
        constants=lambda site, cfg: {"s": cfg.alpha / cfg.r},
        compute=lambda x, p: F.linear(F.linear(x, p["down.weight"]), p["up.weight"]) * p["s"],
        applies=lambda cfg: not cfg.undeclared,
        low_rank=LowRank(a="down.weight", b="up.weight", scaling="s", bias=None),
        description="LoRA under other names (tests/test_low_rank_spec.py)",
    ),
    replace=True,
)
UNDECLARED = qpass.register(
    dataclasses.replace(SPEC, name="undeclared-low-rank", applies=lambda cfg: cfg.undeclared, low_rank=None), replace=True)

# fp32 logits (|logit| ~ 1) of two forms that differ only in the order the adapter's products are summed
SUM_ORDER_TOL = 2e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _prepared(seed=0, **cfg):
    model = qpass.prepare(make_model(), ScaledLowRankConfig(target_modules=TARGETS, **cfg))
    randomize_adapters(model, seed, match="qpass_adapters")  # up starts at zero
    return model


@pytest.mark.skipif(not kernels.available(), reason="qpass's C++ kernels are not built here")
@pytest.mark.parametrize("seq,kernel", [(1, "gemv-cpu (library layout, no copy)"), (20, "dequant-cpu (C++ unpack + GEMM, no copy)")])
def test_a_declared_low_rank_spec_gets_the_fused_kernels(seq, kernel):
    model = _prepared()
    ids = input_ids(batch=1, seq=seq)
    ref, out, counts = eager_and_counted(model, ids)  # eager: the spec's compute around the library's kernel
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_TOL[torch.float32])
    bases = _bases(model)
    assert len(bases) == SITES and all(b.startswith(kernel) for b in bases), bases
    assert sum("fused q_proj+k_proj+v_proj" in b for b in bases) == 3 * LAYERS
    assert sum("fused gate_proj+up_proj" in b for b in bases) == 2 * LAYERS
    # the adapter ran inside the kernel calls: the graph's only GEMM is lm_head's
    assert counts == [1], counts
    if seq == 1:  # the decode step read the adapters from the model's pool
        assert model._qpass.pool.key is not None
        assert all(slot.pool_entry is not None for s in model._qpass.sites.values() for slot in s.slots.values())


def test_the_same_weights_as_lora_give_lora_s_logits():
    ours = _prepared()
    lora = qpass.prepare(make_model(), qpass.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        mine = dict(ours.named_parameters())
        for name, p in lora.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(mine[name.replace("lora_A", "down").replace("lora_B", "up")])
    ids = input_ids(batch=1, seq=1)
    with torch.no_grad():
        a = torch.compile(ours, backend=qpass.backend("aot_eager"))(ids).logits
        b = torch.compile(lora, backend=qpass.backend("aot_eager"))(ids).logits
    assert torch.equal(a, b)
    assert _bases(ours) == _bases(lora)


def test_a_spec_without_the_declaration_is_not_fused():
    """The same math without `low_rank`: each site runs the spec's `compute` around its own base call, and its
    logits are the declared spec's with the same weights (both compiled: the same base kernels, so only the
    adapter's summation order differs)."""
    model = _prepared(undeclared=True)
    assert next(iter(model._qpass.sites.values())).slots["default"].spec is UNDECLARED
    ids = input_ids(batch=1, seq=1)
    with torch.no_grad():
        out = torch.compile(model, backend=qpass.backend("aot_eager"))(ids).logits
        ref = torch.compile(_prepared(), backend=qpass.backend("aot_eager"))(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=SUM_ORDER_TOL)
    bases = _bases(model)
    assert len(bases) == SITES and not any("fused" in b for b in bases), bases
    assert model._qpass.pool.key is None
