"""Adding a quantization library is one matcher and one layout, registered (docs/design.md: Where things live).

The library here is the test's own: an int8 per-output-row linear layer (no real library packs this way, so it
stands for a user's). Nothing in qpass's lowerings or merge knows it: its layout's plain-torch forward serves
eager and the torch-dequant lowering, and its layout says no kernel reads it and merge cannot repack it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpass
from qpass import quant
from qpass.quant.layout import add_bias, named

from conftest import LOGIT_TOL, SITES, bases, input_ids, make_model, randomize_adapters


class RowInt8Linear(nn.Module):
    """y = x Wᵀ + b with W = qweight · scales (one fp32 scale per output row, int8 codes)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scales = w.abs().amax(1).clamp_min(1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x):
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class RowInt8(quant.Layout):
    name = "test-row-int8"

    def dequantize(self, info, qweight, scales):
        return (qweight.float() * scales[:, None]).t()

    def torch_forward(self, info, x, tensors, *derived):
        t = named(info, tensors)
        return add_bias(x @ self.dequantize(info, t["qweight"], t["scales"]).to(x.dtype), t)


ROW_INT8 = quant.register_layout(RowInt8())


@quant.register_matcher
def match_row_int8(module):
    if not isinstance(module, RowInt8Linear):
        return None
    return quant.QuantInfo(
        library="test-row-int8", cls_name=type(module).__name__, method="gptq", bits=8, group_size=-1, sym=True,
        desc_act=False, in_features=module.in_features, out_features=module.out_features,
        buffers=("qweight", "scales") + (("bias",) if module.bias is not None else ()), layout=ROW_INT8)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _row_int8_model():
    """The tiny Llama's dense weights (make_model's GPTQ layers dequantized) requantized as RowInt8Linear."""
    model = make_model()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                q = getattr(parent, name, None)
                if q is None:
                    continue
                info = quant.match(q)
                w = info.layout.dequantize(info, *[getattr(q, b) for b in info.buffers if b != "bias"])
                dense = nn.Linear(q.in_features, q.out_features, bias=False)
                dense.weight.data = w.t().contiguous().float()
                setattr(parent, name, RowInt8Linear(dense))
    return model


def test_a_registered_library_is_prepared_compiled_and_reported():
    model = _row_int8_model()
    ids = input_ids(batch=2, seq=12)
    with torch.no_grad():
        plain = model(ids).logits
    model = qpass.prepare(model, qpass.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    sites = model._qpass.sites
    assert len(sites) == SITES and all(s.info.layout is ROW_INT8 for s in sites.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)  # B = 0: the library's own forward
    randomize_adapters(model)
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=qpass.backend("aot_eager"))(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=LOGIT_TOL[torch.float32])
    assert (out - plain).abs().max() > 1e-2  # the adapters took part
    # no kernel reads the layout (its hooks say so): the fallback, for every site, with siblings still fused
    assert all(b.startswith("torch-dequant") for b in bases(model)), bases(model)
    assert any("fused q_proj+k_proj+v_proj" in b for b in bases(model))


def test_merge_names_the_layout_it_cannot_repack():
    model = qpass.prepare(_row_int8_model(), qpass.LoraConfig(r=4, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qpass.QpassError, match="test-row-int8"):
        qpass.merge(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
