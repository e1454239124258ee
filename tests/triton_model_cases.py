"""The Triton lowerings end to end: a tiny Llama whose 7 projections are real quantized layers (gptqmodel
`TorchLinear` GPTQ or autoawq `WQLinear_GEMM`), LoRA r=4 on all of them, compiled through qpass's backend with
gemv-cuda or mm-cuda requested, against PEFT (PEFT's GPTQ LoRA; for AWQ, PEFT's LoRA on the dense twin holding
AutoAWQ's own dequantized weights, as tests/test_awq.py).

Run twice:
* on a GPU by tests/test_cuda.py: device "cuda", inner compiler inductor;
* on CPU tensors under Triton's interpreter by tests/test_triton.py's child: device "cpu", inner compiler
  "aot_eager" (inductor's CPU backend emits no Triton kernels), the Triton lowerings allowed CPU inputs
  (`qpass.lowering.triton.DEVICES`).
So the rewrite, the per-graph choice, the sibling calls, the folded up-projection and int4_mm's backward under
AOTAutograd run on every machine; inductor's Triton code generation and CUDA graphs only on a GPU.

Also shared with test_cuda.py: the bases (`BASES`) and the PEFT oracle (`peft_oracle`).
Every function imports torch, PEFT and qpass itself: the pytest process imports this module without running them.
"""

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name: (lowering requested, layer kind, dtype, what): "decode" (1 x 1 tokens) and "prefill" (2 x 12): the logits
# against PEFT's within conftest.LOGIT_TOL; "sgd": every LoRA update of one SGD step (2 x 12 tokens) against PEFT's,
# max relative error (norm) within SGD_TOL
MODEL_CASES = {
    "gemv-cuda/gptq/bf16/decode": ("gemv-cuda", "gptq", "bfloat16", "decode"),
    "gemv-cuda/awq/fp16/decode": ("gemv-cuda", "awq", "float16", "decode"),
    "mm-cuda/gptq/bf16/prefill": ("mm-cuda", "gptq", "bfloat16", "prefill"),
    "mm-cuda/awq/fp16/prefill": ("mm-cuda", "awq", "float16", "prefill"),
    "mm-cuda/gptq/fp32/sgd": ("mm-cuda", "gptq", "float32", "sgd"),
    "mm-cuda/awq/bf16/sgd": ("mm-cuda", "awq", "bfloat16", "sgd"),
}
SGD_TOL = {"float32": 1e-3, "bfloat16": 5e-2}


def _no_cache(model):
    # no DynamicCache built inside a compiled forward: on the GPU image's torch 2.11 dynamo's guards fail on it
    model.config.use_cache = False
    return model


def _gptq(dtype, device):
    from adapter_parity import make_model

    return _no_cache(make_model(dtype).to(device))


def _awq(dtype, device):
    from qpass.testing import tiny_awq_llama

    return _no_cache(tiny_awq_llama(dtype=dtype).to(device))


def _dense_twin(model):
    """`model` with every AWQ layer replaced by an nn.Linear holding AutoAWQ's own dequantized weight."""
    import torch
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    for name, module in list(model.named_modules()):
        if isinstance(module, WQLinear_GEMM):
            w = dequantize_gemm(module.qweight, module.qzeros, module.scales, 4, module.group_size)
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                     device=w.device, dtype=model.dtype)
            with torch.no_grad():
                linear.weight.copy_(w.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


# kind: (qpass's base, PEFT's base), each called as (dtype, device)
BASES = {"gptq": (_gptq, _gptq), "awq": (_awq, lambda dtype, device: _dense_twin(_awq(dtype, device)))}


def peft_oracle(kind, dtype, path, config, device):
    """PEFT's model of `kind` with a random adapter (std 0.1), saved to `path`; returned in eval mode."""
    import peft

    from adapter_parity import randomize

    oracle = peft.get_peft_model(BASES[kind][1](dtype, device), config)
    randomize(oracle, ("lora_", "oft_R"), std=0.1)
    oracle.save_pretrained(str(path))
    return oracle.eval()


def ids(batch, seq, seed, device):
    from conftest import input_ids

    return input_ids(batch=batch, seq=seq, seed=seed).to(device)


def model_case(lowering, kind, dtype, what, device="cpu", inner="aot_eager") -> dict:
    """One MODEL_CASES entry on `device`, compiled with `inner` behind qpass's backend: the errors against PEFT,
    the report's lowerings and the bytes of repacked weights."""
    import tempfile

    import peft
    import torch

    import qpass
    from adapter_parity import max_err, max_rel, sgd_updates
    from qpass import lowering as lowerings

    dtype = getattr(torch, dtype)
    out = {}
    with tempfile.TemporaryDirectory() as path:
        oracle = peft_oracle(kind, dtype, path, peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL), device)
        model = BASES[kind][0](dtype, device)
        qpass.prepare(model, path)
        compiled = torch.compile(model, backend=qpass.backend(inner, lowering=lowering),
                                 options={"guard_filter_fn": qpass.guard_filter})
        if what != "sgd":
            x = ids(1, 1, 1, device) if what == "decode" else ids(2, 12, 0, device)
            with torch.no_grad():
                out["logit_err"] = max_err(compiled(x).logits, oracle(x).logits)
        else:
            x, labels = ids(2, 12, 1, device), ids(2, 12, 2, device)
            base = BASES[kind][1](dtype, device)
            ref = sgd_updates(peft.PeftModel.from_pretrained(base, path, is_trainable=True), x, labels)
            ours = sgd_updates(compiled, x, labels)
            out["tensors"], out["rel"] = len(ours), max_rel(ours, ref)
    out["bases"] = [r.base for r in qpass.report(model).rows if r.base]
    out["repacked"] = lowerings.repacked_bytes(list(model._qpass.sites.values()))
    return out


def judge(name, r) -> None:
    """The assertions on one case's result, in both runs: every site on the requested lowering, no repacked
    weight, the errors within their tolerances."""
    import torch

    from conftest import LOGIT_TOL

    lowering, _, dtype, what = MODEL_CASES[name]
    assert r["bases"] and all(b.startswith(lowering) for b in r["bases"]), r["bases"]
    assert r["repacked"] == 0  # the library's buffers, as they are
    if what != "sgd":
        tol = LOGIT_TOL[getattr(torch, dtype)]
        assert r["logit_err"] <= tol, f"max |Δlogit| {r['logit_err']:.3g} > {tol}"
    else:
        assert r["tensors"] > 0 and r["rel"] < SGD_TOL[dtype], r


def results() -> dict:
    """Every case on CPU tensors, run under TRITON_INTERPRET=1 (test_triton.py's child)."""
    import torch

    from qpass.lowering import triton

    devices = triton.DEVICES
    triton.DEVICES = ("cuda", "cpu")
    out = {}
    try:
        for name, spec in MODEL_CASES.items():
            torch._dynamo.reset()  # as conftest does around every test
            out[name] = model_case(*spec)
    finally:
        triton.DEVICES = devices
    return out
