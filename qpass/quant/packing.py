"""Plain-torch unpacking of the packed integer layouts the matchers read (no library code, inductor fuses it).

- `unpack_stream`: codes packed as a little-endian bit stream along one dimension — 32 codes in `bits`
  int32 words. For 2/4/8 bits this is the classic "32/bits codes per word" layout (GPTQ, AWQ before its
  interleave); for 3/5/6/7 bits codes straddle word boundaries (GPTQ 3-bit, gptqmodel's AWQ 2..8-bit).
- `awq_interleave`: AutoAWQ's 4-bit order inside each word ([0, 2, 4, 6, 1, 3, 5, 7]), undone.
- `unpack_int4pack_cpu`: the (N, K/2) uint8 layout of `aten._convert_weight_to_int4pack_for_cpu`, which
  gptqmodel's CPU fused classes switch to on their first eval forward.
"""

from __future__ import annotations

import functools

import torch

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_stream(packed: torch.Tensor, bits: int, dim: int, count: int | None = None) -> torch.Tensor:
    """int32 words -> int32 codes along `dim` (the packed dimension grows by 32/bits); first `count` kept."""
    x = packed.movedim(dim, -1)
    n_words = x.shape[-1]
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, device=x.device, dtype=torch.int32)
        codes = ((x.unsqueeze(-1) >> shifts) & mask).reshape(*x.shape[:-1], n_words * per_word)
    else:
        blocks = -(-n_words // bits)
        words = x.to(torch.int64) & 0xFFFFFFFF
        if blocks * bits != n_words:
            words = torch.nn.functional.pad(words, (0, blocks * bits - n_words))
        words = words.reshape(*x.shape[:-1], blocks, bits)
        following = torch.nn.functional.pad(words[..., 1:], (0, 1))
        bit = torch.arange(32, device=x.device) * bits
        word, shift = bit // 32, bit % 32
        # a code may start near the top of one word and continue at the bottom of the next
        joined = words[..., word] | (following[..., word] << 32)
        codes = ((joined >> shift) & mask).to(torch.int32).reshape(*x.shape[:-1], blocks * 32)
    if count is not None:
        codes = codes[..., :count]
    return codes.movedim(-1, dim)


def awq_interleave(codes: torch.Tensor) -> torch.Tensor:
    """Undo AutoAWQ's 4-bit column interleave: (rows, cols) codes in packed order -> natural column order."""
    rows, cols = codes.shape
    order = torch.arange(cols, device=codes.device).view(-1, 8)[:, list(AWQ_REVERSE_ORDER)].reshape(-1)
    return codes[:, order]


@functools.lru_cache(maxsize=None)
def int4pack_block_n() -> int:
    """The N block of this CPU's int4pack layout (64 with AVX-512, 32 otherwise), found by packing a probe."""
    probe = torch.zeros(64, 64, dtype=torch.int32)
    probe[32, 0] = 1
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)
    return 64 if int(packed[0]) == 0x10 else 32


def unpack_int4pack_cpu(packed: torch.Tensor, n: int, k: int, block_n: int) -> torch.Tensor:
    """(N, K/2) uint8 from `_convert_weight_to_int4pack_for_cpu` -> (N, K) int32 codes."""
    return unpack_int4pack_cpu_kn(packed, n, k, block_n).t()


def unpack_int4pack_cpu_kn(packed: torch.Tensor, n: int, k: int, block_n: int) -> torch.Tensor:
    """The same codes as (K, N), the orientation a dequantize + matmul wants.

    Full blocks of `block_n` output rows store row d and row d + block_n/2 in the low/high nibble of one
    byte, k-major: as bytes, (N/block_n, K, block_n/2). All full blocks are unpacked by one expression, not
    a loop per block (a graph of hundreds of nodes per site, which inductor compiles several times longer); a
    tail block (N % block_n rows) stores rows 2d and 2d+1 together.
    """
    flat = packed.reshape(-1)
    full = n - n % block_n
    half = block_n // 2
    parts = []
    if full:
        blk = flat[: full * k // 2].view(full // block_n, k, half).to(torch.int32)
        nib = torch.stack([blk & 0xF, blk >> 4], 2)  # (blocks, K, 2, half): row = block*block_n + h*half + d
        parts.append(nib.permute(1, 0, 2, 3).reshape(k, full))
    if n > full:
        tail = flat[full * k // 2 :].view(k, (n - full) // 2).to(torch.int32)
        parts.append(torch.stack([tail & 0xF, tail >> 4], 2).reshape(k, n - full))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
