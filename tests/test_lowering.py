"""Base lowerings chosen per device/mode (qpass/lowering/) and fused sibling adapters (qpass/rewrite.py):
each compared with eager qpass (the library kernel + the spec's math, PEFT's numerics), gradients included.
inner="aot_eager" keeps these fast; the lowering happens in the qpass rewrite whatever the inner backend."""

import pytest
import torch

import qpass
from qpass import kernels, lowering
from qpass.testing import tiny_awq_llama

from conftest import LAYERS, LOGIT_TOL, SITES, bases as _bases, eager_and_compiled, eager_and_counted, input_ids, make_model, randomize_adapters

CFG = dict(r=4, lora_alpha=8, target_modules="all-linear")


MODELS = {
    "gptq-sym": lambda: make_model(torch.bfloat16),
    "gptq-asym-act-order": lambda: make_model(torch.bfloat16, sym=False, desc_act=True),
    "awq-autoawq": lambda: tiny_awq_llama(dtype=torch.bfloat16),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_decode_uses_the_int4_kernel_and_matches_eager(kind):
    """GPTQ with groups in order and AWQ: qpass's gemv on the library's own packing (no copy; the bf16
    all-linear cases of tests/test_kernels.py::test_compiled_decode_through_the_kernel_keeps_no_copy); act-order
    GPTQ: aten's int4 kernel on a repacked copy."""
    model = qpass.prepare(MODELS[kind](), qpass.LoraConfig(**CFG))
    randomize_adapters(model)
    ref, out, bases, _ = eager_and_compiled(model, input_ids(batch=1, seq=1), inner="aot_eager")
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_TOL[torch.bfloat16])
    gemv = kind != "gptq-asym-act-order" and kernels.available()
    kernel = "gemv-cpu (library layout, no copy)" if gemv else "int4pack-cpu bf16"
    assert len(bases) == SITES and all(b.startswith(kernel) for b in bases), bases
    assert sum("fused q_proj+k_proj+v_proj" in b for b in bases) == 3 * LAYERS
    assert sum("fused gate_proj+up_proj" in b for b in bases) == 2 * LAYERS
    repacked = lowering.repacked_bytes(list(model._qpass.sites.values()))
    assert (repacked == 0) if gemv else (repacked > 0)


def test_the_cpp_kernels_build_here():
    """The kernel tests skip where the kernels cannot be built (no compiler); on a machine with the compiler
    inductor needs anyway (CI), a build failure must fail loudly, not fall back quietly."""
    import os
    import shutil

    if os.environ.get("QPASS_CPP_KERNELS", "1") == "0" or shutil.which("c++") is None:
        pytest.skip("kernels disabled or no C++ compiler")
    assert kernels.available(), kernels.unavailable_reason()


def test_lowering_per_workload_layout_and_dtype():
    site_x = torch.empty(1, 40, 64, dtype=torch.bfloat16)
    model = qpass.prepare(make_model(torch.bfloat16), qpass.LoraConfig(**CFG))
    site = next(iter(model._qpass.sites.values()))
    cpp = kernels.available()
    assert lowering.choose(site, site_x, needs_grad=False) == ("dequant-cpu" if cpp else "torch-dequant")  # prefill
    assert lowering.choose(site, site_x.float(), needs_grad=False) == ("dequant-cpu" if cpp else "torch-dequant")
    assert lowering.choose(site, site_x[:, :1], needs_grad=False) == ("gemv-cpu" if cpp else "int4pack-cpu")
    # training: a differentiable base (the C++ GEMM has a backward)
    assert lowering.choose(site, site_x[:, :1], needs_grad=True) == ("dequant-cpu" if cpp else "torch-dequant")
    assert lowering.choose(site, site_x, needs_grad=False, requested="torch-dequant") == "torch-dequant"
    assert lowering.choose(site, site_x[:, :1].float(), needs_grad=False) == ("gemv-cpu" if cpp else "torch-dequant")
    assert lowering.choose(site, site_x[:, :1], needs_grad=False, requested="int4pack-cpu") == "int4pack-cpu"
    act_order = qpass.prepare(make_model(torch.bfloat16, sym=False, desc_act=True), qpass.LoraConfig(**CFG))
    site = next(iter(act_order._qpass.sites.values()))
    assert lowering.choose(site, site_x[:, :1], needs_grad=False) == "int4pack-cpu"  # groups out of order
    assert lowering.choose(site, site_x[:, :1].float(), needs_grad=False) == "torch-dequant"  # fp32 int4 kernel is slow


