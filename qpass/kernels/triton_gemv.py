"""qpass_triton::int4_gemv — a Triton decode matmul (a few rows of x) on 4-bit weights as the library holds them.

    y[m, n] = sum_k x[m, k] s[g(k), n] (q[k, n] - z[g(k), n])  + scaling (x A^T)[m, :] . B[n, :]  + bias[n]

read in place, no repacked copy (the CUDA counterpart of gemv.cpp's `{gptq4,awq4}_gemv`; q, z, s and g(k) as
triton_int4.py reads them, shared with the prefill/training matmul triton_mm.py).

Arithmetic (float32 accumulation, one rounding to x's dtype at the end, as gemv.cpp):
  * groups in order and the K block inside one group: d = x @ q on the tensor cores, whose operands (x, and
    the codes: integers 0..15) are exact, and the group's offset comes off once: s (d - z sum_k x) in float32
    — the weight s (q - z) is never rounded (gptqmodel rounds it to the scales' dtype, README Limits).
  * otherwise (act-order, or a group not whole in the K block): w = s (q - z) per element in float32, rounded
    to x's dtype for the tensor-core product, as the library's own dequantize + matmul rounds it.
  * half-precision x: the dots take float32 operands in tf32, which holds every bfloat16/float16 value and
    code exactly, so each product is exact (a bfloat16 dot would be too, but Triton's interpreter multiplies
    bfloat16 operands as raw integers, and the tests run the kernels there). float32 x: IEEE products.
  LoRA: t = x A^T in IEEE float32 (A float32, bfloat16 or float16); scaling * t B^T and the bias are added to
  the float32 accumulator before the one store.

Grid: fixed by the shapes (CUDA-graph safe: no host sync, no data-dependent launch). Kernel 1 splits K into
`split` slices: programs (n block, slice) write float32 partial sums, and, with LoRA, programs (rank block,
slice) write partial t; kernel 2 adds the slices, the up-projection and the bias, and stores once. Sibling
sites (same x) run one after another into one output, their columns concatenated.

Importing this module imports triton; `TRITON_INTERPRET=1` (set before the import) runs the kernels on CPU
tensors (the tests do; nothing else may pass CPU tensors).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_int4 import ACT_DTYPES, SCALE_DTYPES  # noqa: F401 (public: the dtypes the op takes)
from .triton_int4 import block_k, check_sites, codes, launch_first_fitting, round_to, weights, zero_shift

BLOCK_M = 16  # rows of x per program (tl.dot's smallest M); decode steps have at most 16
BLOCK_N = 64  # output columns per program


@triton.jit
def _base_partial(x_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, part_ptr, M, K, N, kb0, kb1, pid_n, split, pid_m,
                  GROUP: tl.constexpr, AWQ: tl.constexpr, G_IDX: tl.constexpr, PER_BLOCK: tl.constexpr,
                  X_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shift = zero_shift(offs_n, AWQ)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        xf = x.to(tl.float32)
        if PER_BLOCK:  # one group for the whole K block: exact codes on the tensor cores, offset taken off once
            g = (kb * BLOCK_K) // GROUP
            z = (tl.load(qz_ptr + g * (N // 8) + offs_n // 8, mask=mask_n, other=0) >> shift) & 15
            s = tl.load(sc_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            q = codes(qw_ptr, offs_k, offs_n, mask_n, N, AWQ)
            d = tl.dot(xf, q.to(tl.float32), input_precision=PRECISION)
            acc += s[None, :] * (d - z.to(tl.float32)[None, :] * tl.sum(xf, axis=1)[:, None])
        else:  # each row its own group: the weight dequantized per element
            w = weights(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, mask_n, N, GROUP, AWQ, G_IDX)
            if not X_FP32:
                w = round_to(w, x.dtype).to(tl.float32)  # rounded to x's dtype, as the library's dequantize + matmul
            acc += tl.dot(xf, w, input_precision=PRECISION)
    out = part_ptr + split * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_partial(x_ptr, a_ptr, tpart_ptr, M, K, R, kb0, kb1, pid_r, split, pid_m,
                  BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Partial t = x A^T over this K slice, in IEEE float32."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kb in range(kb0, kb1):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None], other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=mask_r[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(x, a, input_precision="ieee")
    out = tpart_ptr + split * M * R + offs_m[:, None] * R + offs_r[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _partial_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, a_ptr, part_ptr, tpart_ptr, M, K, N, R, kb_per,
                    GROUP: tl.constexpr, AWQ: tl.constexpr, G_IDX: tl.constexpr, PER_BLOCK: tl.constexpr,
                    X_FP32: tl.constexpr, PRECISION: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Programs (column block | rank block, K slice, row block): the slice's float32 partial sums."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    kb0 = split * kb_per
    kb1 = tl.minimum(kb0 + kb_per, K // BLOCK_K)
    n_blocks = tl.cdiv(N, BLOCK_N)
    if pid < n_blocks:
        _base_partial(x_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, part_ptr, M, K, N, kb0, kb1, pid, split, pid_m,
                      GROUP, AWQ, G_IDX, PER_BLOCK, X_FP32, PRECISION, BLOCK_K, BLOCK_M, BLOCK_N)
    elif HAS_LORA:
        _down_partial(x_ptr, a_ptr, tpart_ptr, M, K, R, kb0, kb1, pid - n_blocks, split, pid_m,
                      BLOCK_K, BLOCK_M, BLOCK_R)


@triton.jit
def _epilogue_kernel(part_ptr, tpart_ptr, b_ptr, scaling_ptr, bias_ptr, out_ptr, M, N, R, SPLIT, out_stride,
                     HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """The slices' sums + scaling (t B^T) + bias, in float32, stored once in the output's dtype."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * M * N + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    if HAS_LORA:
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_t = (offs_m < M)[:, None] & (offs_r < R)[None, :]
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for s in range(0, SPLIT):
                t += tl.load(tpart_ptr + s * M * R + offs_m[:, None] * R + offs_r[None, :], mask=mask_t, other=0.0)
            b = tl.load(b_ptr + offs_n[None, :] * R + offs_r[:, None],
                        mask=(offs_r < R)[:, None] & (offs_n < N)[None, :], other=0.0).to(tl.float32)
            up += tl.dot(t, b, input_precision="ieee")
        acc += tl.load(scaling_ptr).to(tl.float32) * up
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * out_stride + offs_n[None, :]
    tl.store(out, round_to(acc, out_ptr.dtype.element_ty), mask=mask)


