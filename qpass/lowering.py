"""Base lowerings: how a site's quantized matmul is computed under torch.compile, chosen per device and mode,
and the fused lowering of sibling LoRA sites that read the same input.

Lowerings (`QpassBackend(lowering=...)`; "auto" is the default):

| name            | computes                                                         | where it is chosen by "auto" |
|-----------------|------------------------------------------------------------------|------------------------------|
| torch-dequant   | plain-torch unpack + dequantize + matmul in the activation dtype; inductor fuses the dequantize, AOTAutograd derives the backward | layouts qpass's C++ kernels cannot take (act-order GPTQ in the library layout, other bit widths, CUDA training/prefill), or where the kernels could not be built |
| gemv-cpu        | `qpass_kernels::{gptq4,awq4}_gemv` (qpass/kernels/gemv.cpp): reads gptqmodel's own 4-bit GPTQ packing or AutoAWQ's GEMM packing, no copy; float32 accumulation, any activation dtype (bf16 through AVX512-BF16 dot products); siblings and their LoRA in one call | CPU, 4-bit GPTQ with groups in order (no act-order) or 4-bit AWQ with the group a multiple of 8, out_features % 16 == 0, <= DECODE_MAX_TOKENS tokens, no gradient needed, kernels built |
| dequant-cpu     | `qpass_kernels::{gptq4,awq4,int4pack}_mm` (qpass/kernels/dequant.cpp): the 4-bit codes unpacked by vector C++ straight into the activation dtype: for bf16 x (GPTQ/AWQ packing, int4pack layout; AVX512-BF16) into the packed B panels of qpass's own micro-kernel, otherwise in cache-sized column chunks each multiplied by the GEMM library at once (bf16/fp16 x on CPUs without a fast half-precision GEMM — AVX2-only CPUs for bf16 — in float32: the same half-precision values and float32 sums, ~100x faster there); bit-exact weights, no copy kept; siblings in one call; its backward (dx) unpacks again instead of saving the weight | CPU, prefill (> DECODE_MAX_TOKENS tokens) or training (and fp32/fp16 decode where gemv-cpu does not apply), for 4-bit GPTQ with groups in order, 4-bit AWQ (out_features % 16 == 0), and qpass.resident's int4pack layout; kernels built |
| int4pack-cpu    | `aten._weight_int4pack_mm_for_cpu` on weights repacked ONCE (cached per site / sibling group), bf16 activations, act-order by permuting the input | CPU, bf16, 4-bit, group 32/64/128/256, <= DECODE_MAX_TOKENS tokens (any count for weights held in the kernel's layout), no gradient needed; where gemv-cpu does not apply (act-order GPTQ, AWQ with a group that is not a multiple of 8, or no C++ kernels) |
| int4pack-cuda   | `aten._weight_int4pack_mm` (tinygemm) on weights repacked once with `_convert_weight_to_int4pack` | CUDA, same conditions (designed here, untested: no GPU on this machine) |

Why these rules (measured on the benchmark machine, see benchmarks/results/latest.json "kernels"): at one token the
int4 kernel reads a quarter of the bytes a bf16 GEMV does and wins; at 128 tokens a bf16 GEMM on the
dequantized weight beats it (the int4 kernel is a GEMV-style kernel), and the kernel with fp32 or fp16
activations is 10-100x slower on a CPU without avx512_fp16, so those stay on torch-dequant (casting fp32
activations to bf16 would break the fp32 parity tolerance).

Memory: no dense copy of any weight is kept; gemv-cpu keeps no copy at all. The int4pack lowerings keep ONE repacked copy of the 4-bit codes
(same bytes as `qweight`) plus bf16 scales/zero offsets per site or sibling group, made on first use;
`repacked_bytes()` reports it. The module's own buffers are untouched (state_dict, eager, training). Sites
already holding the int4pack layout (`prepare(..., base_layout="int4pack")`, `qpass.resident`; gptqmodel's
TorchAtenLinear) are read from their own buffers: no copy.

The int4 kernels have no autograd formula; in a graph that needs gradients the lowering wraps the kernel in
`qpass::int4pack_mm`, whose backward is dx = dy @ W^T with W dequantized from the repacked codes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import kernels, policy
from .quant import layouts
from .quant.packing import awq_interleave, int4pack_block_n, unpack_int4pack_cpu_kn, unpack_stream

LOWERINGS = ("auto", "torch-dequant", "gemv-cpu", "dequant-cpu", "int4pack-cpu", "int4pack-cuda")
CPP_LOWERINGS = ("gemv-cpu", "dequant-cpu")  # qpass's own kernels (qpass/kernels), on the library's buffers
DECODE_MAX_TOKENS = 16
_GROUPS = (32, 64, 128, 256)


# ---- what a site's weights look like as (codes, scales, zeros) ------------------------------------------


def _codes_scales_zeros(site, base: list):
    """(codes (K, N) int32, scales (G, N), zero codes (G, N), perm or None) from a site's own buffers, or None
    if its layout is not a 4-bit grouped one the int4 kernels can take."""
    info = site.info
    if info.bits != 4 or info.group_size not in _GROUPS or info.in_features % info.group_size:
        return None
    named = dict(zip(info.buffers, base))
    matcher = info.matcher
    if matcher is layouts.awq:
        q = unpack_stream(named["qweight"], 4, dim=1, count=info.out_features)
        z = unpack_stream(named["qzeros"], 4, dim=1, count=info.out_features)
        q, z = awq_interleave(q), awq_interleave(z)  # as layouts.awq_dequantize (4-bit AWQ order)
        return q, named["scales"], z, None
    if _gptq_packing(info):
        q = unpack_stream(named["qweight"], 4, dim=0, count=info.in_features)
        z = unpack_stream(named["qzeros"], 4, dim=1, count=info.out_features)
        g = named["g_idx"].long()
        canonical = torch.arange(info.in_features, device=g.device) // info.group_size
        perm = None
        if not torch.equal(g, canonical):  # act-order: permute the input so that groups are contiguous
            perm = torch.argsort(g, stable=True)
            if not torch.equal(g[perm], canonical):
                return None
            q = q[perm]
        return q, named["scales"], z, perm
    return None


@dataclass
class Packed:
    """Weights repacked once for an int4 kernel; several sites (siblings) may share one, split by `splits`."""

    device: str
    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    perm: Optional[torch.Tensor]
    group_size: int
    in_features: int
    splits: tuple  # out_features of each site, in order

    @property
    def out_features(self) -> int:
        return sum(self.splits)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list:
        """What the graph reads (registered on the GraphModule as buffers: fake-tensor tracing needs them as
        graph tensors, not closure constants)."""
        return [self.weight, self.scales_and_zeros] + ([self.perm] if self.perm is not None else [])


_CACHE: dict = {}  # (kind, site ids) -> (buffer ids and versions, Packed or Derived): see `_cached`


def _pack(sites, kind: str, parts: Optional[list] = None) -> Optional[Packed]:
    """Repack `sites` (concatenated along N) for the int4 kernel; `parts`: their `_codes_scales_zeros`, if the
    caller already has them."""
    if parts is None:
        parts = [_codes_scales_zeros(site, site.base_tensors()) for site in sites]
    if any(found is None for found in parts):
        return None
    perms = [p for _, _, _, p in parts]
    if any(p is not None for p in perms) and not all(p is not None and torch.equal(p, perms[0]) for p in perms):
        return None  # siblings with different act-order permutations cannot share one input
    q = torch.cat([c for c, _, _, _ in parts], 1)  # (K, N_total)
    scales = torch.cat([s for _, s, _, _ in parts], 1).float()
    zeros = torch.cat([z for _, _, z, _ in parts], 1).float()
    # the kernels compute scale * (code - 8) + zero_offset; GPTQ/AWQ mean scale * (code - zero)
    sz = torch.stack([scales, (8 - zeros) * scales], -1).to(torch.bfloat16).contiguous()
    codes = q.t().contiguous().to(torch.int32)  # (N, K)
    if kind == "cpu":
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1).contiguous()
        int4pack_block_n()  # probe the layout now, on real tensors (the backward runs it under fake tensors)
    else:
        weight = torch.ops.aten._convert_weight_to_int4pack(((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8), 8)
    info = sites[0].info
    return Packed(kind, weight, sz, perms[0], info.group_size, info.in_features, tuple(s.info.out_features for s in sites))


def _held(site) -> Packed:
    """A site whose module already holds the CPU int4pack layout (base_layout="int4pack", or gptqmodel's
    TorchAtenLinear after its first eval forward): its own buffers, no copy."""
    info = site.info
    named = dict(zip(info.buffers, site.base_tensors()))
    perm = named.get("ret_idx")
    return Packed("cpu", named["qweight"], named["scales_and_zeros"], None if perm is None else perm.long(),
                  info.group_size, info.in_features, (info.out_features,))


def packed_for(sites, kind: str) -> Optional[Packed]:
    """The repacked weights of `sites` (one site, or siblings fused along N), made once and cached; re-made if a
    base buffer was replaced or changed in place. Sites already holding the int4pack layout use their own
    buffers; siblings among them are not concatenated (that would be a copy): each runs its own kernel call."""
    if any(_holds_kernel_layout(s) for s in sites):
        return _held(sites[0]) if len(sites) == 1 and kind == "cpu" else None
    return _cached(kind, sites, lambda: _pack(sites, kind))


def _holds_kernel_layout(site) -> bool:
    """The module already holds the CPU int4pack layout (base_layout="int4pack", or TorchAtenLinear)."""
    return site.info.matcher in (layouts.int4pack_cpu, layouts.int4pack_resident)


def _cached(kind: str, sites, make):
    """`make()` (tensors derived from `sites`' buffers) once per (kind, sites), cached; re-made if a base buffer
    was replaced or changed in place. A None result is not cached."""
    key = (kind, tuple(s.id for s in sites))
    versions = tuple((id(b), b._version) for s in sites for b in s.base_tensors())
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == versions:
        return hit[1]
    with torch.no_grad():
        made = make()
    if made is not None:
        _CACHE[key] = (versions, made)
        for s in sites:  # drop the cache entry when a site goes away
            weakref.finalize(s, _CACHE.pop, key, None)
    return made


@dataclass
class Derived:
    """Small tensors derived once from a site's buffers for its plain-torch base (4-bit AWQ: the scales in
    slot-major column order, `layouts.awq_slot_scales`); cached and registered on the graph like repacked
    weights."""

    items: list

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.items)

    def tensors(self) -> list:
        return list(self.items)


def derived_for(site) -> Optional[Derived]:
    """The site's derived tensors for the torch-dequant base, made once and cached (re-made if a base buffer
    was replaced or changed in place), or None if its base needs none."""
    info = site.info
    if info.matcher is not layouts.awq:
        return None
    named = dict(zip(info.buffers, site.base_tensors()))
    if not layouts.slot_major(info, named["qzeros"].shape[0]):
        return None
    return _cached("awq-slot-scales", [site], lambda: Derived([layouts.awq_slot_scales(named["scales"]).contiguous()]))


def dequant_base(site, derived: Optional[Derived]):
    """`(h, base, tensors) -> y`: the site's plain-torch base, reading `derived`'s tensors if any."""
    if derived is None:
        return lambda h, base, tensors: site.torch_base(h, base)
    return lambda h, base, tensors: site.info.matcher.torch_forward(site.info, h, base, *tensors)


def repacked_bytes(sites=None) -> int:
    """Bytes held by repacked weights (for memory accounting): all of them, or those covering `sites`."""
    ids = None if sites is None else {s.id for s in sites}
    return sum(p.nbytes() for (_, key), (_, p) in _CACHE.items() if ids is None or ids & set(key))


# ---- the int4 kernels, with an autograd formula for graphs that need dx ---------------------------------


def _dequant_packed(packed: Packed, weight, sz) -> torch.Tensor:
    """(K, N) float32 from the repacked codes (CPU layout; the backward of the CPU kernel)."""
    codes = unpack_int4pack_cpu_kn(weight, packed.out_features, packed.in_features, int4pack_block_n())  # (K, N)
    g = torch.arange(packed.in_features, device=weight.device) // packed.group_size
    return (codes - 8).float() * sz[g, :, 0].float() + sz[g, :, 1].float()


@torch.library.custom_op("qpass::int4pack_mm_cpu", mutates_args=())
def int4pack_mm_cpu(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, scales_and_zeros)


@int4pack_mm_cpu.register_fake
def _(x, weight, scales_and_zeros, group_size):
    return x.new_empty((x.shape[0], scales_and_zeros.shape[1]))


def _int4_setup(ctx, inputs, output):
    x, weight, sz, group_size = inputs
    ctx.save_for_backward(weight, sz)
    ctx.group_size, ctx.k = group_size, x.shape[1]


def _int4_backward(ctx, grad):
    weight, sz = ctx.saved_tensors
    fake = Packed("cpu", weight, sz, None, ctx.group_size, ctx.k, (sz.shape[1],))
    w = _dequant_packed(fake, weight, sz)  # (K, N)
    return (grad.float() @ w.t()).to(grad.dtype), None, None, None


int4pack_mm_cpu.register_autograd(_int4_backward, setup_context=_int4_setup)


def _int4_matmul(packed: Packed, h: torch.Tensor, needs_grad: bool, tensors: list) -> torch.Tensor:
    weight, sz, *perm = tensors
    x = h.reshape(-1, packed.in_features)
    if perm:
        x = x.index_select(-1, perm[0])
    x = x.to(torch.bfloat16).contiguous()
    if packed.device == "cuda":
        y = torch.ops.aten._weight_int4pack_mm(x, weight, packed.group_size, sz)
    elif needs_grad:
        y = torch.ops.qpass.int4pack_mm_cpu(x, weight, sz, packed.group_size)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, packed.group_size, sz)
    return y.reshape(*h.shape[:-1], packed.out_features)


def _add_bias(site, y, base):
    named = dict(zip(site.info.buffers, base))
    bias = named.get("bias")
    return y if bias is None else y + bias.to(y.dtype)


# ---- choosing ------------------------------------------------------------------------------------------


def _tokens(x) -> Optional[int]:
    n = 1
    for d in x.shape[:-1]:
        if not isinstance(d, int):
            return None  # symbolic: not known to be a decode step
        n *= d
    return n


def choose(site, x, needs_grad: bool, requested: str = "auto") -> str:
    """The lowering for `site` given its input (a fake tensor from the graph) and whether the graph needs
    gradients. An explicit request other than "auto" is honoured where it can run, else torch-dequant."""
    if requested not in LOWERINGS:
        raise ValueError(f"unknown base lowering {requested!r}; one of {LOWERINGS}")
    if requested == "torch-dequant" or x is None:
        return "torch-dequant"
    kind = x.device.type
    if requested in CPP_LOWERINGS:
        layout = _cpp_layout(site) if kind == "cpu" else None
        ok = _gemv_reads(site, layout) or (layout is not None and requested == "dequant-cpu")
        return requested if ok else "torch-dequant"
    if requested != "auto":
        want = requested.rsplit("-", 1)[-1]
        return requested if want == kind and _codes_ok(site) else "torch-dequant"
    tokens = _tokens(x)
    decode = tokens is not None and tokens <= DECODE_MAX_TOKENS and not needs_grad
    layout = _cpp_layout(site) if kind == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16) else None
    if _gemv_reads(site, layout):
        return "gemv-cpu" if decode else "dequant-cpu"
    if layout is not None and (not decode or x.dtype != torch.bfloat16):  # bf16 decode: aten's int4 kernel below
        return "dequant-cpu"
    # Weights held in the CPU kernel's layout without qpass's kernels (TorchAtenLinear; base_layout="int4pack"
    # when the C++ kernels cannot be built) take the kernel at every token count: at 128 tokens it matches
    # inductor's dequant + GEMM, and inductor's dequantize of this layout costs 1.5-3x more than of GPTQ's.
    held = kind == "cpu" and _holds_kernel_layout(site)
    if (kind in ("cpu", "cuda") and x.dtype == torch.bfloat16 and not needs_grad
            and (held or (tokens is not None and tokens <= DECODE_MAX_TOKENS)) and _codes_ok(site)):
        return f"int4pack-{kind}"
    return "torch-dequant"


def fallback_reason(site, x, needs_grad: bool, chosen: str) -> Optional[str]:
    """Why a decode-shaped bf16 site that would take the int4 kernel got torch-dequant instead (for the report)."""
    if chosen != "torch-dequant" or x is None or needs_grad or x.dtype != torch.bfloat16:
        return None
    tokens = _tokens(x)
    if tokens is None or tokens > DECODE_MAX_TOKENS or x.device.type not in ("cpu", "cuda") or _codes_ok(site):
        return None
    info = site.info
    return (f"int4 kernel fallback: needs 4-bit GPTQ/AWQ packing, group in {_GROUPS}; "
            f"this layer is {info.bits}-bit, group {info.group_size}, {info.cls_name}")


def _codes_ok(site) -> bool:
    info = site.info
    if info.bits != 4 or info.group_size not in _GROUPS or info.in_features % info.group_size:
        return False
    if info.matcher is layouts.awq:
        return True
    if info.matcher is layouts.int4pack_resident:  # qpass.resident: made for the kernel
        return True
    if info.matcher is layouts.int4pack_cpu:  # held in the kernel's own layout: usable as is with bf16 scales
        sz = getattr(site.module, "scales_and_zeros", None)
        return sz is not None and sz.dtype == torch.bfloat16
    return _gptq_packing(info)


def _gptq_packing(info) -> bool:
    """The site holds gptqmodel's GPTQ packing (qweight/qzeros/scales/g_idx), not a repacked layout."""
    return getattr(info.matcher, "__name__", "").endswith("quant.gptqmodel") and "g_idx" in info.buffers


