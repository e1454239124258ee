"""qpass's CPU kernels (qpass/kernels) on real gptqmodel layers.

gptq4_gemv / awq4_gemv (decode): equal the library's own dequantized weight times x (gptqmodel's GPTQ
packing, AutoAWQ's GEMM packing), for every row- and column-blocking path, group sizes, scale dtypes and
sibling sites concatenated in one call; a compiled decode step of a tiny Llama through them equals eager
qpass in fp32, fp16 and bf16 without keeping any copy.

gptq4_dequant / gptq4_mm (prefill, training): the unpacked weight equals gptqmodel's dequantize cast to the
activation dtype bit for bit (every scales x output dtype); the GEMM equals x @ that weight across column
chunk boundaries; its dx equals autograd's through the plain-torch base; compiled prefill and training of a
tiny Llama through it equal eager qpass (logits, adapter gradients). bf16 x on AVX512-BF16 takes the panel
GEMM (every layout, K slices, half panels, row tails) and `_mm_lora` computes LoRA inside the call: both
against float64 within the float32-accumulation bound and the stated roundings.

Instruction sets: this process tests the path -march=native takes here; test_forced_isa_builds_pass_the_kernel_checks
builds the others (QPASS_CPU_ISA=avx512 where the CPU has it, avx2, portable) and runs a compact subset of these
cases under each, asserting which path the library says it took."""

import pytest
import torch

import qpass
from qpass import kernels, lowering
from qpass.quant import layouts, match
from qpass.quant.packing import int4pack_block_n
from qpass.quant.gptqmodel import dequantize
from qpass.testing import awq_linear_from, gptq_linear_from, tiny_awq_llama

from conftest import LOGIT_TOL, SITES, adapter_grads, bases as report_bases, eager_and_compiled, input_ids, make_model, randomize_adapters

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.unavailable_reason()}")


def _layer(k, n, group, seed):
    torch.manual_seed(seed)
    return gptq_linear_from(torch.nn.Linear(k, n, bias=False), bits=4, group_size=group, sym=False)


# gemv: both layouts it reads. GPTQ: gptqmodel's packing (8 rows of K per word); AWQ: AutoAWQ's WQLinear_GEMM
# (8 columns per word, interleaved).
LAYOUTS = ["gptq", "awq"]
AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ: the nibble of column i of a word
GEMV = {"gptq": kernels.gptq4_gemv, "awq": kernels.awq4_gemv}


def _gemv_layer(layout, k, n, group, seed):
    if layout == "gptq":
        return _layer(k, n, group, seed)
    torch.manual_seed(seed)
    return awq_linear_from(torch.nn.Linear(k, n, bias=False), bits=4, group_size=group)


def _codes(layout, q):
    """(codes (K, N), zero codes (G, N)) of a 4-bit layer, in column order, unpacked in plain torch."""
    if layout == "awq":
        unpack = lambda t: torch.stack([(t >> (4 * i)) & 15 for i in AWQ_NIBBLE], 2).reshape(t.shape[0], -1)
        return unpack(q.qweight), unpack(q.qzeros)
    k = q.qweight.shape[0] * 8
    codes = torch.stack([(q.qweight >> (4 * j)) & 15 for j in range(8)], 1).reshape(k, -1)
    zeros = torch.stack([(q.qzeros >> (4 * j)) & 15 for j in range(8)], 2).reshape(q.scales.shape[0], -1)
    return codes, zeros


def _exact(layout, q, scales=None):
    """s * (q - z) in float64, no rounding."""
    s = (q.scales if scales is None else scales).double()
    codes, zeros = _codes(layout, q)
    g = torch.arange(codes.shape[0]) // (codes.shape[0] // s.shape[0])
    return s[g] * (codes - zeros[g]).double()


def _gemv_args(qs, group):
    return [q.qweight for q in qs], [q.qzeros for q in qs], [q.scales for q in qs], group


def _gemv_bound(x, q, layout):
    """What gemv's float32 accumulation may be off by, per output: per group it sums x (c + q) and takes
    (c + z) sum x off (c = 16 in the bf16 loop, else 0), so the terms are |x| |s| (c + q) and |x| |s| (c + z):
    a few float32 ulps of their sum."""
    c = 16 if x.dtype == torch.bfloat16 and kernels.gemv_bf16_loop() else 0
    codes, zeros = _codes(layout, q)
    k = codes.shape[0]
    g = torch.arange(k) // (k // q.scales.shape[0])
    mag = q.scales.double().abs()[g] * (2 * c + codes + zeros[g]).double()
    return 8 * 2**-24 * (x.double().abs() @ mag) * k ** 0.5


