"""What qpass's Triton kernels (triton_gemv.py, triton_mm.py) share: the 4-bit codes, zero points and scales read
where the library keeps them, bfloat16 rounding, the K block, and the checks of a call's per-site buffers.

  GPTQ (gptqmodel):  q[k, n] = (qweight[k / 8, n] >> 4 (k % 8)) & 15             (8 rows per int32 word)
  AWQ (AutoAWQ GEMM): q[k, n] = (qweight[k, n / 8] >> 4 nib(n % 8)) & 15          (8 columns per word,
                     nib = (0, 4, 1, 5, 2, 6, 3, 7): column i of a word sits in nibble nib(i))
  z[g, n] = (qzeros[g, n / 8] >> 4 (n % 8)) & 15 (GPTQ, gptqmodel's in-memory "v2" zeros), >> 4 nib(n % 8) (AWQ)
  g(k) = k / group, or g_idx[k] (GPTQ act-order: each row's group read from g_idx).
  W[k, n] = s[g(k), n] (q[k, n] - z[g(k), n]): exact in float32 for fp16/bf16 scales (11 bits times 5).

Importing this module imports triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def codes(qw_ptr, offs_k, offs_n, mask_n, N, AWQ: tl.constexpr):
    """(BLOCK_K, BLOCK_N) int32 codes q[k, n]."""
    if AWQ:
        words = tl.load(qw_ptr + offs_k[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=mask_n[None, :], other=0)
        nib = (offs_n % 8) // 2 + 4 * (offs_n % 2)
        return (words >> (4 * nib)[None, :]) & 15
    words = tl.load(qw_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    return (words >> (4 * (offs_k % 8))[:, None]) & 15


@triton.jit
def zero_shift(offs_n, AWQ: tl.constexpr):
    if AWQ:
        return 4 * ((offs_n % 8) // 2 + 4 * (offs_n % 2))
    return 4 * (offs_n % 8)


@triton.jit
def weights(qw_ptr, qz_ptr, sc_ptr, gi_ptr, offs_k, offs_n, mask_n, N, GROUP: tl.constexpr, AWQ: tl.constexpr,
            G_IDX: tl.constexpr):
    """(BLOCK_K, BLOCK_N) float32 W[k, n] = s (q - z), each row's group its own (g_idx or k / GROUP). Masked
    columns are 0."""
    if G_IDX:
        g = tl.load(gi_ptr + offs_k).to(tl.int32)
    else:
        g = offs_k // GROUP
    q = codes(qw_ptr, offs_k, offs_n, mask_n, N, AWQ)
    zw = tl.load(qz_ptr + g[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=mask_n[None, :], other=0)
    s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
    return (q - ((zw >> zero_shift(offs_n, AWQ)[None, :]) & 15)).to(tl.float32) * s


@triton.jit
def round_to(v, DTYPE: tl.constexpr):
    """float32 -> DTYPE, to nearest even (as torch's `.to`). bfloat16 from the bits, so that the interpreter (whose
    float32 -> bfloat16 cast truncates) rounds as the GPU does."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = tl.where(v != v, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(DTYPE)


def block_k(k: int, group, sizes=(128, 64, 32, 16)) -> int:
    """The largest of `sizes` dividing K, and the group when one is given."""
    return next(b for b in sizes if k % b == 0 and (group is None or group % b == 0))


_FITTING: dict = {}  # launch key -> index of the first configuration that fitted the device


def launch_first_fitting(key, configs, launch) -> None:
    """`launch(configs[i])` for the first i whose kernel fits the device. Triton raises OutOfResources when it loads
    a kernel that needs more shared memory than one block may use (fp32 tiles on a GPU with 99 KB per block, say),
    before anything runs; the next, smaller configuration is tried. The index found is kept per `key`, so later
    calls, and the capture of a CUDA graph (after its warm-up calls), go straight to it."""
    i = _FITTING.get(key, 0)
    while True:
        try:
            launch(configs[i])
        except OutOfResources:
            if i + 1 == len(configs):
                raise
            i += 1
        else:
            _FITTING[key] = i
            return


def in_features(qweight: torch.Tensor, awq: bool) -> int:
    """K from a site's packed codes: (K, N/8) words for AWQ, (K/8, N) for GPTQ."""
    return qweight.shape[0] if awq else 8 * qweight.shape[0]


def check_sites(op: str, x, qweight, qzeros, scales, g_idx, bias, groups, awq: bool, what: str = "x") -> None:
    """The checks every qpass_triton op makes of its 2-D input and the per-site buffer lists, naming the op, the
    site's index and the field. The input is `what`: "x" (M, K), or "dy" (M, N_1 + N_2 + ...)."""
    sites = len(scales)
    if sites == 0 or any(len(v) != sites for v in (qweight, qzeros, g_idx, bias, groups)):
        raise ValueError(f"{op}: one qweight, qzeros, scales, g_idx, bias and group per site; got "
                         f"{[len(v) for v in (qweight, qzeros, scales, g_idx, bias, groups)]}")
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"{op}: {what} must be 2-D, float16/bfloat16/float32; got {tuple(x.shape)} {x.dtype}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{op} runs on CUDA tensors ({what} is on {x.device}); TRITON_INTERPRET=1 runs it on CPU "
                         "tensors for tests")
    k = in_features(qweight[0], awq)
    width = k if what == "x" else sum(s.shape[-1] for s in scales)
    if k % 16 or x.shape[1] != width:
        raise ValueError(f"{op}: {what} {tuple(x.shape)} must have {width} columns, K={k} a multiple of 16")
    for i in range(sites):
        n = scales[i].shape[1] if scales[i].dim() == 2 else -1
        words = (k, n // 8) if awq else (k // 8, n)
        buffers = [qweight[i], qzeros[i], scales[i]] + [t for t in (g_idx[i], bias[i]) if t is not None]
        if n % 8 or tuple(qweight[i].shape) != words or qweight[i].dtype != torch.int32 or \
                qzeros[i].dtype != torch.int32 or scales[i].dtype not in SCALE_DTYPES:
            raise ValueError(f"{op}: site {i}: qweight {tuple(qweight[i].shape)} {qweight[i].dtype} / scales "
                             f"{tuple(scales[i].shape)} {scales[i].dtype} are not 4-bit {'AWQ' if awq else 'GPTQ'} "
                             f"packing for K={k}")
        if groups[i] <= 0 or (g_idx[i] is None and scales[i].shape[0] < -(-k // groups[i])):
            raise ValueError(f"{op}: site {i}: group {groups[i]} does not fit scales {tuple(scales[i].shape)} "
                             f"for K={k}")
        if tuple(qzeros[i].shape) != (scales[i].shape[0], n // 8):
            raise ValueError(f"{op}: site {i}: qzeros {tuple(qzeros[i].shape)} must be (groups, N/8) = "
                             f"({scales[i].shape[0]}, {n // 8})")
        if g_idx[i] is not None and tuple(g_idx[i].shape) != (k,):
            raise ValueError(f"{op}: site {i}: g_idx {tuple(g_idx[i].shape)} must be ({k},)")
        if bias[i] is not None and tuple(bias[i].shape) != (n,):
            raise ValueError(f"{op}: site {i}: bias {tuple(bias[i].shape)} must be ({n},)")
        if any(t.device != x.device for t in buffers):
            raise ValueError(f"{op}: site {i}: every tensor must be on {x.device}")
        if not all(t.is_contiguous() for t in buffers):  # the kernels index them as row-major
            raise ValueError(f"{op}: site {i}: qweight, qzeros, scales, g_idx and bias must be contiguous")
