"""Property tests (hypothesis): over in/out features, ranks, group sizes, bits, symmetry, act-order, dtypes,
batch shapes and LoRA options, qpass equals the reference on a real gptqmodel layer:
  * the oracle PEFT (GPTQLoraLinear on the same packed layer, adapter moved over by PEFT's own save format);
  * the library's own dequantize (gptqmodel `dequantize_weight`) plus the adapter math written out here.
Both qpass paths are checked: eager (library kernel + spec math) and the op (what the compiled graph runs).
Examples are derandomized so CI is reproducible.
"""

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qpass
from qpass.ops import join_names
from qpass.toy import gptq_linear_from

peft = pytest.importorskip("peft")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # relative to max |y|
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


class Holder(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # PEFT reads the device off the first parameter

    def forward(self, x):
        return self.proj(x)


def _layer(in_f, out_f, bits, group, sym, desc_act, bias, seed):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_f, out_f, bias=bias)
    layer = gptq_linear_from(linear, bits=bits, group_size=group, sym=sym, desc_act=desc_act, seed=seed)
    layer.__dict__.pop("dequantize_weight", None)  # skip gptqmodel's per-instance torch.compile of its dequantize
    return layer


shapes = st.fixed_dictionaries({
    "in_f": st.sampled_from([32, 64, 96, 128]),
    "out_f": st.sampled_from([32, 64, 160]),
    "bits": st.sampled_from([2, 4, 8]),
    "group": st.sampled_from([32, -1]),
    "sym": st.booleans(),
    "desc_act": st.booleans(),
    "bias": st.booleans(),
    "dtype": st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    "batch": st.lists(st.integers(1, 3), min_size=0, max_size=2),
    "seed": st.integers(0, 10_000),
})
lora = st.fixed_dictionaries({
    "r": st.integers(1, 8),
    "lora_alpha": st.sampled_from([1, 4, 16]),
    "use_rslora": st.booleans(),
    "lora_bias": st.booleans(),
})