GEMV_SHAPES = [(256, 224, 32), (128, 128, 64), (384, 64, 128), (256, 32, 256)]  # (K, N, group)
DTYPE_ID = lambda d: str(d).replace("torch.", "")  # readable ids: the forced-ISA subset names cases by them


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_reference_is_the_library_weight(layout):
    """`_exact`, the float64 s * (q - z) the gemv cases compare with, is the library's own dequantized weight
    before its float16 rounding (gptqmodel's TorchLinear.dequantize_weight, AutoAWQ's dequantize_gemm), at
    every group size those cases use. Once per layer class, not per case: packing does not depend on the
    values (it was checked in each of the 80 gemv cases). gptqmodel's method is called as the class defines
    it, not through the torch.compile wrapper the layer puts on it (the same ops; compiling it per shape cost
    90 s here)."""
    for k, n, group in GEMV_SHAPES:
        q = _gemv_layer(layout, k, n, group, seed=n)
        if layout == "gptq":
            lib = type(q).dequantize_weight(q)
        else:
            from awq.utils.packing_utils import dequantize_gemm

            lib = dequantize_gemm(q.qweight, q.qzeros, q.scales, 4, group)
        torch.testing.assert_close(_exact(layout, q).half(), lib, rtol=0, atol=0, msg=f"{layout} {k}x{n} g{group}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16])
@pytest.mark.parametrize("k,n,group", GEMV_SHAPES)
def test_gemv_equals_the_library_weight(layout, dtype, rows, k, n, group):
    """Every row-blocking path: GPTQ 1 row, 4-row blocks and their tails, 128-, 64- and 16-column blocks; AWQ
    1 row, 2-row blocks, whole 128-column blocks and a tail of fewer words (224 = 128 + 96 columns). Against
    `_exact`, which test_the_reference_is_the_library_weight ties to the library's own weight."""
    q = _gemv_layer(layout, k, n, group, seed=rows + n)
    exact = _exact(layout, q)
    x = torch.randn(rows, k, dtype=dtype)
    out = GEMV[layout](x, *_gemv_args([q], group))
    ref = x.double() @ exact
    assert out.dtype == dtype and out.shape == (rows, n)
    err = (out.double() - ref).abs()
    assert (err <= _rounded(_gemv_bound(x, q, layout), ref, dtype)).all(), err.max()


def _rounded(bound, ref, dtype):
    """`bound` on the float32 accumulation, plus the one rounding to a bfloat16 output (2^-8 relative)."""
    return bound if dtype == torch.float32 else bound + 2**-8 * (ref.abs() + bound)


def _cpu_flags() -> set:
    return set(kernels._cpu_flags().split())


def _native_isa() -> str:
    """The path -march=native takes on this CPU: packed_check.h's #if chain over /proc/cpuinfo's flags."""
    flags = _cpu_flags()
    if "avx512f" in flags:
        return "avx512-bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2" if {"avx2", "fma", "f16c"} <= flags else "portable"


def test_the_build_took_the_isa_asked_for():
    """The library says which #if path it was compiled for: under QPASS_CPU_ISA=avx512|avx2|portable that one
    (test_forced_isa_builds_pass_the_kernel_checks runs this in each forced build), else the one this CPU's
    flags select; gemv's AVX512-BF16 loop exactly where that path is avx512-bf16 (the CPU has AVX512-BF16)."""
    asked = kernels.requested_isa()
    want = _native_isa() if asked == "native" else asked
    assert kernels.isa() == want, (asked, sorted(f for f in _cpu_flags() if f.startswith(("avx", "fma", "f16c"))))
    assert kernels.gemv_bf16_loop() == (want == "avx512-bf16")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
def test_gemv_adds_each_sites_lora(layout, dtype, rows, lora_dtype):
    """Siblings of different ranks (each site's t at its own offset) and ranks over 16 (two vector loads);
    bfloat16 A and B are read as they are and multiplied in float32 (the reference uses their exact values)."""
    layers = [_gemv_layer(layout, 256, n, 64, seed=n) for n in (128, 64, 224)]
    ranks = (4, 16, 21)
    torch.manual_seed(rows)
    a = [torch.randn(r, 256).to(lora_dtype) for r in ranks]
    b = [torch.randn(q.scales.shape[1], r).to(lora_dtype) for q, r in zip(layers, ranks)]
    scaling = [torch.tensor(v) for v in (0.5, 2.0, 0.125)]
    x = torch.randn(rows, 256, dtype=dtype)
    args = _gemv_args(layers, 64)
    gemv = GEMV[layout]
    out = gemv(x, *args, a, b, scaling)
    assert out.dtype == dtype
    base = torch.cat([x.double() @ _exact(layout, q) for q in layers], 1)
    delta = torch.cat([s.double() * (x.double() @ ai.double().t()) @ bi.double().t() for ai, bi, s in zip(a, b, scaling)], 1)
    mag = torch.cat([s.double() * (x.double().abs() @ ai.double().abs().t()) @ bi.double().abs().t()
                     for ai, bi, s in zip(a, b, scaling)], 1)
    # the base as without LoRA; the LoRA part in float32: ulps of sum |t||B|; one rounding of the sum
    bound = torch.cat([_gemv_bound(x, q, layout) for q in layers], 1) + 16 * 2**-24 * mag
    ref = base + delta
    assert ((out.double() - ref).abs() <= _rounded(bound, ref, dtype)).all()
    with pytest.raises(RuntimeError, match="site 1's LoRA must be contiguous CPU tensors A \\(r, 256\\)"):
        gemv(x, *args, a, [b[0], b[0], b[2]], scaling)
    with pytest.raises(RuntimeError, match="site 0's LoRA .* both float32 or both bfloat16"):
        gemv(x, *args, [a[0].half(), *a[1:]], [b[0].half(), *b[1:]], scaling)

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
def test_gemv_reads_lora_from_a_pool_as_from_tensors(layout, lora_dtype):
    """`gemv_pooled` (qpass.pool: every A and B in one flat tensor, the scalings in another, offsets per site)
    does the same arithmetic as the tensor-list form: equal bit for bit; an offset past the pool is refused."""
    layers = [_gemv_layer(layout, 256, n, 64, seed=n) for n in (128, 64, 224)]
    ranks = (4, 16, 21)
    torch.manual_seed(7)
    a = [torch.randn(r, 256).to(lora_dtype) for r in ranks]
    b = [torch.randn(q.scales.shape[1], r).to(lora_dtype) for q, r in zip(layers, ranks)]
    scaling = [torch.tensor(v) for v in (0.5, 2.0, 0.125)]
    pieces, ints, at = [], [], 5  # A and B at odd offsets, the scalings out of order
    for i, (ai, bi) in enumerate(zip(a, b)):
        pieces += [torch.zeros(5 if i == 0 else 0, dtype=lora_dtype), ai.reshape(-1), bi.reshape(-1)]
        ints += [at, at + ai.numel(), ai.shape[0], 2 - i]
        at += ai.numel() + bi.numel()
    data, scalings = torch.cat(pieces), torch.stack(scaling[::-1])
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    args = _gemv_args(layers, 64)
    assert torch.equal(kernels.gemv_pooled(layout == "awq", x, *args, data, scalings, ints),
                       GEMV[layout](x, *args, a, b, scaling))
    with pytest.raises(RuntimeError, match="site 2's LoRA lies outside the adapter pool"):
        kernels.gemv_pooled(layout == "awq", x, *args, data[:-1], scalings, ints)



@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=DTYPE_ID)
def test_siblings_in_one_call_equal_separate_calls(layout, scale_dtype):
    layers = [_gemv_layer(layout, 128, n, 32, seed=n) for n in (128, 32, 64)]
    x = torch.randn(2, 128)
    scales = [q.scales.to(scale_dtype) for q in layers]
    gemv = GEMV[layout]
    together = gemv(x, [q.qweight for q in layers], [q.qzeros for q in layers], scales, 32)
    apart = [gemv(x, [q.qweight], [q.qzeros], [s], 32) for q, s in zip(layers, scales)]
    torch.testing.assert_close(together, torch.cat(apart, 1), rtol=0, atol=0)
    for q, s, y in zip(layers, scales, apart):
        torch.testing.assert_close(y.double(), x.double() @ _exact(layout, q, s), rtol=0, atol=1e-4)