def _cpp_layout(site) -> Optional[str]:
    """Which layout of qpass's C++ kernels the site holds, if any (and the kernels are built here):
    "gptq4" — gptqmodel's 4-bit GPTQ packing, groups in order, N a multiple of 16 (gemv-cpu, dequant-cpu);
    "awq4" — 4-bit AWQ packing, N a multiple of 16 (dequant-cpu; gemv-cpu too with the group a multiple of 8);
    "int4pack" — qpass.resident's int4pack layout (dequant-cpu)."""
    info = site.info
    if info.matcher is layouts.awq:
        named = dict(zip(info.buffers, site.base_tensors()))
        ok = (info.bits == 4 and info.out_features % 16 == 0 and info.in_features % info.group == 0
              and named["qweight"].device.type == "cpu" and named["scales"].dtype in _CPP_SCALES)
        return "awq4" if ok and kernels.available() else None
    if info.matcher is layouts.int4pack_resident:
        named = dict(zip(info.buffers, site.base_tensors()))
        ok = named["qweight"].device.type == "cpu" and named["scales"].dtype in _CPP_SCALES
        return "int4pack" if ok and kernels.available() else None
    return "gptq4" if _gptq4_ok(site) else None


_CPP_SCALES = (torch.float16, torch.bfloat16, torch.float32)