def _compare(out, ref, dtype, what):
    scale = ref.float().abs().max().clamp(min=1.0)
    err = ((out.float() - ref.float()).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


def _op_output(holder, x):
    site = holder.proj._qpass_site
    names = site.active_names()
    xa = site.adapter_inputs(x, names, False, None)
    adapter = [t for n in names for t in holder.proj.qpass_adapters[n].tensors()]
    return torch.ops.qpass.site(x, xa, site.base_tensors(), adapter, site.key, join_names(names))


@SETTINGS
@given(shape=shapes, opts=lora)
def test_lora_equals_peft(shape, opts):
    group = shape["in_f"] if shape["group"] == -1 else shape["group"]
    args = (shape["in_f"], shape["out_f"], shape["bits"], group, shape["sym"], shape["desc_act"], shape["bias"], shape["seed"])
    dtype = shape["dtype"]
    reference = peft.get_peft_model(Holder(_layer(*args)), peft.LoraConfig(target_modules=["proj"], init_lora_weights=False, **opts))
    x = torch.randn(*shape["batch"], shape["in_f"], generator=torch.Generator().manual_seed(shape["seed"])).to(dtype)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        reference.save_pretrained(d)
        ref = reference(x)
        ours = qpass.prepare(Holder(_layer(*args)), d)
        _compare(ours(x), ref, dtype, "eager")
        _compare(_op_output(ours, x), ref, dtype, "op")


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(shape=shapes, opts=lora)
def test_lora_equals_library_dequant_plus_math(shape, opts):
    """Independent of PEFT: gptqmodel's dequantize, then LoRA written out."""
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    group = shape["in_f"] if shape["group"] == -1 else shape["group"]
    dtype = shape["dtype"]
    layer = _layer(shape["in_f"], shape["out_f"], shape["bits"], group, shape["sym"], shape["desc_act"], shape["bias"], shape["seed"])
    holder = qpass.prepare(Holder(layer), qpass.LoraConfig(target_modules=["proj"], init_lora_weights=False, **opts))
    slot = layer.qpass_adapters["default"]
    x = torch.randn(*shape["batch"], shape["in_f"], generator=torch.Generator().manual_seed(shape["seed"] + 1)).to(dtype)
    with torch.no_grad():
        W = PackableQuantLinear.dequantize_weight(layer).to(dtype)
        y = x @ W + (layer.bias.to(dtype) if layer.bias is not None else 0)
        A, B = slot.get("lora_A.weight"), slot.get("lora_B.weight")
        scaling = opts["lora_alpha"] / (opts["r"] ** 0.5 if opts["use_rslora"] else opts["r"])
        delta = x.float() @ A.T @ B.T
        if opts["lora_bias"]:
            delta = delta + slot.get("lora_B.bias")
        ref = (y + delta * scaling).to(dtype)
        _compare(holder(x), ref, dtype, "eager")
        _compare(_op_output(holder, x), ref, dtype, "op")


def _peft_config(kind, opts):
    if kind == "qalora":
        return peft.LoraConfig(target_modules=["proj"], r=opts["r"], lora_alpha=opts["alpha"],
                               use_qalora=True, qalora_group_size=opts["group"])
    return peft.OFTConfig(target_modules=["proj"], r=0, oft_block_size=opts["block"], coft=opts["coft"],
                          block_share=opts["share"], use_cayley_neumann=opts["neumann"])


batched = shapes.filter(lambda s: len(s["batch"]) >= 1)  # PEFT's QA-LoRA crashes on 1-D input; qpass does not
other = st.fixed_dictionaries({
    "kind": st.sampled_from(["qalora", "oft"]),
    "r": st.integers(1, 6),
    "alpha": st.sampled_from([2, 8]),
    "group": st.sampled_from([8, 16, 32]),
    "block": st.sampled_from([4, 8, 16]),
    "coft": st.booleans(),
    "share": st.booleans(),
    "neumann": st.booleans(),
})


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(shape=batched, opts=other)
def test_qalora_and_oft_equal_peft(shape, opts):
    """QA-LoRA and OFT over random layers and options, against PEFT with random adapter weights."""
    group = shape["in_f"] if shape["group"] == -1 else shape["group"]
    args = (shape["in_f"], shape["out_f"], shape["bits"], group, shape["sym"], shape["desc_act"], shape["bias"], shape["seed"])
    dtype = shape["dtype"]
    reference = peft.get_peft_model(Holder(_layer(*args)), _peft_config(opts["kind"], opts))
    g = torch.Generator().manual_seed(shape["seed"])
    with torch.no_grad():
        for name, p in sorted(reference.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    reference.eval()
    x = torch.randn(*shape["batch"], shape["in_f"], generator=g).to(dtype)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        reference.save_pretrained(d)
        ref = reference(x)
        ours = qpass.prepare(Holder(_layer(*args)), d)
        ours.eval()
        _compare(ours(x), ref, dtype, f"{opts['kind']} eager")
        _compare(_op_output(ours, x), ref, dtype, f"{opts['kind']} op")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(shape=shapes, r=st.integers(1, 6), alpha=st.sampled_from([0, 4, 16]))
def test_adalora_equals_library_dequant_plus_math(shape, r, alpha):
    """AdaLoRA (PEFT wraps only gptqmodel's TorchAtenLinear for it): gptqmodel's dequantize + the SVD form written out,
    whole delta in fp32 (PEFT SVDQuantLinear's policy)."""
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    group = shape["in_f"] if shape["group"] == -1 else shape["group"]
    dtype = shape["dtype"]
    layer = _layer(shape["in_f"], shape["out_f"], shape["bits"], group, shape["sym"], shape["desc_act"], shape["bias"], shape["seed"])
    cfg = qpass.AdaLoraConfig(target_modules=["proj"], init_r=r, target_r=1, lora_alpha=alpha, total_step=100)
    holder = qpass.prepare(Holder(layer), cfg)
    slot = layer.qpass_adapters["default"]
    g = torch.Generator().manual_seed(shape["seed"])
    with torch.no_grad():
        for name in ("lora_A", "lora_E", "lora_B"):
            slot.get(name).copy_(torch.randn(slot.get(name).shape, generator=g) * 0.1)
    x = torch.randn(*shape["batch"], shape["in_f"], generator=g).to(dtype)
    with torch.no_grad():
        W = PackableQuantLinear.dequantize_weight(layer).to(dtype)
        y = x @ W + (layer.bias.to(dtype) if layer.bias is not None else 0)
        A, E, B = slot.get("lora_A"), slot.get("lora_E"), slot.get("lora_B")
        scaling = alpha if alpha > 0 else r
        delta = (x.float() @ (A * E).T @ B.T) * scaling / (r + 1e-5)
        ref = y + delta.to(dtype)
        _compare(holder(x), ref, dtype, "eager")
        _compare(_op_output(holder, x), ref, dtype, "op")