def test_bad_input_names_the_site_and_the_layout():
    q = _layer(128, 64, 32, seed=0)
    with pytest.raises(RuntimeError, match="gptq4_gemv: site 1 is not 4-bit GPTQ packing"):
        kernels.gptq4_gemv(torch.randn(1, 128), [q.qweight, q.qweight[:, :8]], [q.qzeros, q.qzeros], [q.scales, q.scales], 32)
    with pytest.raises(RuntimeError, match="group 48 must be a multiple of 8 dividing in_features 128"):
        kernels.gptq4_gemv(torch.randn(1, 128), [q.qweight], [q.qzeros], [q.scales], 48)
    a = _gemv_layer("awq", 128, 64, 32, seed=0)
    with pytest.raises(RuntimeError, match="awq4_gemv: site 0 is not 4-bit AWQ packing"):
        kernels.awq4_gemv(torch.randn(1, 128), [q.qweight], [q.qzeros], [q.scales], 32)  # GPTQ's buffers
    with pytest.raises(RuntimeError, match="awq4_gemv: group 4 must be a multiple of 8"):
        kernels.awq4_gemv(torch.randn(1, 128), [a.qweight], [a.qzeros.repeat_interleave(8, 0)],
                          [a.scales.repeat_interleave(8, 0)], 4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
def test_fake_kernel_matches_the_real_one(layout, dtype):
    q = _gemv_layer(layout, 128, 96, 32, seed=1)
    x, args = torch.randn(3, 128, dtype=dtype), _gemv_args([q], 32)
    op = getattr(torch.ops.qpass_kernels, f"{layout}4_gemv")
    torch.library.opcheck(op, (x, *args, [], [], []))
    lora = ([torch.randn(4, 128)], [torch.randn(96, 4)], [torch.tensor(0.5)])
    torch.library.opcheck(op, (x, *args, *lora))


@pytest.mark.parametrize("layout,dtype,targets", [
    ("gptq", torch.float16, "all-linear"), ("gptq", torch.bfloat16, ["q_proj", "down_proj"]),
    ("awq", torch.float16, "all-linear"), ("awq", torch.bfloat16, ["q_proj", "down_proj"])])
def test_compiled_decode_through_the_kernel_keeps_no_copy(layout, dtype, targets):
    """All sites LoRA (siblings fused into one kernel call), or some base-only sites. bf16 with every site LoRA:
    tests/test_lowering.py::test_decode_uses_the_int4_kernel_and_matches_eager (GPTQ and AWQ: these assertions,
    under aot_eager) and test_lora_inside_the_gemv_equals_the_separate_form below (inductor); fp32:
    test_lowering.py::test_decode_step_lora_runs_without_gemm_calls_and_matches_eager_fp32 and the same."""
    base = make_model(dtype) if layout == "gptq" else tiny_awq_llama(dtype=dtype)
    model = qpass.prepare(base, qpass.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_adapters(model)
    ref, out, bases, _ = eager_and_compiled(model, input_ids(batch=1, seq=1))
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_TOL[dtype])
    assert len(bases) == SITES and all(b.startswith("gemv-cpu (library layout, no copy)") for b in bases), bases
    assert lowering.repacked_bytes(list(model._qpass.sites.values())) == 0


# each layout, activation dtype and adapter dtype once (the kernel's own test above takes every combination)
@pytest.mark.parametrize("layout,dtype,adapter_dtype", [
    ("gptq", torch.float32, torch.float32), ("gptq", torch.bfloat16, torch.bfloat16),
    ("awq", torch.bfloat16, torch.float32)])
def test_lora_inside_the_gemv_equals_the_separate_form(layout, dtype, adapter_dtype, monkeypatch):
    """lowering.GEMV_LORA: LoRA's arithmetic inside the kernel (float32, from float32 or bfloat16 adapters),
    rounded once with the base, against the separate form (the base rounded to the activation dtype, then the
    delta added: PEFT's order; for bfloat16 adapters PEFT's bfloat16 roundings of t and the delta too)."""
    base = make_model(dtype) if layout == "gptq" else tiny_awq_llama(dtype=dtype)
    model = qpass.prepare(base, qpass.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                          adapter_dtype=adapter_dtype)
    assert all(p.dtype == adapter_dtype for n, p in model.named_parameters() if "lora_" in n)
    randomize_adapters(model)
    ids = input_ids(batch=1, seq=1)
    ref, fused, _, _ = eager_and_compiled(model, ids)
    torch._dynamo.reset()
    monkeypatch.setattr(lowering, "GEMV_LORA", False)
    _, apart, _, _ = eager_and_compiled(model, ids)
    tol = {torch.float32: 1e-5, torch.bfloat16: LOGIT_TOL[torch.bfloat16]}[dtype]
    torch.testing.assert_close(fused, apart, rtol=0, atol=tol)
    torch.testing.assert_close(fused, ref, rtol=0, atol=LOGIT_TOL[dtype])
    assert not torch.equal(fused, apart)  # the two forms did run (different roundings)


# ---- gptq4_dequant / gptq4_mm: the prefill and training base ------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=DTYPE_ID)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_ID)
@pytest.mark.parametrize("k,n,group", [(256, 224, 32), (384, 64, 128), (256, 32, 256)])
def test_dequant_is_the_library_weight_bit_for_bit(scale_dtype, out_dtype, k, n, group):
    """s * (q - z) rounded to the scales' dtype (gptqmodel's multiply), then to the activation dtype."""
    q = _layer(k, n, group, seed=n)
    info = match(q)
    scales = q.scales.to(scale_dtype)
    ref = dequantize(info, q.qweight, q.qzeros, scales, q.g_idx).to(out_dtype)
    out = kernels.gptq4_dequant([q.qweight], [q.qzeros], [scales], group, out_dtype)
    assert out.dtype == out_dtype and out.shape == (k, n)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
@pytest.mark.parametrize("ns", [(96,), (384, 320, 64)])  # one chunk; 768 columns over two 512-column chunks
def test_gemm_equals_x_times_the_unpacked_weight(dtype, ns):
    layers = [_layer(128, n, 32, seed=n) for n in ns]
    args = ([q.qweight for q in layers], [q.qzeros for q in layers], [q.scales for q in layers], 32)
    weights = [dequantize(match(q), q.qweight, q.qzeros, q.scales, q.g_idx).to(dtype) for q in layers]
    torch.testing.assert_close(kernels.gptq4_dequant(*args, dtype), torch.cat(weights, 1), rtol=0, atol=0)
    x = torch.randn(37, 128, dtype=dtype)
    out = kernels.gptq4_mm(x, *args)
    assert out.dtype == dtype and out.shape == (37, sum(ns))
    # the same GEMM library on the same operands; chunking changes only which columns a call computes
    ref = torch.cat([x @ w for w in weights], 1)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_gemm_backward_equals_autograd_through_the_weight():
    layers = [_layer(128, n, 32, seed=n) for n in (64, 32)]
    args = ([q.qweight for q in layers], [q.qzeros for q in layers], [q.scales for q in layers], 32)
    w = kernels.gptq4_dequant(*args, torch.float32)
    x = torch.randn(5, 128, requires_grad=True)
    grad = torch.randn(5, 96)
    (dx,) = torch.autograd.grad(kernels.gptq4_mm(x, *args), x, grad)
    (ref,) = torch.autograd.grad(x @ w, x, grad)
    torch.testing.assert_close(dx, ref, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.qpass_kernels.gptq4_mm, (torch.randn(3, 128, requires_grad=True), *args, [], []))
    torch.library.opcheck(torch.ops.qpass_kernels.gptq4_dequant, (*args, torch.bfloat16))


def test_gemm_with_a_low_rank_term_in_the_same_accumulation():
    """extra_in[i] @ extra_w[i] added to site i's columns inside its GEMM (LoRA's up-projection at prefill):
    equals the separate products' sum; gradients for x and both extras (opcheck checks them against the
    registered backward too)."""
    layers = [_layer(128, n, 32, seed=n) for n in (96, 608)]  # 608 columns: two chunks, the second 96 wide
    args = ([q.qweight for q in layers], [q.qzeros for q in layers], [q.scales for q in layers], 32)
    w = kernels.gptq4_dequant(*args, torch.float32)
    x = torch.randn(6, 128, requires_grad=True)
    ein = [torch.randn(6, r, requires_grad=True) for r in (4, 8)]
    ew = [torch.randn(r, n, requires_grad=True) for r, n in zip((4, 8), (96, 608))]
    y = kernels.gptq4_mm(x, *args, ein, ew)
    ref = x @ w + torch.cat([e @ v for e, v in zip(ein, ew)], 1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *ein, *ew], grad)
    want = torch.autograd.grad(ref, [x, *ein, *ew], grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)
    torch.library.opcheck(torch.ops.qpass_kernels.gptq4_mm, (x, *args, ein, ew))
    with pytest.raises(RuntimeError, match="site 1: extra_in must be"):
        kernels.gptq4_mm(x.detach(), *args, [e.detach() for e in ein], [ew[0].detach(), ew[0].detach()])


