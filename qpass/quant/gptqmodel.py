"""Matcher for gptqmodel's GPTQ quantized-linear layers (the AWQ classes are in `gptqmodel_awq.py`).

Recognises `TorchLinear`, `TorchFusedLinear`, `TorchAtenLinear`, `TorchCpuAvx512Linear` (the class gptqmodel
picks when a checkpoint is loaded on an AVX-512 CPU) and `TorchInt8Linear` and computes their
base from whatever layout the module holds, in plain torch:
- GPTQ packing (2/3/4/8 bits): unpack `qweight` / `qzeros`, `W = scales[g_idx] * (q - z)`, matmul. The
  unpack order is the one of gptqmodel's `PackableQuantLinear.dequantize_weight` (checked in tests against
  the library's own dequantize). In-memory zero points are gptqmodel's "v2" form (no +1 offset).
- aten int4pack (`TorchFusedLinear` / `TorchAtenLinear` after their first eval forward repacked them):
  `layouts.int4pack_cpu`. TorchFusedLinear's repack drops asymmetric zero points; such a site is skipped.
- gptqmodel's AVX-512 "hf int4" (`TorchCpuAvx512Linear` after its first bf16 eval forward): `layouts.hf_int4`.
- int8 per output channel (`TorchInt8Linear`, requantised at load): `layouts.int8_channel`.
"""

from __future__ import annotations

import torch
from torch import nn

from . import QuantInfo, Unsupported, layouts
from .packing import int4pack_block_n
from .packing import unpack_stream

LIBRARY = "gptqmodel"
name = "gptq-packed"  # this module is also the layout namespace of the GPTQ packing (`torch_forward`)
_SUPPORTED_BITS = (2, 3, 4, 8)
# GPTQ classes qpass reads -> how their eager base runs: TorchLinear's own forward trains and keeps its
# layout; the fused/aten classes repack `qweight` in place on their first eval forward (so qpass computes
# their base itself, from whatever layout the module holds at prepare time); TorchInt8Linear has no
# training mode and no backward.
# TorchCpuAvx512Linear (what gptqmodel auto-selects on an AVX-512 CPU) refuses train mode and repacks too.
_EAGER_BASE = {"TorchLinear": "library", "TorchFusedLinear": "torch", "TorchAtenLinear": "torch",
               "TorchInt8Linear": "torch", "TorchCpuAvx512Linear": "torch"}


def _classes():
    try:
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear
        from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear
        from gptqmodel.nn_modules.qlinear.torch_cpu_avx512 import TorchCpuAvx512Linear
        from gptqmodel.nn_modules.qlinear.torch_fused import TorchFusedLinear
        from gptqmodel.nn_modules.qlinear.torch_int8 import TorchInt8Linear
    except Exception:  # gptqmodel absent or broken: nothing of ours to match
        return None, ()
    return BaseQuantLinear, (TorchLinear, TorchFusedLinear, TorchAtenLinear, TorchInt8Linear, TorchCpuAvx512Linear)


def _is_awq(module) -> bool:
    return any(getattr(m, "value", m) == "awq" for m in getattr(module, "SUPPORTS_METHODS", ()))


def match(module: nn.Module):
    base_cls, supported = _classes()
    if base_cls is None or not isinstance(module, base_cls) or _is_awq(module):
        return None  # AWQ classes: see gptqmodel_awq.py
    cls_name = type(module).__name__
    if type(module) not in supported:
        names = ", ".join(c.__name__ for c in supported)
        return Unsupported(LIBRARY, cls_name, f"{cls_name} layout is not read by qpass yet (supported: {names})")
    bits = int(module.bits)
    common = dict(
        library=LIBRARY, cls_name=cls_name, method="gptq", bits=bits, group_size=int(module.group_size),
        sym=bool(getattr(module, "sym", True)), desc_act=bool(getattr(module, "desc_act", False)),
        in_features=int(module.in_features), out_features=int(module.out_features),
        eager_base=_EAGER_BASE[cls_name],
    )
    bias = ("bias",) if getattr(module, "bias", None) is not None else ()
    if getattr(module, "int8_weight_nk", None) is not None:  # TorchInt8Linear after post_init
        return QuantInfo(buffers=("int8_weight_nk", "int8_channel_scale") + bias, matcher=layouts.int8_channel, **common)
    qweight = getattr(module, "qweight", None)
    if qweight is not None and qweight.dtype == torch.uint8 and cls_name == "TorchCpuAvx512Linear":
        extra = ("ret_idx",) if _needs_permutation(module) else ()
        return QuantInfo(buffers=("qweight", "qzeros", "scales") + extra + bias, matcher=layouts.hf_int4, **common)
    if qweight is not None and qweight.dtype == torch.uint8:  # repacked for aten int4pack by an eval forward
        int4pack_block_n()  # probe this CPU's layout now, in eager, not while dynamo traces the site
        if cls_name == "TorchFusedLinear" and not common["sym"]:
            return Unsupported(LIBRARY, cls_name, "TorchFusedLinear's CPU repack (run by its first eval forward) "
                               "zeroed the asymmetric zero points, so the weights are lost; prepare the model "
                               "before running it, or load it with BACKEND.TORCH")
        extra = ("ret_idx",) if _needs_permutation(module) else ()
        return QuantInfo(buffers=("qweight", "scales_and_zeros") + extra + bias, matcher=layouts.int4pack_cpu, **common)
    if bits not in _SUPPORTED_BITS or getattr(module, "planar", False):
        return Unsupported(LIBRARY, cls_name, f"{bits}-bit {'planar ' if getattr(module, 'planar', False) else ''}"
                           f"packing is not lowered by qpass yet (supported: {_SUPPORTED_BITS}, non-planar)")
    if getattr(module, "pack_dtype", torch.int32) != torch.int32:
        return Unsupported(LIBRARY, cls_name, f"pack_dtype {module.pack_dtype} is not supported (int32 only)")
    return QuantInfo(buffers=("qweight", "qzeros", "scales", "g_idx") + bias, matcher=_this(), **common)


def _needs_permutation(module) -> bool:
    ret_idx = getattr(module, "ret_idx", None)
    if ret_idx is None:
        return False
    return not torch.equal(ret_idx.cpu(), torch.arange(ret_idx.numel(), dtype=ret_idx.dtype))


def _this():
    import sys

    return sys.modules[__name__]


def dequantize(info: QuantInfo, qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """The (in_features, out_features) weight in the scales' dtype, as gptqmodel computes it."""
    q = unpack_stream(qweight, info.bits, dim=0, count=info.in_features)
    z = unpack_stream(qzeros, info.bits, dim=1, count=info.out_features)
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
