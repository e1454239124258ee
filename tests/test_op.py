"""`qpass::site` passes torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch."""

import pytest
import torch

import qpass
from qpass.ops import join_names

from conftest import randomize_adapters
from qpass.testing import gptq_linear_from


def _prepared_layer(dtype, lora_bias=False):
    torch.manual_seed(0)
    layer = gptq_linear_from(torch.nn.Linear(64, 32, bias=True), bits=4, group_size=32)
    holder = torch.nn.Sequential()
    holder.add_module("proj", layer)
    qpass.prepare(holder, qpass.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_bias=lora_bias))
    randomize_adapters(holder)
    return holder, layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_opcheck(dtype, lora_bias):
    holder, layer = _prepared_layer(dtype, lora_bias)
    site = layer._qpass_site
    names = ("default",)
    x = torch.randn(2, 3, 64, dtype=dtype, requires_grad=True)
    xa = site.adapter_inputs(x, names, False, None)
    adapter = [t for t in layer.qpass_adapters["default"].tensors()]
    args = (x, xa, site.base_tensors(), adapter, site.key, join_names(names))
    torch.library.opcheck(torch.ops.qpass.site.default, args)


def test_op_backward_matches_eager_math():
    holder, layer = _prepared_layer(torch.float32)
    site = layer._qpass_site
    x = torch.randn(4, 64, requires_grad=True)
    slot = layer.qpass_adapters["default"]
    adapter = slot.tensors()
    out = torch.ops.qpass.site(x, [x], site.base_tensors(), adapter, site.key, "default")
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in slot.parameters()]
    x.grad = None
    for p in slot.parameters():
        p.grad = None
    ref = site.run(x, [x], site.base_tensors(), adapter, ("default",), site.torch_base)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, [x.grad] + [p.grad for p in slot.parameters()]):
        torch.testing.assert_close(g, r)