MM = {"gptq": kernels.gptq4_mm, "awq": kernels.awq4_mm}
DEQUANT = {"gptq": kernels.gptq4_dequant, "awq": kernels.awq4_dequant}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=DTYPE_ID)
@pytest.mark.parametrize("k,group", [(4352, 128), (2560, 2560)])
def test_bf16_gemm_over_slices_panels_and_a_low_rank_term(layout, scale_dtype, k, group):
    """bfloat16 x takes the panel GEMM where the CPU has AVX512-BF16 (the unpack writes the micro-kernel's pair
    words; the old chunked at::mm elsewhere). Against x @ W in float64 with W the bf16 weight `_dequant` gives,
    plus each site's low-rank term: K = 4352 at group 128 is three K slices (2048, 2048, 256) whose float32 sums
    carry over, K = group = 2560 one slice wider than the usual 2048; sites of 96 and 32 columns are a full
    64-column panel and half panels; 13 rows are two 6-row tiles and a 1-row tail; ranks 5 and 16 (an odd rank
    gets a zero pair row). Bound: float32 accumulation of K + r products, one rounding to bfloat16."""
    qs = [_gemv_layer(layout, k, n, group, seed=n) for n in (96, 32)]
    args = ([q.qweight for q in qs], [q.qzeros for q in qs], [q.scales.to(scale_dtype) for q in qs], group)
    w = DEQUANT[layout](*args, torch.bfloat16).double()
    x = torch.randn(13, k, dtype=torch.bfloat16)
    ein = [torch.randn(13, r, dtype=torch.bfloat16) for r in (5, 16)]
    ew = [torch.randn(r, q.scales.shape[1], dtype=torch.bfloat16) for r, q in zip((5, 16), qs)]
    for extra_in, extra_w in (([], []), (ein, ew)):
        out = MM[layout](x, *args, extra_in, extra_w)
        ref, mag = x.double() @ w, x.double().abs() @ w.abs()
        if extra_in:
            ref = ref + torch.cat([e.double() @ v.double() for e, v in zip(ein, ew)], 1)
            mag = mag + torch.cat([e.double().abs() @ v.double().abs() for e, v in zip(ein, ew)], 1)
        assert out.dtype == torch.bfloat16 and out.shape == (13, 128)
        bound = _rounded(8 * 2**-24 * mag * (k + 16) ** 0.5, ref, torch.bfloat16)
        err = (out.double() - ref).abs()
        assert (err <= bound).all(), (extra_in != [], err.max())