def _gemv_reads(site, layout: Optional[str]) -> bool:
    """Whether gemv-cpu reads this site's weights: GPTQ, or AWQ with the group a multiple of 8."""
    return layout == "gptq4" or (layout == "awq4" and site.info.group % 8 == 0)


def _gptq4_ok(site) -> bool:
    info = site.info
    group = info.group
    if info.bits != 4 or not _gptq_packing(info) or group % 8 or info.in_features % group or info.out_features % 16:
        return False
    named = dict(zip(info.buffers, site.base_tensors()))
    g_idx = named["g_idx"]
    if g_idx.device.type != "cpu" or named["scales"].dtype not in _CPP_SCALES:
        return False
    canonical = torch.arange(info.in_features, device=g_idx.device) // group
    return torch.equal(g_idx.long(), canonical) and kernels.available()


def label(lowering: str) -> str:
    return {"int4pack-cpu": "int4pack-cpu bf16", "int4pack-cuda": "int4pack-cuda bf16",
            "gemv-cpu": "gemv-cpu (library layout, no copy)",
            "dequant-cpu": "dequant-cpu (C++ unpack + GEMM, no copy)"}.get(lowering, lowering)


# ---- lowered functions ---------------------------------------------------------------------------------


def _cpp(sites, x, bases, lowering, extras=None, pool=None) -> list:
    """The base outputs of `sites` (siblings reading `x`) from qpass's C++ kernel `lowering` (gemv-cpu or
    dequant-cpu) on their own buffers: one call for siblings with the same group size (their output columns
    concatenated), else one call per site (also for act-order sites in the int4pack layout: each has its own
    input permutation). `extras`, per site: (e, w), e (..., r) and w (r, N) in x's dtype, whose product
    dequant-cpu adds inside the base GEMM; or (A, B, scaling) of a float32 or bfloat16 LoRA, whose
    scaling * (x A^T) B^T the kernel adds (gemv-cpu: GEMV_LORA; dequant-cpu: the `_mm_lora` ops, FOLD_UP). `pool`
    (gemv-cpu): (data, scalings, entries), the same LoRA read from the model's adapter pool (qpass.pool)."""
    named = [dict(zip(s.info.buffers, b)) for s, b in zip(sites, bases)]
    groups = {s.info.group for s in sites}
    if len(sites) > 1 and (len(groups) > 1 or any("ret_idx" in n for n in named)):
        return [_cpp([s], x, [b], lowering, None if extras is None else [extras[i]],
                     None if pool is None else (pool[0], pool[1], [pool[2][i]]))[0]
                for i, (s, b) in enumerate(zip(sites, bases))]
    h = x.reshape(-1, sites[0].info.in_features)
    more, lora = (), extras is not None and len(extras[0]) == 3  # (A, B, scaling) per site: LoRA in the call
    if extras is not None:
        if lora:
            more = tuple(list(part) for part in zip(*extras))
        else:
            more = ([e.reshape(h.shape[0], -1) for e, _ in extras], [w for _, w in extras])
    awq = sites[0].info.matcher is layouts.awq
    if lowering == "gemv-cpu" and pool is not None:
        data, scalings, entries = pool
        y = kernels.gemv_pooled(awq, h, [n["qweight"] for n in named], [n["qzeros"] for n in named],
                                [n["scales"] for n in named], groups.pop(), data, scalings,
                                [i for e in entries for i in e.ints()])
    elif lowering == "gemv-cpu":
        op = kernels.awq4_gemv if awq else kernels.gptq4_gemv
        y = op(h, [n["qweight"] for n in named], [n["qzeros"] for n in named], [n["scales"] for n in named],
               groups.pop(), *more)
    elif sites[0].info.matcher is layouts.int4pack_resident:
        if "ret_idx" in named[0]:  # act-order: the codes' rows are in the permuted input order
            h = h.index_select(-1, named[0]["ret_idx"].long())
        y = (kernels.int4pack_mm_lora if lora else kernels.int4pack_mm)(
            h, [n["qweight"] for n in named], [n["scales"] for n in named], [n["qpass_zero_codes"] for n in named],
            groups.pop(), int4pack_block_n(), *more)
    elif lora:
        op = kernels.awq4_mm_lora if awq else kernels.gptq4_mm_lora
        y = op(h, [n["qweight"] for n in named], [n["qzeros"] for n in named], [n["scales"] for n in named],
               groups.pop(), *more)
    else:
        op = kernels.awq4_mm if awq else kernels.gptq4_mm
        y = op(h, [n["qweight"] for n in named], [n["qzeros"] for n in named], [n["scales"] for n in named],
               groups.pop(), *more)
    y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
    outs = y.split([s.info.out_features for s in sites], -1) if len(sites) > 1 else [y]
    return [_add_bias(s, o, b) for s, o, b in zip(sites, outs, bases)]