def test_fused_siblings_equal_unfused_fp32():
    model = qpass.prepare(make_model(), qpass.LoraConfig(**CFG))
    randomize_adapters(model)
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        fused = torch.compile(model, backend=qpass.backend("aot_eager"))(ids).logits
        torch._dynamo.reset()
        unfused = torch.compile(model, backend=qpass.backend("aot_eager", fuse_siblings=False))(ids).logits
    torch.testing.assert_close(fused, ref, rtol=0, atol=LOGIT_TOL[torch.float32])
    torch.testing.assert_close(unfused, ref, rtol=0, atol=LOGIT_TOL[torch.float32])


def test_sites_with_dropout_are_not_fused():
    model = qpass.prepare(make_model(), qpass.LoraConfig(lora_dropout=0.1, **CFG))
    model.train()
    compiled = torch.compile(model, backend=qpass.backend("aot_eager"))
    compiled(input_ids()).logits.sum().backward()
    assert not any("fused" in b for b in _bases(compiled))


def test_forced_int4_kernel_trains_with_correct_gradients():
    """The int4 kernel has no derivative; qpass::int4pack_mm_cpu gives it one (dx = dy @ W^T)."""
    torch.manual_seed(0)
    model = qpass.prepare(make_model(torch.bfloat16), qpass.LoraConfig(**CFG))
    randomize_adapters(model)
    model.train()
    embeds = model.model.embed_tokens(input_ids(batch=1, seq=1)).detach()
    grads = {}
    for name, run in (("eager", model), ("int4", torch.compile(model, backend=qpass.backend("aot_eager", lowering="int4pack-cpu")))):
        e = embeds.clone().requires_grad_(True)
        run(inputs_embeds=e).logits.float().pow(2).mean().backward()
        grads[name] = [e.grad.float()] + [p.grad.float().clone() for n, p in sorted(model.named_parameters()) if p.requires_grad]
        model.zero_grad(set_to_none=True)
    assert any("int4pack-cpu" in b for b in _bases(model))
    assert grads["eager"][0].abs().max() > 0  # dx reaches the input through every quantized base
    assert sum(bool(g.abs().max() > 0) for g in grads["eager"]) > len(grads["eager"]) // 2  # (k/v see one token: 0)
    for ours, ref in zip(grads["int4"], grads["eager"]):
        assert (ours - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-6


def test_int4pack_op_passes_opcheck():
    model = qpass.prepare(make_model(torch.bfloat16), qpass.LoraConfig(**CFG))
    site = next(iter(model._qpass.sites.values()))
    packed = lowering.packed_for([site], "cpu")
    x = torch.randn(3, site.info.in_features, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.qpass.int4pack_mm_cpu, (x, packed.weight, packed.scales_and_zeros, packed.group_size))


@pytest.mark.parametrize("dtype,bias", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_adapter_linear_reduce_form_equals_linear(dtype, bias):
    """The one-row (decode) form of an adapter matmul: multiply + sum in float32, one rounding."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 96, generator=g).to(dtype)
    w = torch.randn(40, 96, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype) if bias else None
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    out = lowering.adapter_linear(x, w, b, reduce=True)
    assert out.dtype == dtype and out.shape == (1, 1, 40)
    tol = {torch.float32: 1e-5, torch.bfloat16: 4e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


# (gemv with LoRA at several rows is the kernel's own test, tests/test_kernels.py::test_gemv_adds_each_sites_lora)
@pytest.mark.parametrize("gemv_lora,seq,adapter_mms", [(True, 1, 0), (False, 1, 0), (False, 3, (4 + 7) * LAYERS)])
def test_decode_step_lora_runs_without_gemm_calls_and_matches_eager_fp32(gemv_lora, seq, adapter_mms, monkeypatch):
    """No gradient, <= 16 tokens: the fp32 bases run qpass's gemv kernel and their LoRA runs inside it
    (lowering.GEMV_LORA), so the forward graph's one GEMM is lm_head. Without that: at one token every LoRA
    site (fused q/k/v, gate/up, and the single o/down) takes the multiply + sum form (still no GEMM); with 3
    tokens the adapters are GEMMs (per layer 4 down-projections, 2 fused + 2 single, and 7 up).
    fp32 logits equal eager qpass (the library kernel + F.linear) at fp32 tolerance every way."""
    monkeypatch.setattr(lowering, "GEMV_LORA", gemv_lora)
    model = qpass.prepare(make_model(), qpass.LoraConfig(**CFG))
    randomize_adapters(model)
    # the GEMMs counted are the separate form's on the slots' own tensors: on views of the adapter pool
    # (qpass.pool) inductor runs some of these tiny GEMMs as its own loops, so fewer would be counted
    qpass.pool.drop(model._qpass)
    ids = input_ids(batch=1, seq=seq)
    ref, out, counts = eager_and_counted(model, ids)  # eager: the spec's compute around the library's kernel
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_TOL[torch.float32])
    bases = _bases(model)
    assert sum("fused" in b for b in bases) == 5 * LAYERS and len(bases) == SITES, bases
    assert all(b.startswith("gemv-cpu (library layout, no copy)") for b in bases), bases
    assert lowering.repacked_bytes(list(model._qpass.sites.values())) == 0
    assert counts == [1 + adapter_mms], counts


def _op_counting_backend(counts: list, op):
    """aot_eager that records how many calls of `op` each forward graph makes."""
    from torch._dynamo.backends.common import aot_autograd

    def fw(gm, example_inputs):
        counts.append(sum(n.op == "call_function" and n.target is op for n in gm.graph.nodes))
        return gm.forward

    return aot_autograd(fw_compiler=fw)


# each kernel once (the sibling call is the same code in every activation dtype)
@pytest.mark.parametrize("dtype,seq,op", [(torch.float32, 1, "gptq4_gemv"), (torch.bfloat16, 24, "gptq4_mm")])
def test_disabled_adapters_still_fuse_sibling_bases(dtype, seq, op):
    """With every adapter disabled, q/k/v and gate/up still run as one C++ kernel call each (4 calls per layer,
    not 7). The logits equal the unfused compiled model's bit for bit (siblings in one call compute exactly
    what separate calls do) and eager qpass's base (the library kernel) within the dtype's tolerance; fp32
    gets 5e-4, not 2e-4: without adapters the base difference is all there is (gptqmodel rounds s(q - z) to
    the scales' fp16, the kernel does not; README, Limits)."""
    if not kernels.available():
        pytest.skip("qpass's C++ kernels did not build here")
    model = qpass.prepare(make_model(dtype), qpass.LoraConfig(**CFG))
    randomize_adapters(model)
    ids = input_ids(batch=1, seq=seq)
    counts = []
    target = getattr(torch.ops.qpass_kernels, op).default
    with torch.no_grad(), qpass.disable_adapters(model):
        ref = model(ids).logits
        out = torch.compile(model, backend=qpass.backend(_op_counting_backend(counts, target)))(ids).logits
        torch._dynamo.reset()
        apart = torch.compile(model, backend=qpass.backend("aot_eager", fuse_siblings=False))(ids).logits
    torch.testing.assert_close(out, apart, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-4 if dtype == torch.float32 else LOGIT_TOL[dtype])
    layers = model.config.num_hidden_layers
    assert counts == [4 * layers], counts
    bases = _bases(model)
    assert sum("fused" in b for b in bases) == 5 * layers and len(bases) == 7 * layers, bases
