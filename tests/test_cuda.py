"""The CUDA path (`pytest -m cuda`, run by scripts/gpu-check.sh on a GPU machine; skipped without a GPU).

* The Triton decode kernel on the GPU: every case of tests/test_triton.py (there under Triton's interpreter)
  against the same float64 reference and bounds, and replayed from a captured CUDA graph.
* PEFT parity on gptqmodel TorchLinear (PEFT's GPTQ LoRA) and autoawq WQLinear_GEMM (PEFT LoRA on the
  dense twin holding AutoAWQ's dequantized weights, as tests/test_awq.py), bf16 and fp16: decode-shaped
  graphs (gemv-cuda, asserted in the report) and prefill graphs, logits within conftest.LOGIT_TOL; one SGD
  step against PEFT's (float32: max relative error 1e-3 per tensor; bf16: 5e-2).
* CUDA graphs: `qpass.compile(..., mode="reduce-overhead")`, token-by-token decode with transformers'
  StaticCache, every step's logits against PEFT's, no cudagraph skip.
* mm-cuda (qpass's Triton dequant-GEMM, requested with `qpass.backend(lowering="mm-cuda")`: "auto" keeps
  torch-dequant for prefill and training): every case of tests/triton_mm_cases.py (forward and x's gradient)
  against the float64 reference.
* Both Triton lowerings requested on whole models (tests/triton_model_cases.py, which test_triton.py also runs
  under the interpreter): gemv-cuda decode and mm-cuda prefill logits against PEFT (GPTQ bf16, AWQ fp16), one
  mm-cuda SGD step against PEFT's (GPTQ float32: 1e-3; AWQ bf16: 5e-2), the report naming the lowering for
  every site.
* QA-LoRA and OFT against PEFT, AdaLoRA against eager qpass (PEFT's AdaLoRA GPTQ class dispatches through
  a CPU-only gptqmodel class), all through `qpass.compile`: decode, prefill and a backward.

Every compiled forward passes use_cache=False or a StaticCache: on the GPU image's torch 2.11 a compiled
forward that builds a DynamicCache fails in dynamo's guards (../shared/gpu/wheels.sh).
"""

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
peft = pytest.importorskip("peft")

import qpass
from qpass import lowering

from adapter_parity import assert_close, max_rel, randomize, sgd_updates, trainable
from conftest import input_ids
from triton_mm_cases import MM_CASES, mm_case
from triton_model_cases import BASES, MODEL_CASES, judge, model_case, peft_oracle

DEVICE = "cuda"
DECODE_LOWERING = "gemv-cuda"  # what the report shows for decode-shaped graphs on this device
PREFILL_LOWERING = "torch-dequant"  # and for prefill graphs
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _gptq(dtype):
    return BASES["gptq"][0](dtype, DEVICE)


def _peft_and_dir(kind, dtype, tmp_path, config):
    """The PEFT oracle (random adapter, std 0.1) and the directory PEFT saved it to."""
    return peft_oracle(kind, dtype, tmp_path, config, DEVICE), str(tmp_path)


def _ids(batch, seq, seed=0):
    return input_ids(batch=batch, seq=seq, seed=seed).to(DEVICE)


def _bases(model) -> list:
    return [r.base for r in qpass.report(model).rows if r.base]


# ---- the kernel itself --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gptq-sym-bf16-lora-bias", "gptq-asym-fp16-lora-bf16", "gptq-act-bf16-lora",
                                  "gptq-sym-fp32-lora", "gptq-asym-bf16-partial-group", "awq-bf16-lora-bias",
                                  "awq-fp16-column-tail", "awq-bf16-20-tokens-lora"])
def test_kernel_on_the_gpu_matches_the_float64_reference(case):
    from test_triton import KERNEL_CASES, _kernel_case

    r = _kernel_case(*KERNEL_CASES[case], device=DEVICE)
    assert r["ratio"] <= 1.0 and r["ratio_eager"] <= 1.0, r


def test_kernel_replays_from_a_cuda_graph():
    """Captured once, replayed on new inputs written into the captured x: the same bits as a plain call (the
    grid and workspaces depend on the shapes only; no host sync inside)."""
    from qpass.kernels import triton_gemv
    from qpass.quant import match
    from qpass.testing import gptq_linear_from

    layer = gptq_linear_from(torch.nn.Linear(256, 192), group_size=64, sym=False).to(DEVICE)
    own = {b: getattr(layer, b) for b in match(layer).buffers}
    lora = ([torch.randn(8, 256, device=DEVICE) * 0.1], [torch.randn(192, 8, device=DEVICE) * 0.1],
            [torch.tensor([2.0], device=DEVICE)])

    def call(x):
        return triton_gemv.int4_gemv(x, [own["qweight"]], [own["qzeros"]], [own["scales"]], [None], [own["bias"]],
                                     [64], False, *lora)

    x = torch.randn(2, 256, device=DEVICE, dtype=torch.bfloat16)
    call(x)  # compile the kernels before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = call(x)
    for seed in range(3):
        x.copy_(torch.randn(2, 256, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.bfloat16))
        graph.replay()
        assert torch.equal(y, call(x.clone()))


# ---- LoRA against PEFT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gptq", "awq"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_decode_and_prefill_match_peft(kind, dtype, tmp_path):
    dtype = DTYPES[dtype]
    oracle, path = _peft_and_dir(kind, dtype, tmp_path, peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL))
    model = qpass.compile(BASES[kind][0](dtype, DEVICE), path)
    decode, prefill = _ids(1, 1, seed=1), _ids(2, 12)
    with torch.no_grad():
        assert_close(model(decode).logits, oracle(decode).logits, dtype)
        sites = list(model._qpass.sites.values())
        assert lowering.repacked_bytes(sites) == 0  # the decode kernel reads the library's buffers
        assert all(b.startswith(DECODE_LOWERING) for b in _bases(model)), _bases(model)
        assert_close(model(prefill).logits, oracle(prefill).logits, dtype)
    assert all(DECODE_LOWERING in b and PREFILL_LOWERING in b for b in _bases(model)), _bases(model)