def _kernel_base(site, lowering, needs_grad):
    if lowering in CPP_LOWERINGS:
        return (lambda h, base, kernel: _cpp([site], h, [base], lowering)[0]), None
    packed = packed_for([site], lowering.rsplit("-", 1)[-1])

    def base_fn(h, base, kernel):
        if packed is None:
            return site.torch_base(h, base)
        return _add_bias(site, _int4_matmul(packed, h, needs_grad, kernel), base)

    return base_fn, packed


def lowered_site(site, names: tuple, lowering: str, needs_grad: bool = False):
    """One site: the spec's math around the chosen base. The returned function takes a fifth argument, the
    repacked tensors listed in `fn.qpass_constants` (the rewrite passes them as graph tensors)."""
    if lowering == "torch-dequant":
        derived = derived_for(site)
        if derived is None:
            return site.plain_lowered(names)
        kernel_fn, packed = dequant_base(site, derived), derived
    else:
        kernel_fn, packed = _kernel_base(site, lowering, needs_grad)

    def fn(x, xa, base, adapter, kernel=()):
        return site.run(x, list(xa), list(base), list(adapter), names, lambda h, b: kernel_fn(h, b, list(kernel)))

    fn.__name__ = fn.__qualname__ = "qpass_site_" + site.path.replace(".", "_")
    fn.qpass_constants = packed.tensors() if packed is not None else []
    return fn


