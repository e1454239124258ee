"""Matcher for gptqmodel's AWQ quantized-linear layers (PEFT 0.21 routes AWQ LoRA through these).

`AwqTorchLinear` (portable, trains: its own forward serves eager), `TorchFusedAwqLinear` and
`TorchAtenAwqLinear` (CPU; they repack `qweight` into aten's int4pack layout on their first eval forward,
so qpass computes their base itself from whichever layout the module holds), `AwqGEMMLinear` (CUDA
kernel only; on CPU qpass computes its base), `TorchCpuAvx512AwqLinear` (what gptqmodel picks for an AWQ
checkpoint on an AVX-512 CPU; repacks into its "hf int4" layout, refuses train mode). All hold AWQ's GEMM layout (`layouts.awq`) until repacked.
"""

from __future__ import annotations

import torch
from torch import nn

from . import QuantInfo, Unsupported, layouts
from .packing import int4pack_block_n

LIBRARY = "gptqmodel"
_CLASSES = {
    # module path, class name, eager base
    "AwqTorchLinear": ("gptqmodel.nn_modules.qlinear.torch_awq", "library"),
    "TorchFusedAwqLinear": ("gptqmodel.nn_modules.qlinear.torch_fused_awq", "torch"),
    "TorchAtenAwqLinear": ("gptqmodel.nn_modules.qlinear.torch_aten_kernel_awq", "torch"),
    "AwqGEMMLinear": ("gptqmodel.nn_modules.qlinear.gemm_awq", "torch"),
    # auto-selected when an AWQ checkpoint is loaded on an AVX-512 CPU; inference-only (refuses train mode)
    "TorchCpuAvx512AwqLinear": ("gptqmodel.nn_modules.qlinear.torch_cpu_avx512_awq", "torch"),
}


def _classes() -> dict:
    import importlib

    found = {}
    for name, (path, _) in _CLASSES.items():
        try:
            found[getattr(importlib.import_module(path), name)] = name
        except Exception:  # class absent in this gptqmodel version
            continue
    return found


def _awq_base():
    try:
        from gptqmodel.nn_modules.qlinear import AWQuantLinear
    except Exception:
        return None
    return AWQuantLinear


def match(module: nn.Module):
    base = _awq_base()
    if base is None or not isinstance(module, base):
        return None
    cls_name = type(module).__name__
    name = _classes().get(type(module))
    if name is None:
        return Unsupported(LIBRARY, cls_name, f"{cls_name} layout is not read by qpass yet "
                           f"(supported AWQ classes: {', '.join(_CLASSES)})")
    bits = int(module.bits)
    common = dict(
        library=LIBRARY, cls_name=cls_name, method="awq", bits=bits, group_size=int(module.group_size),
        sym=bool(getattr(module, "sym", False)), desc_act=False,
        in_features=int(module.in_features), out_features=int(module.out_features),
        eager_base=_CLASSES[name][1],
    )
    bias = ("bias",) if getattr(module, "bias", None) is not None else ()
    qweight = getattr(module, "qweight", None)
    if qweight is None:
        return Unsupported(LIBRARY, cls_name, f"{cls_name} holds no qweight (not loaded yet?)")
    if qweight.dtype == torch.uint8 and name == "TorchCpuAvx512AwqLinear":  # repacked by a bf16 eval forward
        return QuantInfo(buffers=("qweight", "qzeros", "scales") + bias, layout=layouts.hf_int4, **common)
    if qweight.dtype == torch.uint8:  # repacked for aten int4pack by an eval forward
        int4pack_block_n()  # probe this CPU's layout now, in eager, not while dynamo traces the site
        return QuantInfo(buffers=("qweight", "scales_and_zeros") + bias, layout=layouts.int4pack_cpu, **common)
    if not 2 <= bits <= 8 or qweight.dtype != torch.int32:
        return Unsupported(LIBRARY, cls_name, f"{bits}-bit / {qweight.dtype} AWQ packing is not lowered by qpass")
    return QuantInfo(buffers=("qweight", "qzeros", "scales") + bias, layout=layouts.awq, **common)
