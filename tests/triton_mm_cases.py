"""The cases of qpass's Triton dequant-GEMM (`qpass_triton::int4_mm`, its backward `int4_mm_dx`, the mm-cuda
lowering), computed in tests/test_triton.py's child process under Triton's interpreter (`results()`; the tests
there judge them) and on a GPU by tests/test_cuda.py (`mm_case(..., device="cuda")`).

Layers are real (gptqmodel `TorchLinear` sym/asym/act-order, autoawq `WQLinear_GEMM`); the reference is float64
with W = s (q - z) exact (test_triton.py's docstring). Bounds per output element (`ratio` = max |err| / bound <= 1):

    y  = x W + bias:  u_out |ref| + u_w (|x| @ |W|) + K 2^-24 (|x| @ 16 S + |bias|)
    dx = dy W^T:      u_out |ref| + u_w (|dy| @ |W|^T) + N 2^-24 (|dy| @ |W|^T)

u_out: the output dtype's unit roundoff (one rounding); u_w: x's where the kernel rounds the dequantized weight to
x's dtype (the backward always; the forward for act-order or a group not whole in the K block), 0 for float32 x or
the exact-code path; the last term float32 accumulation. Against eager qpass's plain-torch base (the library's
roundings) and its autograd backward: (4 u_x + 2 u_scales) times the magnitude, plus twice the accumulation term.
Every function imports torch and qpass itself: the pytest process imports this module without running them.
"""

# name: (layer kind, x dtype, tokens, K, N, group, bias, scales dtype)
MM_CASES = {
    "gptq-sym-bf16-bias": ("gptq-sym", "bfloat16", 40, 128, 192, 128, True, "float16"),
    "gptq-asym-fp16": ("gptq-asym", "float16", 33, 128, 64, 32, False, "float16"),
    "gptq-act-bf16-bias": ("gptq-act", "bfloat16", 24, 128, 64, 32, True, "float16"),
    "gptq-act-fp32": ("gptq-act", "float32", 17, 64, 64, 32, False, "float16"),
    "gptq-asym-bf16-partial-group": ("gptq-asym", "bfloat16", 18, 96, 64, 64, False, "bfloat16"),
    "awq-bf16-bias": ("awq", "bfloat16", 40, 64, 160, 32, True, "float16"),
    "awq-fp16-bf16-scales": ("awq", "float16", 25, 128, 64, 64, False, "bfloat16"),
    "awq-fp32-9-tokens": ("awq", "float32", 9, 64, 64, 32, False, "float16"),
}
SIBLING_CASES = {  # name: (q, k, v as (kind, N, bias)), x dtype, gradient
    "gptq-siblings-bf16-folded": ((("gptq-sym", 128, True), ("gptq-act", 64, False), ("gptq-sym", 64, False)),
                                  "bfloat16", False),
    "awq-siblings-fp16-train": ((("awq", 128, True), ("awq", 64, False), ("awq", 64, False)), "float16", True),
}