# ---- sibling fusion: sites that read the same input -----------------------------------------------------

FUSABLE_SPECS = ("lora",)


def fusable(site, names: tuple) -> bool:
    """One active output-attached LoRA slot (no input adapter): its down-projection can join its siblings'."""
    if len(names) != 1 or names[0] not in site.slots:
        return False
    slot = site.slots[names[0]]
    return slot.spec.name in FUSABLE_SPECS and slot.spec.attach == "output"


def adapter_linear(x: torch.Tensor, weight: torch.Tensor, bias=None, *, reduce: bool = False) -> torch.Tensor:
    """F.linear for an adapter's small matmul. With `reduce` (one row, no gradient: a decode step) it is
    written as a multiply + sum in float32 instead, which inductor fuses with its neighbours into one
    loop instead of calling a GEMM library per projection (45 `mm` calls of ~30 us each per decode step of
    the benchmark model); float32 accumulation as in the GEMM, one rounding at the end."""
    if not reduce:
        return F.linear(x, weight, bias)
    y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.promote_types(x.dtype, weight.dtype))


REDUCE_MAX_ROWS = 1  # adapter matmuls with at most this many rows (static) use the multiply + sum form

# dequant-cpu graphs that need no gradient (prefill) compute LoRA's up-projection inside the base GEMM: the
# GEMM's input is [x | t] (t = the down-projection's output) and each unpacked weight chunk gets the scaled
# B^T's columns as r more rows, so y = x W + t (s B)^T comes out of one float32 accumulation with one
# rounding, instead of a small GEMM per site (16 x N, poorly used) plus a scale and an add pass over y.
# The up-projection's operands t and s B are rounded to the activation dtype for it (bf16 here; PEFT keeps
# them in the adapter's float32): within the bf16 logit tolerance of PEFT (tests/test_kernels.py). Training
# keeps PEFT's arithmetic (the adapter gradients stay in float32). With float32 or bfloat16 adapters the whole
# LoRA goes into the kernel call (`{layout}_mm_lora`: it computes t = x A^T and s B itself, same roundings),
# except for act-order weights in the int4pack layout, whose x is permuted for the codes but not for A.
# False: always the separate form.
FOLD_UP = True