@pytest.mark.parametrize("kind,dtype,tol", [("gptq", "fp32", 1e-3), ("awq", "fp32", 1e-3), ("gptq", "bf16", 5e-2)])
def test_sgd_step_matches_peft(kind, dtype, tol, tmp_path):
    dtype = DTYPES[dtype]
    oracle, path = _peft_and_dir(kind, dtype, tmp_path, peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL))
    ids, labels = _ids(2, 12, seed=1), _ids(2, 12, seed=2)
    ref = sgd_updates(peft.PeftModel.from_pretrained(BASES[kind][1](dtype, DEVICE), path, is_trainable=True), ids,
                      labels)
    ours = sgd_updates(qpass.compile(BASES[kind][0](dtype, DEVICE), path), ids, labels)
    assert len(ours) == len(ref) > 0
    assert max_rel(ours, ref) < tol


def test_cuda_graph_decode_with_static_cache_matches_peft(tmp_path):
    """reduce-overhead (CUDA graphs) decode, token by token into a StaticCache: each step's logits equal PEFT's
    (eager, its own StaticCache) within the bf16 tolerance, and inductor skipped no graph."""
    from transformers import StaticCache

    from qpass.testing import kv_cache

    dtype = torch.bfloat16
    oracle, path = _peft_and_dir("gptq", dtype, tmp_path, peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL))
    model = qpass.compile(_gptq(dtype), path, mode="reduce-overhead")
    prompt, steps = _ids(1, 8), _ids(1, 4, seed=3)
    caches = [StaticCache(config=m.config, max_cache_len=16) for m in (model, oracle)]
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        # the prompt fills each cache eagerly (`forward` bypasses the compiled call): the cache's tensors are made,
        # and marked static, outside the graph
        model.forward(prompt, **kv_cache(caches[0]), use_cache=True)
        oracle(prompt, **kv_cache(caches[1]), use_cache=True)
        for i in range(steps.shape[1]):
            pos = torch.tensor([prompt.shape[1] + i], device=DEVICE)
            token = steps[:, i : i + 1]
            ours = model(token, **kv_cache(caches[0]), cache_position=pos, use_cache=True).logits.clone()
            ref = oracle(token, **kv_cache(caches[1]), cache_position=pos, use_cache=True).logits
            assert_close(ours, ref, dtype)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    assert all(b.startswith(DECODE_LOWERING) for b in _bases(model)), _bases(model)


# ---- mm-cuda: the fused dequant-GEMM for prefill and training, on request -----------------------------------


@pytest.mark.parametrize("case", list(MM_CASES))
def test_mm_kernel_on_the_gpu_matches_the_float64_reference(case):
    r = mm_case(*MM_CASES[case], device=DEVICE)
    assert all(r[k] <= 1.0 for k in ("ratio", "ratio_eager", "dx_ratio", "dx_ratio_eager")), r


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_on_a_requested_triton_lowering_matches_peft(case):
    """tests/triton_model_cases.py on the GPU with inductor: gemv-cuda decode and mm-cuda prefill logits, and mm-cuda
    SGD steps (the backward through `int4_mm_dx`), against PEFT; every site on the lowering requested."""
    judge(case, model_case(*MODEL_CASES[case], device=DEVICE, inner="inductor"))


# ---- the other adapter kinds ----------------------------------------------------------------------------------

OTHERS = {
    "qalora": lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL, use_qalora=True, qalora_group_size=16),
    "oft": lambda: peft.OFTConfig(target_modules=ALL, oft_block_size=0, r=4),
}


@pytest.mark.parametrize("kind", list(OTHERS))
def test_qalora_and_oft_match_peft(kind, tmp_path):
    dtype = torch.bfloat16
    oracle, path = _peft_and_dir("gptq", dtype, tmp_path, OTHERS[kind]())
    model = qpass.compile(_gptq(dtype), path)
    with torch.no_grad():
        for ids in (_ids(1, 1, seed=1), _ids(2, 12)):
            assert_close(model(ids).logits, oracle(ids).logits, dtype)
    _backward_matches_eager(model, dtype)


def test_adalora_compiles_and_matches_eager():
    dtype = torch.bfloat16
    cfg = qpass.AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=8, target_modules=ALL)
    model = qpass.compile(_gptq(dtype), cfg)
    randomize(model, ("lora_A", "lora_B", "lora_E"), std=0.25)
    with torch.no_grad():
        for ids in (_ids(1, 1, seed=1), _ids(2, 12)):
            assert_close(model(ids).logits, model.forward(ids).logits, dtype)  # compiled vs eager (`forward`)
    _backward_matches_eager(model, dtype)


def _backward_matches_eager(model, dtype, tol=5e-2):
    """One backward through the compiled model and through eager qpass (`forward` bypasses the compiled call):
    every adapter gradient within `tol` relative (bf16 roundings differ in order)."""
    ids = _ids(2, 12, seed=4)
    grads = []
    for call in (model, model.forward):
        call(input_ids=ids, labels=ids).loss.backward()
        grads.append({k: p.grad.float().clone() for k, p in trainable(model).items()})
        model.zero_grad(set_to_none=True)
    assert grads[0] and set(grads[0]) == set(grads[1])
    assert max_rel(grads[0], grads[1]) < tol