def mm_case(kind, dtype, tokens, k, n, group, bias, scales_dtype, device="cpu"):
    """One MM_CASES entry: the op's output and x's gradient on `device` judged against the float64 reference
    (module docstring)."""
    import torch

    from qpass.kernels import triton_mm
    from qpass.quant import match
    from test_triton import _eager, _layer, _magnitudes, _unit

    dtype, scales_dtype = getattr(torch, dtype), getattr(torch, scales_dtype)
    layer = _layer(kind, k, n, group, bias, seed=k + n + tokens, scales_dtype=scales_dtype)
    info = match(layer)
    own = {b: getattr(layer, b) for b in info.buffers}
    g = torch.Generator().manual_seed(tokens)
    x, dy = torch.randn(tokens, k, generator=g).to(dtype), torch.randn(tokens, n, generator=g).to(dtype)
    on = {b: t.to(device) for b, t in own.items()}
    g_idx = on["g_idx"] if kind == "gptq-act" else None
    xd = x.detach().to(device).requires_grad_(True)  # a new leaf also where .to() returns x itself
    y = triton_mm.int4_mm(xd, [on["qweight"]], [on["qzeros"]], [on["scales"]], [g_idx], [on.get("bias")], [info.group],
                          kind == "awq", [], [])
    y.backward(dy.to(device))
    y, dx = y.detach().cpu(), xd.grad.cpu()
    p = triton_mm.tiles(tokens, k, n, info.group, g_idx is None)
    m = _magnitudes(info, own, x.double(), ())
    w = info.layout.dequantize(info, *[own[b].double() if b == "scales" else own[b] for b in info.buffers
                                       if b != "bias"])
    u, u_s = _unit(dtype), _unit(scales_dtype)
    u_w = 0.0 if p.per_block or dtype == torch.float32 else u
    bound = u * m["ref"].abs() + u_w * m["w"] + k * 2.0**-24 * m["acc"]
    eager_bound = (4 * u + 2 * u_s) * (m["w"] + m["bias"]) + 2 * k * 2.0**-24 * m["acc"]
    dx_ref, dx_mag = dy.double() @ w.t(), dy.double().abs() @ w.abs().t()
    u_wb = 0.0 if dtype == torch.float32 else u
    dx_bound = u * dx_ref.abs() + u_wb * dx_mag + n * 2.0**-24 * dx_mag
    dx_eager_bound = (4 * u + 2 * u_s) * dx_mag + 2 * n * 2.0**-24 * dx_mag
    xe = x.clone().requires_grad_(True)
    eager = _eager(info, own, xe, ())
    eager.backward(dy)
    return {"dtype": str(y.dtype).removeprefix("torch."), "shape": list(y.shape),
            "ratio": ((y.double() - m["ref"]).abs() / bound).max().item(),
            "ratio_eager": ((y.double() - eager.detach().double()).abs() / eager_bound).max().item(),
            "dx_ratio": ((dx.double() - dx_ref).abs() / dx_bound).max().item(),
            "dx_ratio_eager": ((dx.double() - xe.grad.double()).abs() / dx_eager_bound).max().item(),
            "per_block": p.per_block, "tiles": [p.block_m, p.block_n, p.block_k], "row_blocks": -(-tokens // p.block_m)}


def _sibling_case(kinds, dtype, grad):
    """q, k, v (test_triton's `_sibling_module`, LoRA ranks 4/8/16, float32 adapters) through the mm-cuda lowered
    group, against plain torch; with `grad`, x's and the LoRA gradients too."""
    import torch

    from qpass import lowering
    from qpass.kernels import triton_mm
    from qpass.quant.layout import named
    from test_triton import _magnitudes, _sibling_module, _unit

    dtype = getattr(torch, dtype)
    model, sites = _sibling_module(kinds, True, torch.float32)
    names = ("default",)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 20, 128, generator=g).to(dtype)
    bases = [s.base_tensors() for s in sites]
    calls, ups = [], []  # check_sites: once per call of either op; _check_up: int4_mm's, with its up-projections
    check, check_up = triton_mm.check_sites, triton_mm._check_up
    triton_mm.check_sites = lambda *a, **kw: calls.append(1) or check(*a, **kw)
    triton_mm._check_up = lambda x, scales, up_t, up_w: ups.append(len(up_t)) or check_up(x, scales, up_t, up_w)
    fn = lowering.lowered_group(sites, names, "mm-cuda", needs_grad=grad)
    adapters = [s.slots["default"].tensors() for s in sites]

    def grads(ys, xr, dys):
        params = [p for s in sites for p in s.slots["default"].tensors() if p.requires_grad]
        torch.autograd.backward(list(ys), list(dys))
        out = [xr.grad.clone()] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out

    try:
        xr = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            ys = fn(xr, sites[0].adapter_inputs(xr, names, False, None)[0], bases, adapters)
        if grad:
            dys = [torch.randn(y.shape, generator=g).to(dtype) for y in ys]
            ours = grads(ys, xr, dys)
    finally:
        triton_mm.check_sites, triton_mm._check_up = check, check_up
    ratios = []
    for site, y in zip(sites, ys):
        slot = site.slots["default"]
        ab = [slot.get(n_).detach() for n_ in ("lora_A.weight", "lora_B.weight", "scaling")]
        with torch.no_grad():
            ref = site.plain_lowered(names)(x, site.adapter_inputs(x, names, False, None), site.base_tensors(),
                                            slot.tensors())
        m = _magnitudes(site.info, named(site.info, site.base_tensors()), x.double().reshape(-1, 128), ab)
        bound = 2 * _unit(dtype) * (m["w"] + m["bias"] + m["lora_mag"]) + 2.0**-10 * m["lora_mag"] \
            + 128 * 2.0**-24 * m["acc"]
        ratios.append(((y.detach().double() - ref.double()).abs().reshape(-1, y.shape[-1]) / bound)
                      .max().item())
    out = {"calls": len(ups), "dx_calls": len(calls) - len(ups), "outputs": len(ys), "ratios": ratios,
           "folded": ups == [3]}
    if grad:
        xe = x.clone().requires_grad_(True)
        refs = [s.plain_lowered(names)(xe, s.adapter_inputs(xe, names, False, None), s.base_tensors(),
                                       s.slots["default"].tensors()) for s in sites]
        theirs = grads(refs, xe, dys)
        mag = 0
        for s, dy in zip(sites, dys):
            info, own = s.info, named(s.info, s.base_tensors())
            w = info.layout.dequantize(info, *[own[b].double() if b == "scales" else own[b] for b in info.buffers
                                               if b != "bias"])
            a, b, sc = (s.slots["default"].get(n_).detach().double() for n_ in ("lora_A.weight", "lora_B.weight",
                                                                                 "scaling"))
            mag = mag + dy.double().reshape(-1, dy.shape[-1]).abs() @ (w.abs() + sc.abs() * (b.abs() @ a.abs()).t()).t()
        dx_bound = 4 * _unit(dtype) * mag + 256 * 2.0**-24 * mag
        out["dx_ratio"] = ((ours[0].double() - theirs[0].double()).abs().reshape(mag.shape) / dx_bound).max().item()
        out["lora_grad_rel"] = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours[1:], theirs[1:])]
    return out


