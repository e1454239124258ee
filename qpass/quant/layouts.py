"""The weight layouts more than one library or class holds, each a registered `Layout` (qpass.quant.layout).

- `awq`: AWQ GEMM layout — qweight (in, out*bits/32), qzeros (groups, out*bits/32), scales (groups, out);
  4-bit words interleaved in AutoAWQ's order, other widths a contiguous bit stream (gptqmodel).
  W[k, n] = (q[k, n] - z[k // group, n]) * s[k // group, n]: `awq.utils.packing_utils.dequantize_gemm`.
- `int4pack_cpu`: what gptqmodel's CPU fused classes hold after their first eval forward — qweight in
  aten's int4pack layout, `scales_and_zeros` (groups, out, 2), optional `ret_idx` (act-order permutation of
  the input); W[k', n] = (q[n, k'] - 8) * scale + zero, y = x[..., ret_idx] @ W.
- `int4pack_resident`: qpass.resident's int4pack codes with the library's own scales and zero codes.
- `int8_channel`: gptqmodel's TorchInt8Linear — int8 (out, in) weights and one scale per output channel.
- `hf_int4`: gptqmodel's TorchCpuAvx512[Awq]Linear after their first bf16 eval forward — uint8 codes in
  32-row groups, float zero points and scales (groups, out), optional `ret_idx`.

gptqmodel's GPTQ packing is registered by its matcher (qpass/quant/gptqmodel.py).
"""

from __future__ import annotations

import torch

from .layout import Layout, add_bias, named as _named, register_layout
from .packing import AWQ_REVERSE_ORDER, awq_interleave, int4pack_block_n, unpack_int4pack_cpu_kn, unpack_stream

# Scale dtypes qpass's C++ kernels read.
CPP_SCALES = (torch.float16, torch.bfloat16, torch.float32)


def cpp_buffers_ok(named: dict) -> bool:
    """The weights are on the CPU with scales the C++ kernels read."""
    return named["qweight"].device.type == "cpu" and named["scales"].dtype in CPP_SCALES


class _Permuted(Layout):
    """A layout whose kernel may permute the input (act-order: `ret_idx`): x[..., ret_idx] @ W + bias, with W
    from `dequantize` over the buffers named in `weights`."""

    weights: tuple = ()

    def torch_forward(self, info, x, tensors, *derived):
        named = _named(info, tensors)
        if "ret_idx" in named:
            x = x.index_select(-1, named["ret_idx"].long())
        weight = self.dequantize(info, *(named[n] for n in self.weights)).to(x.dtype)
        return add_bias(torch.matmul(x, weight), named)


# ---- AWQ GEMM ---------------------------------------------------------------------------------------


def awq_dequantize(info, qweight, qzeros, scales) -> torch.Tensor:
    """(in_features, out_features) in the scales' dtype, as AWQ's `dequantize_gemm` computes it."""
    n = info.out_features
    q = unpack_stream(qweight, info.bits, dim=1, count=n)
    z = unpack_stream(qzeros, info.bits, dim=1, count=n)
    if info.bits == 4:
        q, z = awq_interleave(q), awq_interleave(z)
    group = info.group
    g = torch.arange(info.in_features, device=qweight.device) // group
    return (q - z[g]).to(scales.dtype) * scales[g]


# The natural output column held by 4-bit slot p of an AWQ word (slot p = bits 4p..4p+3), and its inverse.
AWQ_SLOT_COLUMN = tuple(int(i) for i in torch.tensor(AWQ_REVERSE_ORDER).argsort())
AWQ_COLUMN_SLOT = AWQ_REVERSE_ORDER


