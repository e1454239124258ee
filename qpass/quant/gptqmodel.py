"""Matcher for gptqmodel's GPTQ quantized-linear layers.

Recognises `TorchLinear` (gptqmodel's reference GPTQ layer, which trains) and computes its base from
the module's buffers in plain torch: unpack `qweight` / `qzeros`, `W = scales[g_idx] * (q - z)`, matmul.
The unpack order is the one of gptqmodel's `PackableQuantLinear.dequantize_weight` (checked in tests
against the library's own dequantize). In-memory `TorchLinear` zero points are gptqmodel's "v2" form
(no +1 offset), so they are used as stored.
"""

from __future__ import annotations

import torch
from torch import nn

from . import QuantInfo, Unsupported

LIBRARY = "gptqmodel"
_SUPPORTED_BITS = (2, 4, 8)


def _classes():
    try:
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    except Exception:  # gptqmodel absent or broken: nothing of ours to match
        return None, ()
    return BaseQuantLinear, (TorchLinear,)


def match(module: nn.Module):
    base_cls, supported = _classes()
    if base_cls is None or not isinstance(module, base_cls):
        return None
    cls_name = type(module).__name__
    if type(module) not in supported:
        return Unsupported(LIBRARY, cls_name, f"{cls_name} layout is not read by qpass yet (supported: TorchLinear)")
    bits = int(module.bits)
    if bits not in _SUPPORTED_BITS or getattr(module, "planar", False):
        return Unsupported(LIBRARY, cls_name, f"{bits}-bit packing is not lowered by qpass yet (supported: {_SUPPORTED_BITS})")
    if getattr(module, "pack_dtype", torch.int32) != torch.int32:
        return Unsupported(LIBRARY, cls_name, f"pack_dtype {module.pack_dtype} is not supported (int32 only)")
    buffers = ("qweight", "qzeros", "scales", "g_idx") + (("bias",) if getattr(module, "bias", None) is not None else ())
    return QuantInfo(
        library=LIBRARY,
        cls_name=cls_name,
        method="gptq",
        bits=bits,
        group_size=int(module.group_size),
        sym=bool(getattr(module, "sym", True)),
        desc_act=bool(getattr(module, "desc_act", False)),
        in_features=int(module.in_features),
        out_features=int(module.out_features),
        buffers=buffers,
        matcher=_this(),
    )


def _this():
    import sys

    return sys.modules[__name__]


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) int32 words -> (rows * 32/bits, cols) codes; code k of a word sits at bits*k."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    codes = (packed.unsqueeze(1) >> shifts.view(1, per_word, 1)) & (2**bits - 1)
    return codes.reshape(packed.shape[0] * per_word, packed.shape[1])


def _unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    codes = (packed.unsqueeze(2) >> shifts.view(1, 1, per_word)) & (2**bits - 1)
    return codes.reshape(packed.shape[0], packed.shape[1] * per_word)


def dequantize(info: QuantInfo, qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """The (in_features, out_features) weight in the scales' dtype, as gptqmodel computes it."""
    q = _unpack_rows(qweight, info.bits)[: info.in_features]
    z = _unpack_cols(qzeros, info.bits)[:, : info.out_features]
    g = g_idx.long()
    # integer difference first (exact), then one multiply in the scales' dtype: gptqmodel's order.
    return scales[g] * (q - z[g]).to(scales.dtype)


def torch_forward(info: QuantInfo, x: torch.Tensor, tensors: list) -> torch.Tensor:
    qweight, qzeros, scales, g_idx, *bias = tensors
    weight = dequantize(info, qweight, qzeros, scales, g_idx).to(x.dtype)
    out = torch.matmul(x, weight)
    if bias:
        out = out + bias[0].to(out.dtype)
    return out