# gemv-cpu graphs that need no gradient (decode steps) hand each site's LoRA (A, B, scaling) to the kernel: it
# computes t = x A^T for all siblings, then adds scaling * t B^T to each column block's float32 accumulator
# before its one store, so the whole site is one pass over its weights instead of a kernel call plus a few
# small fused loops per sibling group. The adapter arithmetic is float32 as PEFT's for float32 adapters; the
# sum with the base is rounded once to the activation dtype (PEFT rounds the base output first: at most one
# ulp of the output apart). bfloat16 adapters (prepare(adapter_dtype=torch.bfloat16)) are read as they are
# (half the bytes per decode step) and multiplied in float32: PEFT instead rounds t and the delta to
# bfloat16, so this is the more exact of the two. False: the separate form.
GEMV_LORA = True
GEMV_LORA_DTYPES = (torch.float32, torch.bfloat16)


def lowered_bases(sites: list, lowering: str):
    """Sibling sites with no active adapter (all disabled) on one of qpass's C++ lowerings: their bases in
    one kernel call (columns concatenated), as for fused LoRA siblings. Same signature as `lowered_group`."""

    def fn(x, xa, bases, adapters, kernel=()):
        return tuple(_cpp(sites, x, bases, lowering))

    fn.__name__ = fn.__qualname__ = "qpass_bases_" + "_".join(s.path.rsplit(".", 1)[-1] for s in sites)
    fn.qpass_constants = []
    return fn


