"""qpass's Triton kernels on a machine without a GPU — the decode kernel (`qpass_triton::int4_gemv`, the gemv-cuda
lowering) and the prefill/training dequant-GEMM (`qpass_triton::int4_mm` + `int4_mm_dx`, mm-cuda; its cases and
bounds in tests/triton_mm_cases.py, the `test_mm_*` tests below):
Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors, in a child process (the variable
must be set before triton is imported; this pytest process never imports it). The child is this file run as a
script: it computes every case and writes the numbers to a JSON file; the tests below judge them. Whole models
compiled onto either lowering: tests/triton_model_cases.py.

Layers are real: gptqmodel `TorchLinear` (sym, asym, act-order) and autoawq `WQLinear_GEMM`, packed by the
libraries' own packers (qpass.testing). The reference is float64: the layout's own dequantize (bit-exact with
the library's: tests/test_dequant.py, tests/test_awq.py) evaluated with float64 scales, so W = s (q - z)
exactly, plus LoRA's math (patterns/lora.py) and the bias. Bound per output element (`ratio` = max |y - ref| /
bound, must be <= 1):

    u_out |ref| + u_w (|x| @ |W|) + K 2^-24 (|x| @ 16 S + |bias| + |scaling| (|x| @ |A|^T) @ |B|^T)

u_out: the output dtype's unit roundoff (the kernel rounds once: bf16 2^-8, fp16 2^-11, fp32 2^-24); u_w: x's
unit roundoff where the kernel rounds the dequantized weight to x's dtype (act-order, or a group not whole in
the K block such as a partial last group), else 0 (exact codes); the last term float32 accumulation over K
(S: each row's scale; 16 S bounds |q| + |z|). Against eager qpass's plain-torch base (`Layout.torch_forward`,
the library's roundings: W in the scales' dtype, then x's) + the LoRA policy's math, the bound is
(4 u_x + 2 u_scales) (|x| @ |W| + |bias| + LoRA magnitude) plus the same accumulation term.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from triton_mm_cases import MM_CASES
from triton_model_cases import MODEL_CASES, judge

if importlib.util.find_spec("triton") is None:  # pragma: no cover - triton ships with torch's Linux wheels
    pytest.skip("triton is not installed", allow_module_level=True)

# name: (layer kind, x dtype, tokens, K, N, group, bias, LoRA (rank, adapter dtype) or None, scales dtype)
KERNEL_CASES = {
    "gptq-sym-bf16-lora-bias": ("gptq-sym", "bfloat16", 1, 128, 192, 32, True, (8, "float32"), "float16"),
    "gptq-asym-fp16-lora-bf16": ("gptq-asym", "float16", 3, 128, 192, 32, False, (8, "bfloat16"), "float16"),
    "gptq-act-bf16-lora": ("gptq-act", "bfloat16", 2, 128, 128, 32, False, (4, "float32"), "float16"),
    "gptq-act-fp16-bias": ("gptq-act", "float16", 1, 128, 64, 32, True, None, "float16"),
    "gptq-sym-fp32-lora": ("gptq-sym", "float32", 2, 64, 64, 32, False, (16, "float32"), "float16"),
    "gptq-asym-bf16-partial-group": ("gptq-asym", "bfloat16", 1, 96, 64, 64, True, None, "bfloat16"),
    "gptq-sym-fp16-one-group": ("gptq-sym", "float16", 2, 64, 64, 64, False, (4, "float32"), "float16"),
    "awq-bf16-lora-bias": ("awq", "bfloat16", 1, 128, 192, 32, True, (8, "float32"), "float16"),
    "awq-fp16-column-tail": ("awq", "float16", 3, 96, 96, 32, False, None, "float16"),
    "awq-bf16-bf16-scales": ("awq", "bfloat16", 2, 128, 128, 64, False, (8, "bfloat16"), "bfloat16"),
    "awq-bf16-20-tokens-lora": ("awq", "bfloat16", 20, 64, 64, 32, False, (8, "float32"), "float16"),
}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "results.json"
    # QPASS_CPP_KERNELS=0: the child never builds the C++ CPU kernels (the choose() checks compare CPU choices
    # with and without gemv-cuda under the same conditions)
    env = {**os.environ, "TRITON_INTERPRET": "1", "QPASS_CPP_KERNELS": "0"}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_the_float64_reference(interpreted, case):
    r = interpreted["kernel"][case]
    assert r["dtype"] == KERNEL_CASES[case][1] and r["shape"] == [KERNEL_CASES[case][2], KERNEL_CASES[case][4]]
    assert r["ratio"] <= 1.0, f"max |y - ref| is {r['ratio']:.3g} x the bound ({r})"
    assert r["ratio_eager"] <= 1.0, f"against eager qpass: {r['ratio_eager']:.3g} x the bound ({r})"
    if KERNEL_CASES[case][7] is not None:  # the LoRA term is checked, not lost in the tolerance
        assert r["lora_effect"] > 20, r


def test_cases_cover_the_kernel_paths(interpreted):
    """What the plan chose: K split into several slices somewhere (partial sums added by the second kernel),
    two row blocks, the exact-code path and the per-element path (act-order, a partial last group)."""
    k = interpreted["kernel"]
    assert k["gptq-sym-bf16-lora-bias"]["split"] > 1 and k["awq-bf16-lora-bias"]["split"] > 1
    assert k["awq-bf16-20-tokens-lora"]["row_blocks"] == 2
    assert k["gptq-sym-bf16-lora-bias"]["per_block"] and k["awq-fp16-column-tail"]["per_block"]
    assert not k["gptq-act-bf16-lora"]["per_block"] and not k["gptq-asym-bf16-partial-group"]["per_block"]


@pytest.mark.parametrize("case", ["gptq-siblings-bf16", "gptq-siblings-bf16-adapters-fp16", "awq-siblings-bare-fp16"])
def test_lowered_sibling_group_matches_the_torch_lowering(interpreted, case):
    """`lowering.lowered_group(..., "gemv-cuda")` — the function the rewrite splices in for q/k/v — run eagerly
    on CPU tensors through the interpreter, against each site's plain-torch lowering (`Site.plain_lowered`):
    GPTQ q (sym, bias), k (asym, act-order), v (sym) with float32 LoRA (ranks 4/8/16) inside one op call;
    float16 LoRA, which the kernel does not read (`LOW_RANK_DTYPES`): the bases in one call, the adapters in
    torch; AWQ siblings with no adapter: one bare call. Bound per element: 2 u_x (|x| @ |W| + |bias| + LoRA
    magnitude) + 2^-10 LoRA magnitude + the float32 accumulation term."""
    r = interpreted["siblings"][case]
    assert r["calls"] == 1 and r["outputs"] == 3
    assert max(r["ratios"]) <= 1.0, r


def test_fake_kernel_and_opcheck(interpreted):
    """The fake kernel gives inductor the right shape and dtype for fake CUDA tensors (no GPU needed), and
    `torch.library.opcheck` (schema, fake vs real, dispatch) passes on a real call."""
    f = interpreted["fake"]
    assert f["shape"] == [3, 64 + 128] and f["dtype"] == "torch.bfloat16" and f["device"] == "cuda:0"
    assert f["opcheck"] == "ok", f["opcheck"]


def test_lowered_group_traces_on_fake_cuda_tensors(interpreted):
    """The function the rewrite splices in for q/k/v on a CUDA graph, traced on fake CUDA tensors (no GPU): one
    `qpass_triton::int4_gemv` call for the three sites and their adapters, outputs in x's dtype on cuda."""
    t = interpreted["traced"]
    assert t["ops"] == 1
    assert t["outputs"] == [[[1, 2, n], "torch.bfloat16", "cuda:0"] for n in (128, 64, 64)]