def _fake_and_opcheck():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qpass.kernels import triton_mm
    from qpass.quant import match
    from test_triton import _layer, fake_cuda_sites

    with FakeTensorMode():
        x, qw, qz, sc = fake_cuda_sites()
        y = torch.ops.qpass_triton.int4_mm(x, qw, qz, sc, [None, None], [None, None], [32, 32], False, [], [])
        dx = torch.ops.qpass_triton.int4_mm_dx(y, qw, qz, sc, [None, None], [32, 32], False)
    layers = [_layer(kind, 64, 64, 32, bias, seed=9, scales_dtype=torch.float16)
              for kind, bias in (("gptq-act", True), ("gptq-sym", False))]
    owns = [{b: getattr(layer, b) for b in match(layer).buffers} for layer in layers]
    lists = [[o[b] for o in owns] for b in ("qweight", "qzeros", "scales")]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 64, generator=g).to(torch.bfloat16).requires_grad_(True)
    ups = ([torch.randn(2, 4, generator=g).to(torch.bfloat16) for _ in owns],
           [torch.randn(4, 64, generator=g).to(torch.bfloat16) for _ in owns])
    try:
        torch.library.opcheck(triton_mm.int4_mm, (x, *lists, [owns[0]["g_idx"], None], [owns[0]["bias"], None],
                                                  [32, 32], False, *ups))
        torch.library.opcheck(triton_mm.int4_mm_dx, (torch.randn(2, 128, generator=g).to(torch.bfloat16), *lists,
                                                     [owns[0]["g_idx"], None], [32, 32], False))
        status = "ok"
    except Exception as exc:  # reported to the test, which prints it
        status = f"{type(exc).__name__}: {exc}"[:2000]
    return {"y": [list(y.shape), str(y.dtype), str(y.device)], "dx": [list(dx.shape), str(dx.dtype), str(dx.device)],
            "opcheck": status}


def _traced_training_graph():
    """The q/k/v function of a training graph and its backward (autograd.grad of the outputs' sum), traced by
    make_fx on fake tensors (CPU ones: the autograd engine needs a CUDA device for CUDA tensors' backward; the fake
    kernels do not depend on the device)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from qpass import lowering
    from test_triton import SIBLING_CASES, _sibling_module

    model, sites = _sibling_module(SIBLING_CASES["gptq-siblings-bf16"][0], True, torch.float32)
    fn = lowering.lowered_group(sites, ("default",), "mm-cuda", needs_grad=True)

    def step(x, xa, bases, adapters):
        ys = fn(x, xa, bases, adapters)
        return ys, torch.autograd.grad(sum(y.float().sum() for y in ys), x)[0]

    with FakeTensorMode():
        x = torch.empty(1, 20, 128, dtype=torch.bfloat16, requires_grad=True)
        bases = [[torch.empty(t.shape, dtype=t.dtype) for t in s.base_tensors()] for s in sites]
        adapters = [[torch.empty(t.shape, dtype=t.dtype, requires_grad=True) for t in s.slots["default"].tensors()]
                    for s in sites]
        xa = x.float()
    gm = make_fx(step, tracing_mode="fake")(x, xa, bases, adapters)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    out = gm.graph.find_nodes(op="output")[0].args[0]
    ys, dx = [o.meta["val"] for o in out[:-1]], out[-1].meta["val"]
    return {"mm": targets.count(torch.ops.qpass_triton.int4_mm.default),
            "dx": targets.count(torch.ops.qpass_triton.int4_mm_dx.default),
            "outputs": [[list(y.shape), str(y.dtype)] for y in ys],
            "dx_shape": [list(dx.shape), str(dx.dtype), str(dx.device)]}


def _choose():
    import torch

    from qpass import lowering
    from qpass.lowering.triton_mm import MmCuda
    from test_triton import choice_sites, cuda_inputs

    sites, _models = choice_sites()  # the models keep the sites alive
    fakes = cuda_inputs((1, 40))
    out = {"requested": {}, "auto": [], "applies": []}
    for kind, site in sites.items():
        for (d, t), x in fakes.items():
            for grad in (False, True):
                key = f"{kind}/{d}/{t}/{grad}"
                if kind != "gptq3":
                    out["requested"][key] = lowering.choose(site, x, grad, "mm-cuda")
                if lowering.choose(site, x, grad) == "mm-cuda":
                    out["auto"].append(key)
                if MmCuda().applies(site, x, grad):
                    out["applies"].append(key)
    out["gptq3"] = lowering.choose(sites["gptq3"], fakes[("bfloat16", 40)], True, "mm-cuda")
    out["cpu"] = lowering.choose(sites["gptq-sym"], torch.zeros(1, 40, 64, dtype=torch.bfloat16), True, "mm-cuda")
    return out


def results() -> dict:
    """Every case, run under TRITON_INTERPRET=1 (test_triton.py's child)."""
    return {"kernel": {name: mm_case(*spec) for name, spec in MM_CASES.items()},
            "siblings": {name: _sibling_case(*spec) for name, spec in SIBLING_CASES.items()},
            "fake": _fake_and_opcheck(), "traced": _traced_training_graph(), "choose": _choose()}