def _downs(xa, ps, ranks, reduce):
    """Each LoRA site's down-projection xa @ A^T: per site in the multiply + sum form (`reduce`, which fuses per
    site; concatenating would copy every A) or alone, else one GEMM for every sibling."""
    if reduce or len(ps) == 1:
        return [adapter_linear(xa, p["lora_A.weight"], reduce=reduce) for p in ps]
    return adapter_linear(xa, torch.cat([p["lora_A.weight"] for p in ps], 0)).split(ranks, -1)


def pool_lowering(lowering: str, needs_grad: bool) -> bool:
    """Whether a sibling group on `lowering` reads its LoRA from the model's adapter pool as it is (the gemv
    kernel takes offsets into it); other lowerings take views of it (`rewrite`)."""
    return GEMV_LORA and lowering == "gemv-cpu" and not needs_grad


def lowered_group(sites: list, names: tuple, lowering: str, needs_grad: bool = False, pooled: bool = False):
    """Sibling sites with the same input: one down-projection matmul x @ [A_1; A_2; ...]^T for all of them,
    and (int4 lowerings) one base kernel call on their weights concatenated along N. Returns a function
    `(x, xa, bases, adapters) -> tuple of outputs`, xa the shared adapter input. A group of one site is
    the same math for a single LoRA site (so every LoRA site gets the decode-step form of `adapter_linear`).
    `pooled` (only where `pool_lowering`): each site's adapters are the model's adapter pool [data, scalings]."""
    slots = [s.slots[names[0]] for s in sites]
    ranks = [slot.get("lora_A.weight").shape[0] for slot in slots]
    pols = [s.policy(slot) for s, slot in zip(sites, slots)]
    packed, singles = None, None
    derived = [derived_for(s) if lowering == "torch-dequant" else None for s in sites]
    if lowering not in ("torch-dequant",) + CPP_LOWERINGS:
        kind = lowering.rsplit("-", 1)[-1]
        packed = packed_for(sites, kind)
        if packed is None:  # e.g. act-order siblings with different permutations: one kernel call per site
            singles = [packed_for([s], kind) for s in sites]
            if any(p is None for p in singles):
                singles = None
    counts = [len(p.tensors()) for p in singles] if singles else []
    dcounts = [len(d.tensors()) if d is not None else 0 for d in derived]
    # dequant-cpu without gradients: each site's up-projection rides in its base GEMM (see FOLD_UP)
    fold = FOLD_UP and lowering == "dequant-cpu" and not needs_grad and not any(
        "lora_B.bias" in slot.tensor_names for slot in slots)

    # ... with the down-projection in the same kernel call too (not for act-order weights in the int4pack layout,
    # whose kernel reads x permuted into the codes' row order while A reads it in the model's)
    fold_lora = fold and not any("ret_idx" in s.info.buffers for s in sites)
    gemv_lora = pool_lowering(lowering, needs_grad) and not any("lora_B.bias" in slot.tensor_names for slot in slots)

    if pooled and not pool_lowering(lowering, needs_grad):
        raise ValueError(f"qpass: a pooled sibling group cannot take the {lowering} lowering")
    entries = [slot.pool_entry for slot in slots] if pooled else None

    def fn(x, xa, bases, adapters, kernel=()):
        if pooled:  # the gemv kernel reads A, B and scaling at their offsets in the pool
            data, scalings = adapters[0]
            return tuple(_cpp(sites, x, bases, lowering, pool=(data, scalings, entries)))
        kernel = list(kernel)
        ps = [dict(zip(slot.tensor_names, a)) for slot, a in zip(slots, adapters)]
        if gemv_lora and all(p["lora_A.weight"].dtype == p["lora_B.weight"].dtype in GEMV_LORA_DTYPES for p in ps):
            return tuple(_cpp(sites, x, bases, lowering, [
                (p["lora_A.weight"], p["lora_B.weight"], p["scaling"].float()) for p in ps]))
        if fold_lora and all(p["lora_A.weight"].dtype == p["lora_B.weight"].dtype in GEMV_LORA_DTYPES for p in ps):
            # the whole LoRA in the kernel call (`{layout}_mm_lora`: t = x A^T, scaling * B, the fold)
            return tuple(_cpp(sites, x, bases, lowering, [
                (p["lora_A.weight"], p["lora_B.weight"], p["scaling"].float()) for p in ps]))
        if fold:
            downs = _downs(xa, ps, ranks, reduce=False)
            # (s B)^T written contiguous by the graph's own kernel (the GEMM copies its rows chunk by chunk)
            ups = [(t.to(x.dtype), (p["lora_B.weight"] * p["scaling"]).to(x.dtype).t().contiguous())
                   for t, p in zip(downs, ps)]
            return tuple(_cpp(sites, x, bases, lowering, ups))
        if lowering in CPP_LOWERINGS:
            ys = _cpp(sites, x, bases, lowering)
        elif packed is not None:
            y_all = _int4_matmul(packed, x, needs_grad, kernel)
            ys = [_add_bias(s, y, b) for s, y, b in zip(sites, y_all.split(packed.splits, -1), bases)]
        elif singles is not None:
            ys, at = [], 0
            for s, p, n, b in zip(sites, singles, counts, bases):
                ys.append(_add_bias(s, _int4_matmul(p, x, needs_grad, kernel[at : at + n]), b))
                at += n
        else:  # plain torch, with each site's derived tensors if it has any
            ys, at = [], 0
            for s, d, n, b in zip(sites, derived, dcounts, bases):
                ys.append(dequant_base(s, d)(x, list(b), kernel[at : at + n]))
                at += n
        rows = _tokens(xa)
        reduce = not needs_grad and rows is not None and rows <= REDUCE_MAX_ROWS
        downs = _downs(xa, ps, ranks, reduce)
        outs = []
        for y, t, p, pol in zip(ys, downs, ps, pols):
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            delta = adapter_linear(t, p["lora_B.weight"], p.get("lora_B.bias"), reduce=reduce) * p["scaling"]
            outs.append(policy.add_output(pol, y, delta))
        return tuple(outs)

    fn.__name__ = fn.__qualname__ = (
        "qpass_siblings_" + "_".join(s.path.rsplit(".", 1)[-1] for s in sites) if len(sites) > 1
        else "qpass_site_" + sites[0].path.replace(".", "_"))
    fn.qpass_constants = (packed.tensors() if packed is not None else
                          [t for p in singles or [] for t in p.tensors()] +
                          [t for d in derived if d is not None for t in d.tensors()])
    return fn, packed is not None or singles is not None or lowering in CPP_LOWERINGS