def test_auto_picks_gemv_cuda_only_for_cuda_decode(interpreted):
    """`lowering.choose` on fake CUDA inputs: gemv-cuda for decode token counts of 4-bit GPTQ (in order and
    act-order) and AWQ sites, in every activation dtype; not for 17 tokens, gradients or 3-bit GPTQ. On CPU
    inputs `applies` is False and "auto" chooses what it chose before gemv-cuda was registered."""
    c = interpreted["choose"]
    for kind in ("gptq-sym", "gptq-act", "awq"):
        for dtype in ("bfloat16", "float16", "float32"):
            assert c[f"{kind}/cuda/{dtype}/1"] == "gemv-cuda", kind
        assert c[f"{kind}/cuda/bfloat16/16"] == "gemv-cuda"
        assert c[f"{kind}/cuda/bfloat16/17"] == "torch-dequant"
        assert c[f"{kind}/cuda/bfloat16/1/grad"] == "torch-dequant"
    assert c["gptq3/cuda/bfloat16/1"] == "torch-dequant"
    assert c["cpu_unchanged"] == [] and c["cpu_applies"] == [], c
    assert c["accepts_cpu"] is False and c["accepts_cuda_grad"] is False


# ---- mm-cuda: the dequant-GEMM and its backward (tests/triton_mm_cases.py) ---------------------------------