# ---- launch plan: a pure function of the shapes and the device -------------------------------------------


@dataclass(frozen=True)
class Plan:
    block_k: int
    per_block: bool  # the K block lies in one group (groups in order): the exact-code path
    split: int  # K slices
    kb_per: int  # K blocks per slice
    block_r: int
    stages: int = 3  # software pipeline depth (num_stages)


def plan(m: int, k: int, n: int, r: int, group: int, in_order: bool, programs: int, max_block_k: int = 128,
         stages: int = 3) -> Plan:
    """K block, slices and rank block for one site; `programs`: how many programs fill the device."""
    per_block = in_order and group % 16 == 0 and k % group == 0
    bk = block_k(k, group if per_block else None, tuple(b for b in (128, 64, 32, 16) if b <= max_block_k))
    blocks = k // bk
    split = max(1, min(blocks, triton.cdiv(programs, triton.cdiv(n, BLOCK_N) * triton.cdiv(m, BLOCK_M))))
    kb_per = triton.cdiv(blocks, split)
    block_r = max(16, min(64, triton.next_power_of_2(max(r, 1))))
    return Plan(bk, per_block, triton.cdiv(blocks, kb_per), kb_per, block_r, stages)


@functools.lru_cache(maxsize=None)
def plans(m: int, k: int, n: int, r: int, group: int, in_order: bool, programs: int) -> tuple:
    """The plan, then plans needing less shared memory, for GPUs whose blocks have less (launch_first_fitting):
    two pipeline stages, then K blocks of at most 64 and 32. float32 x at K blocks of 128 needs 112 KB; sm_86 /
    sm_89 blocks get 99 KB (scripts/triton_aot_check.py)."""
    first = plan(m, k, n, r, group, in_order, programs)
    out = [first, replace(first, stages=2)]
    for cap in (64, 32):
        if out[-1].block_k > cap:
            out.append(plan(m, k, n, r, group, in_order, programs, max_block_k=cap, stages=2))
    return tuple(out)  # cached: one lookup per launch


