"""int4pack-cpu / int4pack-cuda: aten's int4 kernels (`_weight_int4pack_mm_for_cpu`, CUDA's tinygemm
`_weight_int4pack_mm`) with bf16 activations, on weights repacked ONCE into the kernel's layout (cached per
site or sibling group: `packed_for`), or read as they are where the module already holds that layout
(`Layout.holds_int4pack`). Act-order GPTQ runs by permuting the input.

The kernels have no autograd formula; a graph that needs gradients gets `qpass::int4pack_mm_cpu`, whose
backward is dx = dy @ W^T with W dequantized from the repacked codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..quant.layout import named
from ..quant.packing import int4pack_block_n, unpack_int4pack_cpu_kn
from .common import DECODE_MAX_TOKENS, Base, add_bias, cached, tokens
from .torch_dequant import TorchDequantBase

GROUPS = (32, 64, 128, 256)  # group sizes aten's int4 kernels take


def _shape_ok(info) -> bool:
    return info.bits == 4 and info.group_size in GROUPS and info.in_features % info.group_size == 0


def codes_ok(site) -> bool:
    """aten's int4 kernel can compute this site (after a repack, or from the layout it holds)."""
    info = site.info
    return _shape_ok(info) and info.layout.int4_ok(info, named(info, site.base_tensors()))


def codes_scales_zeros(site, base: list):
    """(codes (K, N) int32, scales (G, N), zero codes (G, N), perm or None) from a site's own buffers, or None
    if its layout is not a 4-bit grouped one the int4 kernels can take."""
    info = site.info
    return info.layout.int4_codes(info, named(info, base)) if _shape_ok(info) else None


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


def pack(sites, kind: str, parts: Optional[list] = None) -> Optional[Packed]:
    """Repack `sites` (concatenated along N) for the int4 kernel; `parts`: their `codes_scales_zeros`, if the
    caller already has them."""
    if parts is None:
        parts = [codes_scales_zeros(site, site.base_tensors()) for site in sites]
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
    """A site whose module already holds the CPU int4pack layout: its own buffers, no copy."""
    info = site.info
    own = named(info, site.base_tensors())
    perm = own.get("ret_idx")
    return Packed("cpu", own["qweight"], own["scales_and_zeros"], None if perm is None else perm.long(),
                  info.group_size, info.in_features, (info.out_features,))


def packed_for(sites, kind: str) -> Optional[Packed]:
    """The repacked weights of `sites` (one site, or siblings fused along N), made once and cached; re-made if a
    base buffer was replaced or changed in place. Sites already holding the int4pack layout use their own
    buffers; siblings among them are not concatenated (that would be a copy): each runs its own kernel call."""
    if any(s.info.layout.holds_int4pack for s in sites):
        return _held(sites[0]) if len(sites) == 1 and kind == "cpu" else None
    return cached(kind, sites, lambda: pack(sites, kind))


# ---- the kernels, with an autograd formula for graphs that need dx --------------------------------------


@torch.library.custom_op("qpass::int4pack_mm_cpu", mutates_args=())
def int4pack_mm_cpu(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, scales_and_zeros)


@int4pack_mm_cpu.register_fake
def _(x, weight, scales_and_zeros, group_size):
    return x.new_empty((x.shape[0], scales_and_zeros.shape[1]))


def _setup(ctx, inputs, output):
    x, weight, sz, group_size = inputs
    ctx.save_for_backward(weight, sz)
    ctx.group_size, ctx.k = group_size, x.shape[1]


def _backward(ctx, grad):
    weight, sz = ctx.saved_tensors
    n, k = sz.shape[1], ctx.k
    codes = unpack_int4pack_cpu_kn(weight, n, k, int4pack_block_n())  # (K, N)
    g = torch.arange(k, device=weight.device) // ctx.group_size
    w = (codes - 8).float() * sz[g, :, 0].float() + sz[g, :, 1].float()
    return (grad.float() @ w.t()).to(grad.dtype), None, None, None


int4pack_mm_cpu.register_autograd(_backward, setup_context=_setup)


def matmul(packed: Packed, h: torch.Tensor, needs_grad: bool, tensors: list) -> torch.Tensor:
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


class Int4packBase(Base):
    """Sibling bases in one kernel call on their weights concatenated along N, or one call per site where
    they cannot share one repacked copy (act-order siblings with different permutations, held layouts)."""

    fused = True

    def __init__(self, sites, lowering: str, packs: list, needs_grad: bool):
        self.sites, self.lowering, self.packs, self.needs_grad = sites, lowering, packs, needs_grad
        self.counts = [len(p.tensors()) for p in packs]
        self.constants = [t for p in packs for t in p.tensors()]

    def __call__(self, x, bases, kernel):
        if len(self.packs) == 1 and len(self.sites) > 1:
            y = matmul(self.packs[0], x, self.needs_grad, list(kernel))
            return [add_bias(s, part, b) for s, part, b in zip(self.sites, y.split(self.packs[0].splits, -1), bases)]
        ys, at = [], 0
        for site, packed, n, base in zip(self.sites, self.packs, self.counts, bases):
            ys.append(add_bias(site, matmul(packed, x, self.needs_grad, list(kernel[at : at + n])), base))
            at += n
        return ys


class Int4pack:
    shares_bare_call = False

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"int4pack-{kind}"
        self.label = f"int4pack-{kind} bf16"

    def accepts(self, site, x, needs_grad) -> bool:
        return x.device.type == self.kind and codes_ok(site)

    def applies(self, site, x, needs_grad) -> bool:
        """bf16 and no gradient; a decode step, or any token count for weights already held in the kernel's
        layout (at 128 tokens the kernel matches inductor's dequant + GEMM there, and inductor's dequantize of
        that layout costs more than of GPTQ's)."""
        if x.device.type != self.kind or x.dtype != torch.bfloat16 or needs_grad:
            return False
        n = tokens(x)
        held = self.kind == "cpu" and site.info.layout.holds_int4pack
        return (held or (n is not None and n <= DECODE_MAX_TOKENS)) and codes_ok(site)

    def base(self, sites, needs_grad, switches) -> Base:
        packed = packed_for(sites, self.kind)
        if packed is not None:
            return Int4packBase(sites, self.name, [packed], needs_grad)
        singles = [packed_for([s], self.kind) for s in sites]
        if all(p is not None for p in singles):
            return Int4packBase(sites, self.name, singles, needs_grad)
        return TorchDequantBase(sites, derive=False)


def fallback_reason(site, x, needs_grad: bool, chosen: str) -> Optional[str]:
    """Why a decode-shaped bf16 site that would take the int4 kernel got torch-dequant instead (for the report)."""
    if chosen != "torch-dequant" or x is None or needs_grad or x.dtype != torch.bfloat16:
        return None
    n = tokens(x)
    if n is None or n > DECODE_MAX_TOKENS or x.device.type not in ("cpu", "cuda") or codes_ok(site):
        return None
    info = site.info
    return (f"int4 kernel fallback: needs 4-bit GPTQ/AWQ packing, group in {GROUPS}; "
            f"this layer is {info.bits}-bit, group {info.group_size}, {info.cls_name}")