@pytest.mark.parametrize("case", list(MM_CASES))
def test_mm_forward_and_dx_match_the_float64_reference(interpreted, case):
    r = interpreted["mm"]["kernel"][case]
    assert r["dtype"] == MM_CASES[case][1] and r["shape"] == [MM_CASES[case][2], MM_CASES[case][4]]
    for key in ("ratio", "ratio_eager", "dx_ratio", "dx_ratio_eager"):
        assert r[key] <= 1.0, f"{key}: {r[key]:.3g} x the bound ({r})"


def test_mm_cases_cover_the_kernel_paths(interpreted):
    """The exact-code path (two K blocks in one group too) and the per-element path (act-order, a partial last
    group); two row blocks (with a row tail) and two column blocks (with a column tail) in one grid."""
    k = interpreted["mm"]["kernel"]
    assert k["gptq-sym-bf16-bias"]["per_block"] and k["awq-fp16-bf16-scales"]["per_block"]
    assert not k["gptq-act-bf16-bias"]["per_block"] and not k["gptq-asym-bf16-partial-group"]["per_block"]
    assert k["gptq-sym-bf16-bias"]["tiles"] == [32, 128, 64]  # group 128: two K blocks per group
    assert k["awq-bf16-bias"]["tiles"][:2] == [32, 128]  # N = 160: a column tail of 32
    assert k["awq-bf16-bias"]["row_blocks"] == 2 and k["gptq-sym-bf16-bias"]["row_blocks"] == 2  # 40 rows


@pytest.mark.parametrize("case", ["gptq-siblings-bf16-folded", "awq-siblings-fp16-train"])
def test_mm_lowered_sibling_group_matches_the_torch_lowering(interpreted, case):
    """`lowering.lowered_group(..., "mm-cuda")` — q/k/v (GPTQ sym + bias, act-order, sym; or AWQ) with LoRA ranks
    4/8/16 — run eagerly on CPU tensors through the interpreter, against each site's plain-torch lowering
    (`Site.plain_lowered`): one op call for the three bases. Without gradient each up-projection is folded into the
    call (t and s B rounded to x's dtype); with gradient (a training graph) the adapters stay in torch and the
    backward runs `int4_mm_dx` once: x's gradient and every LoRA gradient against plain torch's. Bounds: outputs
    2 u_x (|x| @ |W| + |bias| + LoRA magnitude) + 2^-10 LoRA magnitude + accumulation; x's gradient 4 u_x
    (|dy| @ (|W| + |s B A|^T)^T) + accumulation; LoRA gradients within 2^-12 of the largest."""
    r = interpreted["mm"]["siblings"][case]
    assert r["calls"] == 1 and r["outputs"] == 3
    assert r["folded"] == case.endswith("folded") and r["dx_calls"] == (0 if r["folded"] else 1)
    assert max(r["ratios"]) <= 1.0, r
    if not r["folded"]:
        assert r["dx_ratio"] <= 1.0 and max(r["lora_grad_rel"]) <= 2.0**-12, r


def test_mm_fake_kernels_and_opcheck(interpreted):
    """The fake kernels give inductor the right shapes for fake CUDA tensors (no GPU), and `torch.library.opcheck`
    (schema, autograd registration, fake vs real, AOT dispatch) passes on real calls of both ops (two sites,
    act-order and bias on one, up-projections folded)."""
    f = interpreted["mm"]["fake"]
    assert f["y"] == [[3, 64 + 128], "torch.bfloat16", "cuda:0"] and f["dx"] == [[3, 128], "torch.bfloat16", "cuda:0"]
    assert f["opcheck"] == "ok", f["opcheck"]


def test_mm_training_graph_traces_with_its_backward(interpreted):
    """The q/k/v function of a training graph, forward and `autograd.grad`, traced on fake tensors (as AOTAutograd
    does): one `int4_mm` call forward, one `int4_mm_dx` call backward."""
    t = interpreted["mm"]["traced"]
    assert t["mm"] == 1 and t["dx"] == 1 and t["outputs"] == [[[1, 20, n], "torch.bfloat16"] for n in (128, 64, 64)]
    assert t["dx_shape"] == [[1, 20, 128], "torch.bfloat16", "cpu"]