@functools.lru_cache(maxsize=None)
def _programs(device: torch.device) -> int:
    """Programs that fill the device: 2 per SM on a GPU; a few under the interpreter (tests: slices > 1)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _site(x, out, qweight, qzeros, scales, g_idx, bias, group, awq, lora) -> None:
    """One site's columns of `out` (a column slice of the op's output)."""
    m, k = x.shape
    n = scales.shape[1]
    r = lora[0].shape[0] if lora else 0
    candidates = plans(m, k, n, r, group, g_idx is None, _programs(x.device))
    # half-precision x: every dot operand is exact in tf32 (module docstring); float32 x: IEEE products
    fp32 = x.dtype == torch.float32
    flags = dict(GROUP=group, AWQ=awq, G_IDX=g_idx is not None, X_FP32=fp32, PRECISION="ieee" if fp32 else "tf32",
                 HAS_LORA=bool(lora))

    def launch(p: Plan) -> None:
        part = torch.empty((p.split, m, n), device=x.device, dtype=torch.float32)
        tpart = torch.empty((p.split, m, r), device=x.device, dtype=torch.float32) if lora else part
        grid = (triton.cdiv(n, BLOCK_N) + (triton.cdiv(r, p.block_r) if lora else 0), p.split,
                triton.cdiv(m, BLOCK_M))
        _partial_kernel[grid](
            x, qweight, qzeros, scales, g_idx if g_idx is not None else scales, lora[0] if lora else x, part, tpart,
            m, k, n, r, p.kb_per, PER_BLOCK=p.per_block, BLOCK_K=p.block_k, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_R=p.block_r, num_stages=p.stages, **flags)
        _epilogue_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M))](
            part, tpart, lora[1] if lora else part, lora[2] if lora else part, bias if bias is not None else part,
            out, m, n, r, p.split, out.stride(0), HAS_LORA=bool(lora), HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, BLOCK_R=p.block_r)

    key = ("gemv", x.device, x.dtype, scales.dtype, candidates[0], *flags.values())
    launch_first_fitting(key, candidates, launch)


# ---- the op: what graphs call (a fake kernel for tracing; no autograd formula: decode graphs only) ---------


def _check(x, qweight, qzeros, scales, g_idx, bias, groups, awq, lora_a, lora_b, scaling) -> None:
    op = "qpass_triton::int4_gemv"
    check_sites(op, x, qweight, qzeros, scales, g_idx, bias, groups, awq)
    if lora_a and not len(lora_a) == len(lora_b) == len(scaling) == len(scales):
        raise ValueError(f"{op}: one lora_a, lora_b and scaling per site, or none")
    k = x.shape[1]
    for i in range(len(scales) if lora_a else 0):
        n = scales[i].shape[1]
        if any(t.device != x.device for t in (lora_a[i], lora_b[i], scaling[i])):
            raise ValueError(f"{op}: site {i}: every tensor must be on {x.device}")
        if lora_a[i].shape[1] != k or lora_b[i].shape != (n, lora_a[i].shape[0]) or scaling[i].numel() != 1:
            raise ValueError(f"{op}: site {i}: A must be (r, {k}), B ({n}, r), the scaling one element")


@torch.library.custom_op("qpass_triton::int4_gemv", mutates_args=())
def int4_gemv(x: torch.Tensor, qweight: list[torch.Tensor], qzeros: list[torch.Tensor], scales: list[torch.Tensor],
              g_idx: list[Optional[torch.Tensor]], bias: list[Optional[torch.Tensor]], groups: list[int], awq: bool,
              lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scaling: list[torch.Tensor]) -> torch.Tensor:
    """(M, sum N_i) in x's dtype = x (M, K) @ [W_1 | W_2 | ...] (+ bias_i) for the 4-bit GPTQ (`awq` False) or AWQ
    sites i, each read from its own buffers; with lora_a/lora_b/scaling (per site: A (r_i, K), B (N_i, r_i), a
    one-element scaling) site i's columns also get scaling_i (x A_i^T) B_i^T. Accumulated in float32, rounded
    once. `g_idx[i]`: the site's g_idx where its groups are not in input order (act-order), else None."""
    _check(x, qweight, qzeros, scales, g_idx, bias, groups, awq, lora_a, lora_b, scaling)
    x = x.contiguous()
    out = x.new_empty((x.shape[0], sum(s.shape[1] for s in scales)))
    col = 0
    for i, s in enumerate(scales):
        n = s.shape[1]
        lora = (lora_a[i].contiguous(), lora_b[i].contiguous(), scaling[i]) if lora_a else ()
        _site(x, out[:, col : col + n], qweight[i], qzeros[i], s, g_idx[i], bias[i], groups[i], awq, lora)
        col += n
    return out


@int4_gemv.register_fake
def _(x, qweight, qzeros, scales, g_idx, bias, groups, awq, lora_a, lora_b, scaling):
    return x.new_empty((x.shape[0], sum(s.shape[1] for s in scales)))
