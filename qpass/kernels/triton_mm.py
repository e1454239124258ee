"""qpass_triton::int4_mm — a Triton matmul for prefill and training on 4-bit weights as the library holds them.

    y = x @ [W_1 | W_2 | ...]  (+ bias_i)  (+ t_i @ u_i),     W[k, n] = s[g(k), n] (q[k, n] - z[g(k), n])
    dx = dy @ W^T              (qpass_triton::int4_mm_dx, the op's autograd formula)

q, z, s and g(k) are read where the library keeps them (triton_int4.py: GPTQ in order or act-order through g_idx,
AWQ GEMM), each tile dequantized in the kernel's prologue: no dense weight is materialised, forward or backward.
Sibling sites (same x) write their column blocks of one output, one launch each.

Arithmetic: float32 accumulation, one rounding to x's dtype at the store.
  * forward, groups in order and the K block inside one group: d = x @ q, the codes (integers 0..15, exact in
    every dtype) the dot's second operand, the group's offset taken off once: s (d - z sum_k x). W is not rounded.
  * forward otherwise (act-order, a group not whole in the K block), and the backward always (there the scale
    varies along the reduced N): W = s (q - z) per element in float32, rounded to x's dtype for the dot (as the
    library's dequantize + matmul rounds it); float32 x: W exact, IEEE products.
  * half-precision dots take x's dtype on the GPU (exact products, float32 accumulation). Under Triton's
    interpreter, which multiplies bfloat16 operands as raw integers, bfloat16 dots take the same values as
    float32 operands: the same exact products.
  * `up` (the LoRA up-projection folded in; the lowering passes it in graphs without gradient): t (M, r) @ u (r, N)
    in x's dtype, added to the float32 accumulator before the rounding.
Autograd: dx from the second kernel; t and u get dy u^T and t^T dy (torch); the quantized buffers none (frozen).

Grid: one program per (row block, column block), in grouped order (programs in flight share x's row blocks);
fixed by the shapes, no host sync (CUDA-graph safe). Tile sizes are a plain function of the shapes, not tuned
on a GPU yet. Importing this module imports triton; `TRITON_INTERPRET=1` (set before the import) runs the
kernels on CPU tensors (the tests do; nothing else may pass CPU tensors).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_int4 import block_k, check_sites, codes, in_features, launch_first_fitting, round_to, weights, zero_shift

GROUP_M = tl.constexpr(8)  # row blocks per band of the grouped program order
BLOCK_R = tl.constexpr(16)  # rank chunk of the folded up-projection (tl.dot's smallest K)


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(row block, column block) of program `pid`, GROUP_M row blocks per band."""
    blocks_m = tl.cdiv(M, BLOCK_M)
    band = GROUP_M * tl.cdiv(N, BLOCK_N)
    first = (pid // band) * GROUP_M
    rows = tl.minimum(blocks_m - first, GROUP_M)
    return first + (pid % band) % rows, (pid % band) // rows


@triton.jit
def _operand(w, DT: tl.constexpr, DOT_F32: tl.constexpr):
    """A float32 weight tile as the dot's operand: rounded to DT (x's dtype), held as float32 where DOT_F32."""
    if DT == tl.float32:
        return w
    if DOT_F32:
        return round_to(w, DT).to(tl.float32)
    return w.to(DT)


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _mm_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, bias_ptr, t_ptr, u_ptr, out_ptr, M, K, N, R, out_stride,
               GROUP: tl.constexpr, AWQ: tl.constexpr, G_IDX: tl.constexpr, PER_BLOCK: tl.constexpr,
               DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_UP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        if PER_BLOCK:  # one group for the whole K block: exact codes in the dot, the offset taken off once
            g = k0 // GROUP
            z = (tl.load(qz_ptr + g * (N // 8) + offs_n // 8, mask=mask_n, other=0) >> zero_shift(offs_n, AWQ)) & 15
            s = tl.load(sc_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            q = codes(qw_ptr, offs_k, offs_n, mask_n, N, AWQ).to(tl.float32)
            d = _dot(x, _operand(q, dt, DOT_F32), DOT_F32)
            acc += s[None, :] * (d - z.to(tl.float32)[None, :] * tl.sum(x.to(tl.float32), axis=1)[:, None])
        else:  # each row its own group: the weight dequantized per element
            w = weights(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, mask_n, N, GROUP, AWQ, G_IDX)
            acc += _dot(x, _operand(w, dt, DOT_F32), DOT_F32)
    if HAS_UP:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            t = tl.load(t_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                        other=0.0)
            u = tl.load(u_ptr + offs_r[:, None] * N + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
                        other=0.0)
            acc += _dot(t, u, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * out_stride + offs_n[None, :]
    tl.store(out, round_to(acc, out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dx_kernel(dy_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, prev_ptr, out_ptr, M, K, N, dy_stride,
               GROUP: tl.constexpr, AWQ: tl.constexpr, G_IDX: tl.constexpr, DOT_F32: tl.constexpr,
               HAS_PREV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[m, k] = sum_n dy[m, n] W[k, n] for one site (+ the float32 sum of the previous sites)."""
    pid_m, pid_k = _tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # BLOCK_K divides K
    mask_m = offs_m < M
    dt = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * dy_stride + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                     other=0.0)
        w = weights(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, mask_n, N, GROUP, AWQ, G_IDX)
        acc += _dot(dy, tl.trans(_operand(w, dt, DOT_F32)), DOT_F32)
    at = offs_m[:, None] * K + offs_k[None, :]
    if HAS_PREV:
        acc += tl.load(prev_ptr + at, mask=mask_m[:, None], other=0.0)
    tl.store(out_ptr + at, round_to(acc, out_ptr.dtype.element_ty), mask=mask_m[:, None])


# ---- launch plan: a pure function of the shapes ----------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    per_block: bool  # the K block lies in one group (groups in order): the exact-code path
    warps: int
    stages: int = 3  # software pipeline depth (num_stages)


def tiles(m: int, k: int, n: int, group: int, in_order: bool) -> Tiles:
    """Forward tiles of one site: (M, N) output tiles, K blocks inside one group where groups are in order."""
    per_block = in_order and group % 16 == 0 and k % group == 0
    bm = _block_m(m)
    bn = 64 if n <= 64 else 128
    return Tiles(bm, bn, block_k(k, group if per_block else None, (64, 32, 16)), per_block, _warps(bm, bn))


@functools.lru_cache(maxsize=None)
def smaller(t: Tiles) -> tuple:
    """`t`, then tiles needing less shared memory, for GPUs whose blocks have less (launch_first_fitting): two
    pipeline stages, then half the K block (it still divides K and the group), then half the rows. float32 tiles
    at their largest need 160 KB; 99 KB is what sm_86 / sm_89 blocks get (scripts/triton_aot_check.py)."""
    out = [t, replace(t, stages=2)]
    if t.block_k >= 32:
        out.append(replace(out[-1], block_k=t.block_k // 2))
    if t.block_m >= 32:
        out.append(replace(out[-1], block_m=t.block_m // 2, warps=_warps(t.block_m // 2, t.block_n)))
    return tuple(out)  # cached: one lookup per launch


def _block_m(m: int) -> int:
    """Rows per program: 128 for long prompts; fewer for a few dozen rows, so that more programs share the work."""
    return 128 if m >= 256 else 64 if m >= 64 else 32 if m > 16 else 16


def _warps(bm: int, bn: int) -> int:
    return 8 if bm * bn >= 128 * 128 else 4


def _dot_f32(x) -> bool:
    """float32 operands for the dot: float32 x, or bfloat16 x under the interpreter (module docstring)."""
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type != "cuda")


def _forward(x, out, qweight, qzeros, scales, g_idx, bias, group, awq, up) -> None:
    """One site's columns of `out` (a column slice of the op's output)."""
    m, k = x.shape
    n = scales.shape[1]
    first = tiles(m, k, n, group, g_idx is None)
    t, u = up if up else (x, x)
    flags = dict(GROUP=group, AWQ=awq, G_IDX=g_idx is not None, DOT_F32=_dot_f32(x), HAS_BIAS=bias is not None,
                 HAS_UP=bool(up))

    def launch(p: Tiles) -> None:
        grid = (triton.cdiv(m, p.block_m) * triton.cdiv(n, p.block_n),)
        _mm_kernel[grid](x, qweight, qzeros, scales, g_idx if g_idx is not None else scales,
                         bias if bias is not None else scales, t, u, out, m, k, n, t.shape[1] if up else 0,
                         out.stride(0), PER_BLOCK=p.per_block, BLOCK_M=p.block_m, BLOCK_N=p.block_n,
                         BLOCK_K=p.block_k, num_warps=p.warps, num_stages=p.stages, **flags)

    key = ("mm", x.device, x.dtype, scales.dtype, first, *flags.values())
    launch_first_fitting(key, smaller(first), launch)


def _dx(dy, prev, out, qweight, qzeros, scales, g_idx, group, awq) -> None:
    """out = dy @ W^T (+ prev) for one site; dy is the site's column slice of the op's gradient."""
    m, n = dy.shape
    k = out.shape[1]
    bm, bk = _block_m(m), block_k(k, None, (64, 32, 16))
    first = Tiles(bm, 64, bk, False, _warps(bm, bk))  # block_n: the reduced N, in chunks of 64
    flags = dict(GROUP=group, AWQ=awq, G_IDX=g_idx is not None, DOT_F32=_dot_f32(dy), HAS_PREV=prev is not None)

    def launch(p: Tiles) -> None:
        grid = (triton.cdiv(m, p.block_m) * (k // p.block_k),)
        _dx_kernel[grid](dy, qweight, qzeros, scales, g_idx if g_idx is not None else scales,
                         prev if prev is not None else out, out, m, k, n, dy.stride(0), BLOCK_M=p.block_m,
                         BLOCK_N=p.block_n, BLOCK_K=p.block_k, num_warps=_warps(p.block_m, p.block_k),
                         num_stages=p.stages, **flags)

    key = ("dx", dy.device, dy.dtype, out.dtype, scales.dtype, first, *flags.values())
    launch_first_fitting(key, smaller(first), launch)


# ---- the ops: what graphs call (fake kernels for tracing; the forward's autograd formula) ---------------------


def _check_up(x, scales, up_t, up_w) -> None:
    op = "qpass_triton::int4_mm"
    if up_t and not len(up_t) == len(up_w) == len(scales):
        raise ValueError(f"{op}: one up_t and up_w per site, or none")
    for i in range(len(scales) if up_t else 0):
        t, u, n = up_t[i], up_w[i], scales[i].shape[1]
        if t.dim() != 2 or u.dim() != 2 or t.shape != (x.shape[0], u.shape[0]) or u.shape[1] != n:
            raise ValueError(f"{op}: site {i}: up_t {tuple(t.shape)} must be ({x.shape[0]}, r), up_w "
                             f"{tuple(u.shape)} (r, {n})")
        if t.dtype != x.dtype or u.dtype != x.dtype or t.device != x.device or u.device != x.device:
            raise ValueError(f"{op}: site {i}: up_t and up_w must be {x.dtype} on {x.device}")


@torch.library.custom_op("qpass_triton::int4_mm", mutates_args=())
def int4_mm(x: torch.Tensor, qweight: list[torch.Tensor], qzeros: list[torch.Tensor], scales: list[torch.Tensor],
            g_idx: list[Optional[torch.Tensor]], bias: list[Optional[torch.Tensor]], groups: list[int], awq: bool,
            up_t: list[torch.Tensor], up_w: list[torch.Tensor]) -> torch.Tensor:
    """(M, sum N_i) in x's dtype = x (M, K) @ [W_1 | W_2 | ...] (+ bias_i) for the 4-bit GPTQ (`awq` False) or AWQ
    sites i, each read from its own buffers; with up_t/up_w (per site: t (M, r_i), u (r_i, N_i), x's dtype) site
    i's columns also get t_i @ u_i. Accumulated in float32, rounded once. `g_idx[i]`: the site's g_idx where its
    groups are not in input order (act-order), else None."""
    check_sites("qpass_triton::int4_mm", x, qweight, qzeros, scales, g_idx, bias, groups, awq)
    _check_up(x, scales, up_t, up_w)
    x = x.contiguous()
    out = x.new_empty((x.shape[0], sum(s.shape[1] for s in scales)))
    col = 0
    for i, s in enumerate(scales if x.shape[0] else []):  # no rows: no launch (an empty grid)
        n = s.shape[1]
        up = (up_t[i].contiguous(), up_w[i].contiguous()) if up_t else ()
        _forward(x, out[:, col : col + n], qweight[i], qzeros[i], s, g_idx[i], bias[i], groups[i], awq, up)
        col += n
    return out


@int4_mm.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, groups, awq, up_t, up_w):
    return x.new_empty((x.shape[0], sum(s.shape[1] for s in scales)))


@torch.library.custom_op("qpass_triton::int4_mm_dx", mutates_args=())
def int4_mm_dx(dy: torch.Tensor, qweight: list[torch.Tensor], qzeros: list[torch.Tensor], scales: list[torch.Tensor],
               g_idx: list[Optional[torch.Tensor]], groups: list[int], awq: bool) -> torch.Tensor:
    """(M, K) in dy's dtype = dy (M, sum N_i) @ [W_1 | W_2 | ...]^T: the sites' sum accumulated in float32, rounded
    once."""
    op = "qpass_triton::int4_mm_dx"
    check_sites(op, dy, qweight, qzeros, scales, g_idx, [None] * len(scales), groups, awq, what="dy")
    m, k = dy.shape[0], in_features(qweight[0], awq)
    out = dy.new_empty((m, k))
    partial = dy.new_empty((m, k), dtype=torch.float32) if len(scales) > 1 else None
    prev, col = None, 0
    for i, s in enumerate(scales if m else []):
        n = s.shape[1]
        dst = out if i == len(scales) - 1 else partial  # a site's program reads and writes only its own tile
        _dx(dy[:, col : col + n], prev, dst, qweight[i], qzeros[i], s, g_idx[i], groups[i], awq)
        prev, col = partial, col + n
    return out


@int4_mm_dx.register_fake
def _(dy, qweight, qzeros, scales, g_idx, groups, awq):
    return dy.new_empty((dy.shape[0], in_features(qweight[0], awq)))


def _no_grad(v: list):
    """The no-gradient entry autograd expects for a list input, as torch.library flattens it: one per element of
    a list of tensors only (a list holding a None or an int is one leaf)."""
    return [None] * len(v) if all(isinstance(t, torch.Tensor) for t in v) else None


def _setup(ctx, inputs, output) -> None:
    x, qweight, qzeros, scales, g_idx, bias, groups, awq, up_t, up_w = inputs
    ctx.groups, ctx.awq, ctx.sites = list(groups), awq, len(scales)
    ctx.has_g_idx = [g is not None for g in g_idx]
    ctx.has_up = bool(up_t)
    ctx.no_grads = [_no_grad(v) for v in (qweight, qzeros, scales, g_idx, bias)]
    ctx.save_for_backward(*qweight, *qzeros, *scales, *[g for g in g_idx if g is not None], *up_t, *up_w)


def _backward(ctx, dy):
    n = ctx.sites
    saved = list(ctx.saved_tensors)
    qweight, qzeros, scales, rest = saved[:n], saved[n : 2 * n], saved[2 * n : 3 * n], saved[3 * n :]
    g_idx = [rest.pop(0) if has else None for has in ctx.has_g_idx]
    dy = dy.contiguous()
    dx = int4_mm_dx(dy, qweight, qzeros, scales, g_idx, ctx.groups, ctx.awq) if ctx.needs_input_grad[0] else None
    dt = du = []
    if ctx.has_up:
        t, u = rest[:n], rest[n:]
        dys = dy.split([s.shape[1] for s in scales], 1)
        dt = [g @ w.t() for g, w in zip(dys, u)]
        du = [a.t() @ g for a, g in zip(t, dys)]
    return (dx, *ctx.no_grads, None, None, dt, du)


int4_mm.register_autograd(_backward, setup_context=_setup)