def test_mm_cuda_on_request_only(interpreted):
    """`choose(..., "mm-cuda")` on fake CUDA inputs: mm-cuda for 4-bit GPTQ (in order, act-order) and AWQ sites at
    1 and 40 tokens, every activation dtype, with or without gradient; torch-dequant for 3-bit GPTQ and CPU
    inputs. "auto" never picks it (torch-dequant keeps CUDA prefill and training until measured on a GPU)."""
    c = interpreted["mm"]["choose"]
    assert len(c["requested"]) == 36 and set(c["requested"].values()) == {"mm-cuda"}, c["requested"]
    assert c["gptq3"] == "torch-dequant" and c["cpu"] == "torch-dequant"
    assert c["auto"] == [] and c["applies"] == []


# ---- both Triton lowerings on whole models (tests/triton_model_cases.py) ------------------------------------


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_compiled_onto_a_triton_lowering_matches_peft(interpreted, case):
    """A tiny Llama of real GPTQ / AWQ layers with LoRA on all 7 projections, compiled through qpass's backend
    (aot_eager behind it) with gemv-cuda or mm-cuda requested, on CPU tensors through the interpreter: decode or
    prefill logits, or one SGD step (mm-cuda's backward), against PEFT; every site on the lowering requested and
    no repacked weight. The same cases run on a GPU with inductor in tests/test_cuda.py."""
    judge(case, interpreted["model"][case])


# ---- Triton's compiler, not its interpreter (scripts/triton_aot_check.py) --------------------------------------


def test_one_launch_of_each_kernel_compiles_for_sm90(tmp_path):
    """The interpreter runs what the GPU compiler may reject: one launch of each of the four kernels, as qpass issues
    them for the GPU benchmark's q/k/v (act-order GPTQ, bf16: decode, prefill with the up-projection folded, dx),
    compiled by Triton and ptxas for sm_90 (H100/H200) without a GPU, within its shared memory per block. The script
    checks every launch of every workload for sm_90, sm_80 and sm_89, where float32 tiles do not fit a block and
    qpass falls back to smaller ones."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "triton_aot_check.py")
    out = tmp_path / "summary.json"
    args = ["--dtypes", "bf16", "--arch", "90", "--kinds", "gptq-act", "--sites", "qkv", "--one-per-kernel"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, *args, "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())["90"]
    assert r["launches"] == r["compiled"] == 4 and r["refused"] == 0 and r["failures"] == [], r
    assert 0 < r["max_shared"] <= 232448


# ---- the child: everything below runs under TRITON_INTERPRET=1 -----------------------------------------------


def _layer(kind, k, n, group, bias, seed, scales_dtype):
    import torch

    from qpass.testing import awq_linear_from, gptq_linear_from

    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    if kind == "awq":
        layer = awq_linear_from(lin, group_size=group)
    else:
        layer = gptq_linear_from(lin, group_size=group, sym=kind == "gptq-sym", desc_act=kind == "gptq-act", seed=seed,
                                 bits=3 if kind == "gptq3" else 4)
    for name in ("scales", "bias"):
        if getattr(layer, name, None) is not None:
            setattr(layer, name, getattr(layer, name).to(scales_dtype))
    return layer


def _unit(dtype):
    import torch

    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[dtype]


def _magnitudes(info, own, x64, lora) -> dict:
    """float64 reference and magnitudes of one site: ref, |x| @ |W| ("w"), |bias|, the LoRA term and its
    magnitude, and the float32-accumulation magnitude ("acc")."""
    import torch

    weights = [own[b].double() if b == "scales" else own[b] for b in info.buffers if b != "bias"]
    w = info.layout.dequantize(info, *weights)
    rows = own["g_idx"].long() if "g_idx" in own else torch.arange(info.in_features) // info.group
    m = {"ref": x64 @ w, "w": x64.abs() @ w.abs(), "bias": torch.zeros(w.shape[1], dtype=torch.float64)}
    m["lora"] = m["lora_mag"] = torch.zeros_like(m["ref"])
    if own.get("bias") is not None:
        m["bias"] = own["bias"].double().abs()
        m["ref"] = m["ref"] + own["bias"].double()
    if lora:
        a, b, s = (t.double() for t in lora)
        m["lora"] = s * (x64 @ a.t()) @ b.t()
        m["lora_mag"] = s.abs() * (x64.abs() @ a.abs().t()) @ b.abs().t()
        m["ref"] = m["ref"] + m["lora"]
    m["acc"] = x64.abs() @ (16 * own["scales"].double()[rows]) + m["bias"] + m["lora_mag"]
    return m


def _eager(info, own, x, lora):
    """Eager qpass's numerics: the plain-torch base (library roundings) + LoRA under the `adapter` policy."""
    import torch.nn.functional as F

    from qpass import policy

    y = info.layout.torch_forward(info, x, [own[b] for b in info.buffers])
    if not lora:
        return y
    a, b, s = lora
    return policy.add_output("adapter", y, F.linear(F.linear(x.to(a.dtype), a), b) * s)


