"""The plain-torch base computation equals gptqmodel's own dequantize and forward, bit for bit where it can."""

import pytest
import torch

from qpass.quant import QuantInfo, match
from qpass.quant.gptqmodel import dequantize, gptq_packed
from qpass.testing import gptq_linear_from


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group_size", [32, 64])
def test_dequant_matches_gptqmodel(bits, sym, desc_act, group_size):
    torch.manual_seed(bits * 7 + group_size)
    linear = torch.nn.Linear(128, 96, bias=True)
    q = gptq_linear_from(linear, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    info = match(q)
    assert isinstance(info, QuantInfo) and info.bits == bits and info.desc_act == desc_act
    ours = dequantize(info, q.qweight, q.qzeros, q.scales, q.g_idx)
    theirs = q.dequantize_weight()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # The packed weights are the RTN quantisation of the original ones (the packing is real).
    step = q.scales.float().max().item()
    assert (ours.float().T - linear.weight).abs().max().item() <= step * 0.51 + 1e-3

    x = torch.randn(3, 5, 128, dtype=torch.float16)
    with torch.no_grad():
        ref = q(x)
    out = gptq_packed.torch_forward(info, x, [getattr(q, n) for n in info.buffers])
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


def test_unsupported_bits_are_reported_not_rewritten():
    q = gptq_linear_from(torch.nn.Linear(64, 64), bits=5, group_size=32)  # 5-bit exists only planar
    found = match(q)
    assert not isinstance(found, QuantInfo)
    assert "5-bit planar" in found.reason


def test_plain_linear_is_not_a_site():
    assert match(torch.nn.Linear(8, 8)) is None