MM_LORA = {"gptq": kernels.gptq4_mm_lora, "awq": kernels.awq4_mm_lora}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_ID)
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
@pytest.mark.parametrize("k", [256, 4352])
def test_lora_inside_the_gemm(layout, dtype, adapter_dtype, k):
    """`_mm_lora` (prefill with LoRA): x W_i + s_i (x A_i^T) B_i^T per site with t = x A^T rounded to x's dtype
    and s B rounded to x's dtype, as the graph's fold computed them; for bf16 x the kernel computes t itself
    (float32 FMAs) and writes s B^T's pair words into the panels; for other x, t as PEFT computes it (x cast to
    the adapter's dtype). Against float64 with those roundings:
    the output's one rounding, plus one ulp of t wherever float32 and float64 sums round t differently. Ranks 5
    and 16 (the odd one padded), sibling sites, a K of three panel slices."""
    qs = [_gemv_layer(layout, k, n, 64, seed=n) for n in (96, 32)]
    args = ([q.qweight for q in qs], [q.qzeros for q in qs], [q.scales for q in qs], 64)
    w = DEQUANT[layout](*args, dtype).double()
    x = torch.randn(13, k, dtype=dtype)
    a = [(torch.randn(r, k) / k**0.5).to(adapter_dtype) for r in (5, 16)]
    b = [torch.randn(n, r).to(adapter_dtype) for n, r in zip((96, 32), (5, 16))]
    s = [torch.tensor(0.75), torch.tensor(2.0)]
    out = MM_LORA[layout](x, *args, a, b, s)
    assert out.dtype == dtype and out.shape == (13, 128)
    # PEFT's order: x cast to the adapter's dtype, t in the adapter's dtype, then to x's
    ts = [(x.to(adapter_dtype).double() @ ai.double().t()).to(adapter_dtype).to(dtype).double() for ai in a]
    sbs = [(bi.double() * si.double()).to(dtype).double() for bi, si in zip(b, s)]
    ref = x.double() @ w + torch.cat([t @ sb.t() for t, sb in zip(ts, sbs)], 1)
    mag = x.double().abs() @ w.abs() + torch.cat([t.abs() @ sb.abs().t() for t, sb in zip(ts, sbs)], 1)
    t_ulp = 2**-8 if torch.bfloat16 in (dtype, adapter_dtype) else 2**-23
    flips = torch.cat([(t_ulp * t.abs()) @ sb.abs().t() for t, sb in zip(ts, sbs)], 1)
    bound = _rounded(8 * 2**-24 * mag * (k + 16) ** 0.5 + flips, ref, dtype)
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), err.max()
    torch.library.opcheck(getattr(torch.ops.qpass_kernels, f"{'gptq4' if layout == 'gptq' else 'awq4'}_mm_lora"),
                          (x, *args, a, b, s))
    with pytest.raises(RuntimeError, match="mm_lora: site 1: lora_a must be"):
        MM_LORA[layout](x, *args, [a[0], a[1][:, :8]], b, s)


