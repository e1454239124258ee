"""AdaLoRA and QA-LoRA declare `low_rank` variants (qpass/spec.py, `LowRank`): AdaLoRA's E scales A's rows
(`rank_scale`) and its scaling is divided by ranknum (`scaling` as a function of the tensors); QA-LoRA's A reads
the group-pooled input (`down_input`). Both get sibling fusion; AdaLoRA the kernels that take the whole adapter
into the call, QA-LoRA the fold into dequant-cpu's GEMM; neither the adapter pool. Every fused form equals the
spec's own `compute` (eager qpass, PEFT's numerics: tests/test_adalora.py, tests/test_qalora.py)."""

import pytest
import torch

import qpass
from qpass import kernels, lowering
from qpass.lowering.cpp import CppBase

from conftest import LAYERS, LOGIT_TOL, SITES, bases as _bases, eager_and_counted, input_ids, make_model, randomize_adapters

QKV = ["q_proj", "k_proj", "v_proj"]
ALL = QKV + ["o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "adalora": lambda targets: qpass.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=targets),
    "qalora": lambda targets: qpass.LoraConfig(r=4, lora_alpha=8, use_qalora=True, qalora_group_size=16, target_modules=targets),
}
# float32 outputs of the same math summed in another order (|y| ~ 1)
SUM_ORDER_TOL = 2e-6
GEMV = "gemv-cpu (library layout, no copy)"
DEQUANT = "dequant-cpu (C++ unpack + GEMM, no copy)"
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="qpass's C++ kernels are not built here")


def _prepared(kind, targets, dtype=torch.float32):
    model = qpass.prepare(make_model(dtype), CONFIGS[kind](targets))
    randomize_adapters(model, match="qpass_adapters")  # B and E start at zero
    return model


def _counting(monkeypatch) -> dict:
    """Which kernel form each call of a C++ base took: the whole adapter in the call, or the folded up-projection."""
    calls = {"low_rank": 0, "folded_up": 0}
    for form in calls:
        real = getattr(CppBase, form)

        def counted(self, *args, _form=form, _real=real):
            calls[_form] += 1
            return _real(self, *args)

        monkeypatch.setattr(CppBase, form, counted)
    return calls


# (lowering, rows, gradient) -> the kernel form each kind takes in float32 (None: the base kernel, then the
# adapter in the graph). AdaLoRA computes x (A E)^T inside the kernels; QA-LoRA's t = pool(x) A^T is made in
# the graph, so only dequant-cpu's fold (which takes t) reads it.
FORMS = {
    ("torch-dequant", 1, False): (None, None), ("torch-dequant", 20, True): (None, None),
    ("gemv-cpu", 1, False): ("low_rank", None),
    ("dequant-cpu", 20, False): ("low_rank", "folded_up"), ("dequant-cpu", 20, True): (None, None),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_fused_form_equals_the_spec_s_compute(kind, dtype, monkeypatch):
    """The siblings' fused function (one down-projection for q/k/v) on each lowering, run eagerly, against
    each site's own `compute` around the same base. AdaLoRA keeps its `float32` policy: with bf16 activations no
    kernel takes its delta (dequant-cpu would round t and s B to bf16, gemv-cpu add it before the output's
    rounding), so it is the unfused math; QA-LoRA (`adapter` policy) takes dequant-cpu's fold as LoRA does.
    bf16: within one rounding of the output."""
    model = _prepared(kind, QKV, dtype)
    assert model._qpass.pool.key is None  # neither variant is pooled
    sites = [model._qpass.sites[f"model.layers.0.self_attn.{p}"] for p in QKV]
    names = ("default",)
    calls = _counting(monkeypatch)
    for (low, rows, grad), forms in FORMS.items():
        if low != "torch-dequant" and not kernels.available():
            continue
        x = torch.randn(1, rows, sites[0].info.in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
        xa = sites[0].adapter_inputs(x, names, False, None)
        adapters = [s.slots["default"].tensors() for s in sites]
        own = [s.base_tensors() for s in sites]
        before = dict(calls)
        with torch.set_grad_enabled(grad):
            fused = lowering.lowered_group(sites, names, low, grad)(x, xa[0], own, adapters)
            alone = [s.lowered(names, low, grad)(x, xa, b, a) for s, b, a in zip(sites, own, adapters)]
        want = forms[kind == "qalora"] if dtype == torch.float32 or kind == "qalora" else None
        taken = [form for form in calls if calls[form] > before[form]]
        assert taken == ([want] if want else []), (low, rows, grad, taken)
        tol = SUM_ORDER_TOL if dtype == torch.float32 else 2 ** -7  # bf16: one rounding of the output
        for f, a in zip(fused, alone):
            torch.testing.assert_close(f.float(), a.float(), rtol=tol, atol=tol)


def _compiled_step(kind, seq):
    model = _prepared(kind, ALL)
    ids = input_ids(batch=1, seq=seq)
    ref, out, counts = eager_and_counted(model, ids)  # eager: the spec's compute around the library's kernel
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_TOL[torch.float32])
    bases = _bases(model)
    assert sum("fused q_proj+k_proj+v_proj" in b for b in bases) == 3 * LAYERS, bases
    assert sum("fused gate_proj+up_proj" in b for b in bases) == 2 * LAYERS, bases
    assert model._qpass.pool.key is None
    return bases, counts


@needs_kernels
def test_adalora_decode_runs_inside_the_gemv_kernel():
    """One token: q/k/v and gate/up fused, every site's A E, B and scaling / ranknum in its gemv call, so the
    graph's only GEMM is lm_head's."""
    bases, counts = _compiled_step("adalora", 1)
    assert len(bases) == SITES and all(b.startswith(GEMV) for b in bases), bases
    assert counts == [1], counts


@needs_kernels
def test_qalora_prefill_folds_into_the_dequant_gemm():
    """20 tokens: q/k/v and gate/up fused; per fused group or single site one down-projection GEMM on the
    pooled input (4 per layer), its up-projection folded into dequant-cpu's GEMM; plus lm_head's."""
    bases, counts = _compiled_step("qalora", 20)
    assert len(bases) == SITES and all(b.startswith(DEQUANT) for b in bases), bases
    assert counts == [4 * LAYERS + 1], counts