def _kernel_case(kind, dtype, tokens, k, n, group, bias, lora, scales_dtype, device="cpu"):
    """One KERNEL_CASES entry: the kernel's output on `device` judged against the float64 reference (module
    docstring); also run on a GPU by tests/test_cuda.py."""
    import torch

    from qpass.kernels import triton_gemv
    from qpass.quant import match

    dtype, scales_dtype = getattr(torch, dtype), getattr(torch, scales_dtype)
    layer = _layer(kind, k, n, group, bias, seed=k + n + tokens, scales_dtype=scales_dtype)
    info = match(layer)
    own = {b: getattr(layer, b) for b in info.buffers}
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, k, generator=g).to(dtype)
    ab = ()
    if lora:
        rank, adapter_dtype = lora[0], getattr(torch, lora[1])
        ab = ((torch.randn(rank, k, generator=g) * 0.1).to(adapter_dtype),
              (torch.randn(n, rank, generator=g) * 0.1).to(adapter_dtype), torch.tensor([2.0]))
    on = {b: t.to(device) for b, t in own.items()}
    g_idx = on["g_idx"] if kind == "gptq-act" else None
    y = triton_gemv.int4_gemv(x.to(device), [on["qweight"]], [on["qzeros"]], [on["scales"]], [g_idx],
                              [on.get("bias")], [info.group], kind == "awq",
                              *([[t.to(device)] for t in ab] if ab else [[], [], []])).cpu()
    p = triton_gemv.plan(tokens, k, n, lora[0] if lora else 0, info.group, g_idx is None,
                         triton_gemv._programs(torch.device(device)))
    m = _magnitudes(info, own, x.double(), ab)
    u, u_s, u_a = _unit(dtype), _unit(scales_dtype), _unit(ab[0].dtype) if ab else 0.0
    u_w = 0.0 if p.per_block or dtype == torch.float32 else u
    bound = u * m["ref"].abs() + u_w * m["w"] + k * 2.0**-24 * m["acc"]
    eager_bound = (4 * u + 2 * u_s) * (m["w"] + m["bias"] + m["lora_mag"]) + 4 * u_a * m["lora_mag"] \
        + 2 * k * 2.0**-24 * m["acc"]
    eager = _eager(info, own, x, ab).double()
    return {"dtype": str(y.dtype).removeprefix("torch."), "shape": list(y.shape),
            "ratio": ((y.double() - m["ref"]).abs() / bound).max().item(),
            "ratio_eager": ((y.double() - eager).abs() / eager_bound).max().item(),
            "lora_effect": (m["lora"].abs().max() / bound.max()).item(), "split": p.split, "per_block": p.per_block,
            "row_blocks": -(-tokens // triton_gemv.BLOCK_M)}


def _sibling_module(kinds, lora, adapter_dtype):
    """q (sym, bias), k, v quantized layers on one input, prepared by qpass (LoRA ranks 4/8/16 or disabled)."""
    import torch

    import qpass

    model = torch.nn.Module()
    for i, (name, (kind, n, bias)) in enumerate(zip(("q_proj", "k_proj", "v_proj"), kinds)):
        model.add_module(name, _layer(kind, 128, n, 32, bias, seed=i, scales_dtype=torch.float16))
    cfg = qpass.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                           rank_pattern={"k_proj": 8, "v_proj": 16})
    qpass.prepare(model, cfg, adapter_dtype=adapter_dtype)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    sites = sorted(model._qpass.sites.values(), key=lambda s: ("q_proj", "k_proj", "v_proj").index(s.path))
    for site in sites:
        site.disabled = not lora
    return model, sites  # a site holds its module weakly: the caller keeps the model


def _sibling_case(kinds, dtype, adapter_dtype, lora):
    import torch

    from qpass import lowering
    from qpass.kernels import triton_gemv
    from qpass.quant.layout import named

    dtype, adapter_dtype = getattr(torch, dtype), getattr(torch, adapter_dtype)
    model, sites = _sibling_module(kinds, lora, adapter_dtype)
    names = ("default",) if lora else ()
    calls = []
    check = triton_gemv._check
    triton_gemv._check = lambda *a: calls.append(1) or check(*a)
    x = torch.randn(1, 2, 128, generator=torch.Generator().manual_seed(6)).to(dtype)
    xas = [s.adapter_inputs(x, names, False, None) for s in sites]
    bases = [s.base_tensors() for s in sites]
    adapters = [s.slots[names[0]].tensors() if names else [] for s in sites]
    try:
        ys = lowering.lowered_group(sites, names, "gemv-cuda")(x, xas[0][0] if names else None, bases, adapters)
    finally:
        triton_gemv._check = check
    ratios = []
    for site, y, xa, own, adapter in zip(sites, ys, xas, bases, adapters):
        ref = site.plain_lowered(names)(x, xa, own, adapter).double()
        slot = site.slots["default"]
        ab = [slot.get(n).detach() for n in ("lora_A.weight", "lora_B.weight", "scaling")] if names else ()
        m = _magnitudes(site.info, named(site.info, own), x.double().reshape(-1, 128), ab)
        bound = 2 * _unit(dtype) * (m["w"] + m["bias"] + m["lora_mag"]) + 2.0**-10 * m["lora_mag"] \
            + 128 * 2.0**-24 * m["acc"]
        ratios.append(((y.double() - ref).abs().reshape(-1, y.shape[-1]) / bound).max().item())
    return {"calls": len(calls), "outputs": len(ys), "ratios": ratios}


def fake_cuda_sites():
    """Fake CUDA operands of a two-site GPTQ call (K 128, N 64 and 128, group 32): x (3, 128) bf16 and the
    qweight, qzeros, scales lists. Call inside a FakeTensorMode."""
    import torch

    x = torch.empty(3, 128, dtype=torch.bfloat16, device="cuda")
    qw = [torch.empty(16, n, dtype=torch.int32, device="cuda") for n in (64, 128)]
    qz = [torch.empty(4, n // 8, dtype=torch.int32, device="cuda") for n in (64, 128)]
    sc = [torch.empty(4, n, dtype=torch.float16, device="cuda") for n in (64, 128)]
    return x, qw, qz, sc


def _fake_and_opcheck():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qpass.kernels import triton_gemv
    from qpass.quant import match

    op = torch.ops.qpass_triton.int4_gemv
    with FakeTensorMode():
        x, qw, qz, sc = fake_cuda_sites()
        y = op(x, qw, qz, sc, [None, None], [None, None], [32, 32], False, [], [], [])
    layer = _layer("gptq-act", 64, 64, 32, True, seed=9, scales_dtype=torch.float16)
    own = {b: getattr(layer, b) for b in match(layer).buffers}
    g = torch.Generator().manual_seed(9)
    args = (torch.randn(2, 64, generator=g).to(torch.bfloat16), [own["qweight"]], [own["qzeros"]], [own["scales"]],
            [own["g_idx"]], [own["bias"]], [32], False, [torch.randn(4, 64, generator=g)],
            [torch.randn(64, 4, generator=g)], [torch.tensor([0.5])])
    try:
        torch.library.opcheck(triton_gemv.int4_gemv, args, test_utils=("test_schema", "test_faketensor"))
        status = "ok"
    except Exception as exc:  # reported to the test, which prints it
        status = f"{type(exc).__name__}: {exc}"[:2000]
    return {"shape": list(y.shape), "dtype": str(y.dtype), "device": str(y.device), "opcheck": status}


def _traced_on_fake_cuda():
    """The lowered q/k/v function traced by make_fx on fake CUDA tensors (what AOTAutograd does before inductor):
    one op node, each site's output shape and dtype."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from qpass import lowering

    model, sites = _sibling_module(SIBLING_CASES["gptq-siblings-bf16"][0], True, torch.float32)
    fn = lowering.lowered_group(sites, ("default",), "gemv-cuda")
    with FakeTensorMode():
        x = torch.empty(1, 2, 128, dtype=torch.bfloat16, device="cuda")
        bases = [[torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in s.base_tensors()] for s in sites]
        adapters = [[torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in s.slots["default"].tensors()]
                    for s in sites]
        xa = x.float()
    gm = make_fx(lambda *args: fn(*args), tracing_mode="fake")(x, xa, bases, adapters)
    op = torch.ops.qpass_triton.int4_gemv.default
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == op]
    outs = [n.meta["val"] for n in gm.graph.find_nodes(op="output")[0].args[0]]
    return {"ops": len(ops), "outputs": [[list(o.shape), str(o.dtype), str(o.device)] for o in outs]}


def choice_sites():
    """One prepared 64x64 site per layer kind the choose() checks cover, by kind, and the models (a site holds
    its module weakly: keep them alive)."""
    import torch

    import qpass

    sites, models = {}, []
    for kind in ("gptq-sym", "gptq-act", "awq", "gptq3"):
        model = torch.nn.Module()
        models.append(model)
        model.add_module("proj", _layer(kind, 64, 64, 32, False, seed=3, scales_dtype=torch.float16))
        qpass.prepare(model, qpass.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
        sites[kind] = next(iter(model._qpass.sites.values()))
    return sites, models


def cuda_inputs(tokens: tuple) -> dict:
    """Fake CUDA inputs (1, t, 64) by (dtype name, t): what a graph on a GPU shows the lowering's choice."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return {(d, t): torch.empty(1, t, 64, dtype=getattr(torch, d), device="cuda")
                for d in ("bfloat16", "float16", "float32") for t in tokens}


def _choose():
    import torch

    from qpass import lowering
    from qpass.lowering.triton import GemvCuda

    sites, _models = choice_sites()  # the models keep the sites alive
    fakes = cuda_inputs((1, 16, 17))
    out, unchanged, applies = {}, [], []
    for kind, site in sites.items():
        for (d, t), x in fakes.items():
            out[f"{kind}/cuda/{d}/{t}"] = lowering.choose(site, x, False)
            out[f"{kind}/cuda/{d}/{t}/grad"] = lowering.choose(site, x, True)
        for d in ("bfloat16", "float16", "float32"):
            for t in (1, 16, 17):
                for grad in (False, True):
                    x = torch.zeros(1, t, 64, dtype=getattr(torch, d))
                    before = next(n for n, low in lowering._REGISTRY.items()
                                  if n != "gemv-cuda" and low.applies(site, x, grad))
                    if lowering.choose(site, x, grad) != before:
                        unchanged.append(f"{kind}/{d}/{t}/{grad}")
                    if GemvCuda().applies(site, x, grad):
                        applies.append(f"{kind}/{d}/{t}/{grad}")
    out["cpu_unchanged"], out["cpu_applies"] = unchanged, applies
    site, cpu_x = sites["gptq-sym"], torch.zeros(1, 1, 64)
    out["accepts_cpu"] = GemvCuda().accepts(site, cpu_x, False)
    out["accepts_cuda_grad"] = GemvCuda().accepts(site, fakes[("bfloat16", 1)], True)
    return out


SIBLING_CASES = {  # name: (q, k, v as (kind, N, bias)), x dtype, adapter dtype, LoRA active
    "gptq-siblings-bf16": ((("gptq-sym", 128, True), ("gptq-act", 64, False), ("gptq-sym", 64, False)),
                           "bfloat16", "float32", True),
    "gptq-siblings-bf16-adapters-fp16": ((("gptq-sym", 128, True), ("gptq-asym", 64, False), ("gptq-sym", 64, False)),
                                         "bfloat16", "float16", True),
    "awq-siblings-bare-fp16": ((("awq", 128, True), ("awq", 64, False), ("awq", 64, False)), "float16", "float32",
                               False),
}


def _child(path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run by the tests with TRITON_INTERPRET=1"
    import triton_mm_cases
    import triton_model_cases
    from qpass.log import quiet_third_party

    quiet_third_party()
    results = {"kernel": {name: _kernel_case(*spec) for name, spec in KERNEL_CASES.items()},
               "siblings": {name: _sibling_case(*spec) for name, spec in SIBLING_CASES.items()},
               "fake": _fake_and_opcheck(), "traced": _traced_on_fake_cuda(), "choose": _choose(),
               "mm": triton_mm_cases.results(), "model": triton_model_cases.results()}
    with open(path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    _child(sys.argv[1])