def test_dequant_bad_input_names_the_site():
    q = _layer(128, 64, 32, seed=0)
    with pytest.raises(RuntimeError, match="gptq4_mm: site 1 is not 4-bit GPTQ packing"):
        kernels.gptq4_mm(torch.randn(2, 128), [q.qweight, q.qweight[:, :8]], [q.qzeros, q.qzeros], [q.scales, q.scales], 32)
    with pytest.raises(RuntimeError, match="dtype Int is not float32, bfloat16 or float16"):
        kernels.gptq4_dequant([q.qweight], [q.qzeros], [q.scales], 32, torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID)
def test_compiled_prefill_and_training_through_the_gemm(dtype):
    """Prefill (no gradient) and a training step: every base on dequant-cpu, logits and adapter gradients equal
    eager qpass (the library's kernel + the spec's math)."""
    model = qpass.prepare(make_model(dtype), qpass.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    ids = input_ids(batch=2, seq=24)
    ref, out, bases, _ = eager_and_compiled(model, ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_TOL[dtype])
    assert len(bases) == SITES and all(b.startswith("dequant-cpu") for b in bases), bases
    ref_grads = adapter_grads(model, model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=qpass.backend("inductor"))
    grads = adapter_grads(compiled, model, ids)
    bases = report_bases(compiled)
    assert all(b.startswith("dequant-cpu") for b in bases), bases
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for grad, g in zip(grads, ref_grads):
        torch.testing.assert_close(grad, g, rtol=tol, atol=tol * g.abs().max().item())
    assert lowering.repacked_bytes(list(model._qpass.sites.values())) == 0


# ---- int4pack_dequant / int4pack_mm: the same for weights held in the int4pack layout (base_layout="int4pack")


def _resident_sites(kind):
    """Sites converted to the int4pack layout: GPTQ with a tail block (160 = 2 x 64 + 32 columns, and 32-column
    k/v), act-order GPTQ (permuted rows), AWQ."""
    build = {"gptq-tail": lambda: make_model(torch.bfloat16, intermediate_size=160),
             "gptq-act-order": lambda: make_model(torch.bfloat16, sym=False, desc_act=True),
             "awq": lambda: tiny_awq_llama(dtype=torch.bfloat16)}[kind]
    model = qpass.prepare(build().to(torch.bfloat16), qpass.LoraConfig(r=4, target_modules="all-linear"),
                          base_layout="int4pack")
    return model, list(model._qpass.sites.values())


@pytest.mark.parametrize("kind", ["gptq-tail", "gptq-act-order", "awq"])
def test_int4pack_dequant_is_the_layout_weight_bit_for_bit(kind):
    _, sites = _resident_sites(kind)
    block_n = int4pack_block_n()
    for site in sites:
        info = site.info
        named = dict(zip(info.buffers, site.base_tensors()))
        lists = [named["qweight"]], [named["scales"]], [named["qpass_zero_codes"]]
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ref = layouts.int4pack_resident_dequantize(info, named["qweight"], named["scales"], named["qpass_zero_codes"])
            out = kernels.int4pack_dequant(*lists, info.group, block_n, dtype)
            torch.testing.assert_close(out, ref.to(dtype), rtol=0, atol=0, msg=f"{site.path} {dtype}")


def test_int4pack_gemm_and_its_backward():
    _, sites = _resident_sites("gptq-tail")
    gate, up = [s for s in sites if s.path.startswith("model.layers.0.mlp.") and not s.path.endswith("down_proj")]
    block_n = int4pack_block_n()
    lists = [[dict(zip(s.info.buffers, s.base_tensors()))[name] for s in (gate, up)]
             for name in ("qweight", "scales", "qpass_zero_codes")]
    w = kernels.int4pack_dequant(*lists, gate.info.group, block_n, torch.float32)
    x = torch.randn(7, gate.info.in_features, requires_grad=True)
    y = kernels.int4pack_mm(x, *lists, gate.info.group, block_n)
    torch.testing.assert_close(y, x @ w, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0], grad @ w.t(), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.qpass_kernels.int4pack_mm, (x.detach().requires_grad_(), *lists, gate.info.group, block_n, [], []))