def awq_slot_scales(scales: torch.Tensor) -> torch.Tensor:
    """(G, N) scales -> (G, 8, N/8): the scale of the column in slot p of word w at [g, p, w] (see `AwqGemm`)."""
    g, n = scales.shape
    return scales.view(g, n // 8, 8)[:, :, list(AWQ_SLOT_COLUMN)].transpose(1, 2)


def slot_major(info, groups: int) -> bool:
    """4-bit AWQ with whole groups: the slot-major form of `AwqGemm.torch_forward` applies."""
    group = info.group
    return info.bits == 4 and info.out_features % 8 == 0 and groups * group == info.in_features


class AwqGemm(Layout):
    name = "awq-gemm"

    def dequantize(self, info, qweight, qzeros, scales):
        return awq_dequantize(info, qweight, qzeros, scales)

    def torch_forward(self, info, x, tensors, slot_scales=None):
        """y = x @ W (+ bias). 4-bit: W is dequantized with its columns in slot-major order (column p·N/8 + w is
        slot p of word w), where every load is contiguous and each shift constant per row — the natural order
        would need a per-element shift and word index, which inductor computes one element at a time. The
        GEMM's output columns are then put back in natural order (M×N values, not K×N). Same products and
        roundings as `awq_dequantize`. `slot_scales`: `awq_slot_scales(scales)` made once (`derived`), else
        gathered here."""
        named = _named(info, tensors)
        if not slot_major(info, named["qzeros"].shape[0]):
            weight = awq_dequantize(info, named["qweight"], named["qzeros"], named["scales"]).to(x.dtype)
            return add_bias(torch.matmul(x, weight), named)
        qweight, qzeros, scales = named["qweight"], named["qzeros"], named["scales"]
        k, words = qweight.shape
        groups = qzeros.shape[0]
        if slot_scales is None:
            slot_scales = awq_slot_scales(scales)
        shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32).view(1, 8, 1)
        q = (qweight.unsqueeze(1) >> shifts) & 15  # (K, 8, N/8)
        z = (qzeros.unsqueeze(1) >> shifts) & 15  # (G, 8, N/8)
        w = (q.view(groups, k // groups, 8, words) - z.unsqueeze(1)).to(scales.dtype) * slot_scales.unsqueeze(1)
        y = torch.matmul(x, w.reshape(k, 8 * words).to(x.dtype))
        y = y.unflatten(-1, (8, words))[..., list(AWQ_COLUMN_SLOT), :].transpose(-1, -2).flatten(-2)
        return add_bias(y, named)

    def derived(self, info, named):
        if not slot_major(info, named["qzeros"].shape[0]):
            return None
        return [awq_slot_scales(named["scales"]).contiguous()]

    def int4_codes(self, info, named):
        q = unpack_stream(named["qweight"], 4, dim=1, count=info.out_features)
        z = unpack_stream(named["qzeros"], 4, dim=1, count=info.out_features)
        return awq_interleave(q), named["scales"], awq_interleave(z), None  # as awq_dequantize (4-bit order)

    def int4_ok(self, info, named):
        return True

    def cpp_family(self, info, named):
        ok = info.bits == 4 and info.out_features % 16 == 0 and info.in_features % info.group == 0
        return "awq4" if ok and cpp_buffers_ok(named) else None

    def gemv_packing(self, info, named):
        return "awq4" if info.bits == 4 and named["qweight"].dtype == torch.int32 else None

    def pack_codes(self, info, codes_nk):
        """(K, N/8) int32: 8 output columns per word, in AutoAWQ's interleaved order."""
        shifts = torch.arange(0, 32, 4, dtype=torch.int64)
        natural = codes_nk.t().to(torch.int64).reshape(info.in_features, -1, 8)
        words = (natural[..., list(AWQ_SLOT_COLUMN)] << shifts).sum(-1)  # slot p holds column AWQ_SLOT_COLUMN[p]
        return _int32_words(words)


def _int32_words(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> int32 (two's complement), contiguous."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


awq = register_layout(AwqGemm())


# ---- aten int4pack (CPU) ----------------------------------------------------------------------------


def int4pack_dequantize(info, qweight, scales_and_zeros) -> torch.Tensor:
    """(in_features, out_features) float32, in the *permuted* input order the kernel consumes."""
    codes = unpack_int4pack_cpu_kn(qweight, info.out_features, info.in_features, int4pack_block_n())
    scale = scales_and_zeros[..., 0].float()
    zero = scales_and_zeros[..., 1].float()
    group = info.group
    g = torch.arange(info.in_features, device=qweight.device) // group
    return (codes - 8).float() * scale[g] + zero[g]


class Int4packCpu(_Permuted):
    name = "aten-int4pack-cpu"
    holds_int4pack = True
    weights = ("qweight", "scales_and_zeros")

    def dequantize(self, info, qweight, scales_and_zeros):
        return int4pack_dequantize(info, qweight, scales_and_zeros)

    def int4_ok(self, info, named):
        return named["scales_and_zeros"].dtype == torch.bfloat16  # the kernel's table format, usable as it is


int4pack_cpu = register_layout(Int4packCpu())


# ---- qpass's resident int4pack layout (base_layout="int4pack", `qpass.resident`) -----------------------


def int4pack_resident_dequantize(info, qweight, scales, zero_codes) -> torch.Tensor:
    """(in_features, out_features) in the scales' dtype from int4pack codes + the library's own scales and
    zero codes: W = s * (q - z), the library's arithmetic (one rounding), in the kernel's input order.

    Written as one broadcast over (groups, group rows, N blocks, 2 nibbles, block_n/2), the byte layout of
    int4pack, so that every load is contiguous along the innermost dimension and inductor vectorizes it."""
    k, n = info.in_features, info.out_features
    group = info.group
    block_n = int4pack_block_n()
    half = block_n // 2
    if n % block_n:  # a tail block: the general unpack
        g = torch.arange(k, device=qweight.device) // group
        codes = unpack_int4pack_cpu_kn(qweight, n, k, block_n)
        return scales[g] * (codes - zero_codes[g].to(torch.int32)).to(scales.dtype)
    groups, blocks = k // group, n // block_n
    shifts = torch.arange(0, 8, 4, device=qweight.device, dtype=torch.int32).view(1, 1, 1, 2, 1)
    b = qweight.reshape(-1).view(blocks, groups, group, half).permute(1, 2, 0, 3).unsqueeze(3).to(torch.int32)
    codes = (b >> shifts) & 0xF  # (groups, group, blocks, 2, half): row n = block*block_n + nibble*half + d
    s = scales.view(groups, 1, blocks, 2, half)
    z = zero_codes.view(groups, 1, blocks, 2, half).to(torch.int32)
    return (s * (codes - z).to(s.dtype)).reshape(k, n)


class Int4packResident(_Permuted):
    name = "int4pack-resident"
    holds_int4pack = True
    weights = ("qweight", "scales", "qpass_zero_codes")

    def dequantize(self, info, qweight, scales, zero_codes):
        return int4pack_resident_dequantize(info, qweight, scales, zero_codes)

    def int4_ok(self, info, named):
        return True  # made for the kernel

    def cpp_family(self, info, named):
        return "int4pack" if cpp_buffers_ok(named) else None


int4pack_resident = register_layout(Int4packResident())


# ---- int8 per output channel ------------------------------------------------------------------------


class Int8Channel(Layout):
    name = "int8-per-channel"

    def torch_forward(self, info, x, tensors, *derived):
        named = _named(info, tensors)
        weight = named["int8_weight_nk"].to(x.dtype) * named["int8_channel_scale"].to(x.dtype).unsqueeze(1)
        return add_bias(torch.matmul(x, weight.t()), named)


int8_channel = register_layout(Int8Channel())


# ---- gptqmodel's CPU AVX-512 "hf int4" layout ---------------------------------------------------------


def unpack_hf_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """(N, K/2) uint8, flat as [N/32, K/2, 16 rows, 2 nibbles-of-k] -> (N, K) codes (gptqmodel's
    `unpack_hf_int4`): byte (row r, k pair) holds rows r and r + 16 of each 32-row group."""
    grouped = packed.reshape(n // 32, k // 2, 16, 2).permute(0, 2, 1, 3).to(torch.int32)
    return torch.cat((grouped & 0xF, (grouped >> 4) & 0xF), dim=1).reshape(n, k)


def hf_int4_dequantize(info, qweight, qzeros, scales) -> torch.Tensor:
    """(in_features, out_features) float32 in the kernel's (possibly permuted) input order."""
    codes = unpack_hf_int4(qweight, info.out_features, info.in_features)
    group = info.group
    g = torch.arange(info.in_features, device=qweight.device) // group
    return (codes.t().float() - qzeros[g].float()) * scales[g].float()


class HfInt4(_Permuted):
    name = "cpu-avx512-int4"
    weights = ("qweight", "qzeros", "scales")

    def dequantize(self, info, qweight, qzeros, scales):
        return hf_int4_dequantize(info, qweight, qzeros, scales)


hf_int4 = register_layout(HfInt4())
