"""qpass's CPU decode kernel (qpass/kernels: gptq4_gemv) on real gptqmodel layers: it equals the library's own
dequantized weight times x, for every row-blocking path (1 row, 4-row blocks and their tails; 128-, 64- and
16-column blocks), group sizes, scale dtypes and sibling sites concatenated in one call; a compiled decode
step of a tiny Llama through it equals eager qpass in fp32, fp16 and bf16 without keeping any copy."""

import pytest
import torch

import qpass
from qpass import kernels, lowering
from qpass.quant import match
from qpass.quant.gptqmodel import dequantize
from qpass.toy import gptq_linear_from

from conftest import LOGIT_TOL, input_ids, make_model, randomize_adapters

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.unavailable_reason()}")


def _layer(k, n, group, seed):
    torch.manual_seed(seed)
    return gptq_linear_from(torch.nn.Linear(k, n, bias=False), bits=4, group_size=group, sym=False)


@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16])
@pytest.mark.parametrize("k,n,group", [(256, 224, 32), (128, 128, 64), (384, 64, 128), (256, 32, 256)])
def test_gemv_equals_the_library_weight(rows, k, n, group):
    q = _layer(k, n, group, seed=rows + n)
    info = match(q)
    exact = dequantize(info, q.qweight, q.qzeros, q.scales.double(), q.g_idx)  # s * (q - z), no rounding
    # ... which is gptqmodel's own dequantized weight before its float16 rounding
    torch.testing.assert_close(exact.half(), q.dequantize_weight(), rtol=0, atol=0)
    x = torch.randn(rows, k)
    out = kernels.gptq4_gemv(x, [q.qweight], [q.qzeros], [q.scales], group)
    ref = x.double() @ exact
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    # float32 products and sums: a few float32 ulps of sum |x||W| per output
    bound = 8 * 2**-24 * (x.double().abs() @ exact.abs()) * k ** 0.5
    assert ((out.double() - ref).abs() <= bound).all(), (out.double() - ref).abs().max()


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_siblings_in_one_call_equal_separate_calls(scale_dtype):
    layers = [_layer(128, n, 32, seed=n) for n in (128, 32, 64)]
    x = torch.randn(2, 128)
    scales = [q.scales.to(scale_dtype) for q in layers]
    together = kernels.gptq4_gemv(x, [q.qweight for q in layers], [q.qzeros for q in layers], scales, 32)
    apart = [kernels.gptq4_gemv(x, [q.qweight], [q.qzeros], [s], 32) for q, s in zip(layers, scales)]
    torch.testing.assert_close(together, torch.cat(apart, 1), rtol=0, atol=0)
    g = torch.arange(128) // 32
    for q, s, y in zip(layers, scales, apart):
        codes = torch.stack([(q.qweight >> (4 * j)) & 15 for j in range(8)], 1).reshape(128, -1)
        zeros = torch.stack([(q.qzeros >> (4 * j)) & 15 for j in range(8)], 2).reshape(4, -1)
        w = s.double()[g] * (codes - zeros[g]).double()
        torch.testing.assert_close(y.double(), x.double() @ w, rtol=0, atol=1e-4)


def test_bad_input_names_the_site_and_the_layout():
    q = _layer(128, 64, 32, seed=0)
    with pytest.raises(RuntimeError, match="site 1 is not 4-bit GPTQ packing"):
        kernels.gptq4_gemv(torch.randn(1, 128), [q.qweight, q.qweight[:, :8]], [q.qzeros, q.qzeros], [q.scales, q.scales], 32)
    with pytest.raises(RuntimeError, match="group 48 must be a multiple of 8 dividing in_features 128"):
        kernels.gptq4_gemv(torch.randn(1, 128), [q.qweight], [q.qzeros], [q.scales], 48)


def test_fake_kernel_matches_the_real_one():
    q = _layer(128, 96, 32, seed=1)
    torch.library.opcheck(torch.ops.qpass_kernels.gptq4_gemv, (torch.randn(3, 128), [q.qweight], [q.qzeros], [q.scales], 32))


@pytest.mark.parametrize("dtype,targets", [(torch.float32, "all-linear"), (torch.float16, "all-linear"),
                                           (torch.bfloat16, "all-linear"), (torch.bfloat16, ["q_proj", "down_proj"])])
def test_compiled_decode_through_the_kernel_keeps_no_copy(dtype, targets):
    """All sites LoRA (siblings fused into one kernel call), or some base-only sites (one call each)."""
    model = qpass.prepare(make_model(dtype), qpass.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_adapters(model)
    compiled = torch.compile(model, backend=qpass.backend("inductor"))
    ids = input_ids(batch=1, seq=1)
    with torch.no_grad():
        ref = model(ids).logits.float()
        out = compiled(ids).logits.float()
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_TOL[dtype])
    bases = [r.base for r in qpass.report(compiled).rows if r.base]
    assert len(bases) == 14 and all(b.startswith("gemv-cpu (library layout, no copy)") for b in bases), bases
    assert lowering.repacked_bytes(list(model._qpass.sites.values())) == 0