@pytest.mark.parametrize("kind", ["gptq-tail", "gptq-act-order", "awq"])
def test_int4pack_bf16_gemm_and_lora(kind):
    """bf16 x: the panel GEMM reads int4pack blocks (rows k and k + 1 in one 64-byte load) and the tail block
    (160 = 2 x 64 + 32 columns: columns 2d, 2d + 1 per byte); with LoRA in the call too. Against float64 x @ W
    (W the layout's bf16 weight), within the float32 accumulation bound and one bf16 rounding."""
    _, sites = _resident_sites(kind)
    block_n = int4pack_block_n()
    for site in sites:
        named = dict(zip(site.info.buffers, site.base_tensors()))
        lists = [named["qweight"]], [named["scales"]], [named["qpass_zero_codes"]]
        w = kernels.int4pack_dequant(*lists, site.info.group, block_n, torch.bfloat16).double()
        x = torch.randn(13, site.info.in_features, dtype=torch.bfloat16)
        a, b, sc = torch.randn(3, w.shape[0]) / w.shape[0] ** 0.5, torch.randn(w.shape[1], 3), torch.tensor(0.5)
        t = (x.double() @ a.double().t()).bfloat16().double()
        sb = (b.double() * 0.5).bfloat16().double()
        for out, ref, mag in ((kernels.int4pack_mm(x, *lists, site.info.group, block_n), x.double() @ w,
                               x.double().abs() @ w.abs()),
                              (kernels.int4pack_mm_lora(x, *lists, site.info.group, block_n, [a], [b], [sc]),
                               x.double() @ w + t @ sb.t(), x.double().abs() @ w.abs() + t.abs() @ sb.abs().t())):
            bound = _rounded(8 * 2**-24 * mag * w.shape[0] ** 0.5 + 2**-8 * t.abs() @ sb.abs().t(), ref, torch.bfloat16)
            err = (out.double() - ref).abs()
            assert (err <= bound).all(), (site.path, err.max())


# ---- awq4_dequant / awq4_mm: AWQ's GEMM packing (8 columns per word, interleaved) --------------------------


def _awq_layer(k, n, group, seed, cls=None):
    torch.manual_seed(seed)
    return awq_linear_from(torch.nn.Linear(k, n, bias=False), bits=4, group_size=group, cls=cls)


def _awq_classes():
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    return [None, AwqTorchLinear]  # autoawq's WQLinear_GEMM; gptqmodel's AWQ layer (same packing)


@pytest.mark.parametrize("cls", _awq_classes(), ids=["autoawq", "gptqmodel"])
@pytest.mark.parametrize("k,n,group", [(256, 224, 32), (128, 96, 64), (384, 64, 128)])
def test_awq_dequant_is_the_library_weight_bit_for_bit(cls, k, n, group):
    q = _awq_layer(k, n, group, seed=n, cls=cls)
    info = match(q)
    assert info.layout is layouts.awq
    for scale_dtype in (torch.float16, torch.bfloat16, torch.float32):
        scales = q.scales.to(scale_dtype)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ref = layouts.awq_dequantize(info, q.qweight, q.qzeros, scales).to(dtype)
            out = kernels.awq4_dequant([q.qweight], [q.qzeros], [scales], group, dtype)
            torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=f"{scale_dtype} -> {dtype}")
    if cls is None:  # ... which is AutoAWQ's own dequantize
        from awq.utils.packing_utils import dequantize_gemm

        lib = dequantize_gemm(q.qweight, q.qzeros, q.scales, 4, group)
        torch.testing.assert_close(kernels.awq4_dequant([q.qweight], [q.qzeros], [q.scales], group, q.scales.dtype),
                                   lib, rtol=0, atol=0)


def test_awq_gemm_siblings_and_backward():
    layers = [_awq_layer(128, n, 32, seed=n) for n in (64, 32, 96)]
    args = ([q.qweight for q in layers], [q.qzeros for q in layers], [q.scales for q in layers], 32)
    w = kernels.awq4_dequant(*args, torch.float32)
    x = torch.randn(9, 128, requires_grad=True)
    y = kernels.awq4_mm(x, *args)
    torch.testing.assert_close(y, x @ w, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0], grad @ w.t(), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.qpass_kernels.awq4_mm, (x.detach().requires_grad_(), *args, [], []))
    with pytest.raises(RuntimeError, match="awq4_mm: site 0 is not 4-bit AWQ packing"):
        kernels.awq4_mm(x.detach(), [layers[0].qweight[:64]], [layers[0].qzeros], [layers[0].scales], 32)


@pytest.mark.parametrize("kind", ["awq", "awq-some-targets", "gptq-int4pack"])
def test_compiled_prefill_and_training_of_other_layouts_through_the_gemm(kind):
    """AWQ in its own packing (every projection a target, or some: the untargeted siblings' bases fused into
    one call) and GPTQ held in the int4pack layout: prefill and a training step on dequant-cpu, logits and
    adapter gradients equal to eager qpass."""
    targets = ["q_proj", "down_proj"] if kind == "awq-some-targets" else "all-linear"
    cfg = qpass.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    if kind.startswith("awq"):
        dtype = torch.float32
        model = qpass.prepare(tiny_awq_llama(dtype=dtype), cfg)
    else:
        dtype = torch.bfloat16
        model = qpass.prepare(make_model(dtype).to(dtype), cfg, base_layout="int4pack")
    randomize_adapters(model)
    ids = input_ids(batch=2, seq=24)
    ref, out, _, compiled = eager_and_compiled(model, ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_TOL[dtype])
    ref_grads = adapter_grads(model, model, ids)
    grads = adapter_grads(compiled, model, ids)
    bases = report_bases(compiled)
    assert len(bases) == SITES and all("dequant-cpu" in b for b in bases), bases
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for grad, g in zip(grads, ref_grads):
        torch.testing.assert_close(grad, g, rtol=tol, atol=tol * g.abs().max().item())


# ---- forced instruction sets: the #if paths this CPU's native build does not take ------------------------------

# One build per forced path (QPASS_CPU_ISA), each in its own process (a process loads one build of the ops): a
# compact subset of the cases above, each against its plain-torch / library reference. gemv: 1 row and a block
# with a tail, float32 and bfloat16 x, GPTQ and AWQ, with LoRA; dequant: each output dtype (from another scales
# dtype), AWQ's 9 pairs, int4pack with a tail block; the chunked GEMM. Plus the library's own word on its path.
ISA_SUBSET = [
    "test_the_build_took_the_isa_asked_for",
    "test_gemv_equals_the_library_weight[256-224-32-1-float32-awq]",
    "test_gemv_equals_the_library_weight[256-224-32-1-bfloat16-gptq]",
    "test_gemv_equals_the_library_weight[256-224-32-6-float32-gptq]",
    "test_gemv_equals_the_library_weight[256-224-32-6-bfloat16-awq]",
    "test_gemv_adds_each_sites_lora[bfloat16-5-bfloat16-gptq]",
    "test_gemv_adds_each_sites_lora[float32-5-float32-awq]",
    "test_dequant_is_the_library_weight_bit_for_bit[256-224-32-bfloat16-float16]",
    "test_dequant_is_the_library_weight_bit_for_bit[256-224-32-float16-bfloat16]",
    "test_dequant_is_the_library_weight_bit_for_bit[256-224-32-float32-float32]",
    "test_awq_dequant_is_the_library_weight_bit_for_bit[256-224-32-autoawq]",
    "test_int4pack_dequant_is_the_layout_weight_bit_for_bit[gptq-tail]",
    "test_gemm_equals_x_times_the_unpacked_weight[ns1-bfloat16]",
]


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_forced_isa_builds_pass_the_kernel_checks(isa, tmp_path):
    """QPASS_CPU_ISA=isa in a child pytest running ISA_SUBSET: the build says it took that path, and the kernels
    equal their references there. The first run on a machine builds each (about 30 s, then torch's extension
    cache); avx512 is skipped on a CPU without AVX-512 (it could not run there), and the path the native build
    takes here is skipped (the rest of this file runs it)."""
    import os
    import subprocess
    import sys
    import xml.etree.ElementTree as ET
    from pathlib import Path

    try:
        kernels._isa_flags(isa)
    except qpass.QpassError as exc:
        pytest.skip(str(exc))
    if _native_isa() == isa:
        pytest.skip(f"{isa} is the path this CPU's native build takes: this process already tests it")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not the parent's xdist worker
    env["QPASS_CPU_ISA"] = isa
    junit = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           *(f"tests/test_kernels.py::{case}" for case in ISA_SUBSET)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    log = f"QPASS_CPU_ISA={isa}: rc {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0 and junit.is_file(), log
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    # every case ran and passed: a build that fails falls back and skips the module, which must not pass here
    assert counts == {"tests": len(ISA_SUBSET), "failures": 0, "errors": 0, "skipped": 0}, log


def test_an_isa_this_cpu_cannot_run_is_refused(monkeypatch):
    """A forced path the CPU lacks would die on an illegal instruction, and an unknown name builds nothing:
    both raise (not the quiet fallback a failed build takes), naming what is missing and what to use."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the forced paths are x86-64's")
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "flags\t\t: fpu sse sse2 avx fma")
    with pytest.raises(qpass.QpassError, match=r"QPASS_CPU_ISA=avx2: this CPU lacks avx2 f16c .*; use native, portable$"):
        kernels._isa_flags("avx2")
    with pytest.raises(qpass.QpassError, match=r"QPASS_CPU_ISA=avx512: this CPU lacks avx512f avx512bw"):
        kernels._isa_flags("avx512")
    assert kernels._isa_flags("portable") == ["-march=x86-64"] and kernels._isa_flags("native") == ["-march=native"]
    monkeypatch.setattr(kernels, "_STATE", {})  # as before the first build; restored after the test
    monkeypatch.setenv("QPASS_CPU_ISA", " AVX3 ")
    assert kernels.requested_isa() == "avx3"
    with pytest.raises(qpass.QpassError, match="QPASS_CPU_ISA='avx3' is not one of native, avx512, avx2, portable"):
        kernels.available()
    assert "ok" not in kernels._STATE
