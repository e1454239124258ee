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
from .layout import Layout, add_bias, named as _named, register_layout
from .packing import int4pack_block_n, unpack_stream

LIBRARY = "gptqmodel"
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
        return QuantInfo(buffers=("int8_weight_nk", "int8_channel_scale") + bias, layout=layouts.int8_channel, **common)
    qweight = getattr(module, "qweight", None)
    if qweight is not None and qweight.dtype == torch.uint8 and cls_name == "TorchCpuAvx512Linear":
        extra = ("ret_idx",) if _needs_permutation(module) else ()
        return QuantInfo(buffers=("qweight", "qzeros", "scales") + extra + bias, layout=layouts.hf_int4, **common)
    if qweight is not None and qweight.dtype == torch.uint8:  # repacked for aten int4pack by an eval forward
        int4pack_block_n()  # probe this CPU's layout now, in eager, not while dynamo traces the site
        if cls_name == "TorchFusedLinear" and not common["sym"]:
            return Unsupported(LIBRARY, cls_name, "TorchFusedLinear's CPU repack (run by its first eval forward) "
                               "zeroed the asymmetric zero points, so the weights are lost; prepare the model "
                               "before running it, or load it with BACKEND.TORCH")
        extra = ("ret_idx",) if _needs_permutation(module) else ()
        return QuantInfo(buffers=("qweight", "scales_and_zeros") + extra + bias, layout=layouts.int4pack_cpu, **common)
    if bits not in _SUPPORTED_BITS or getattr(module, "planar", False):
        return Unsupported(LIBRARY, cls_name, f"{bits}-bit {'planar ' if getattr(module, 'planar', False) else ''}"
                           f"packing is not lowered by qpass yet (supported: {_SUPPORTED_BITS}, non-planar)")
    if getattr(module, "pack_dtype", torch.int32) != torch.int32:
        return Unsupported(LIBRARY, cls_name, f"pack_dtype {module.pack_dtype} is not supported (int32 only)")
    return QuantInfo(buffers=("qweight", "qzeros", "scales", "g_idx") + bias, layout=gptq_packed, **common)


def _needs_permutation(module) -> bool:
    ret_idx = getattr(module, "ret_idx", None)
    if ret_idx is None:
        return False
    return not torch.equal(ret_idx.cpu(), torch.arange(ret_idx.numel(), dtype=ret_idx.dtype))


def dequantize(info: QuantInfo, qweight, qzeros, scales, g_idx) -> torch.Tensor:
    """The (in_features, out_features) weight in the scales' dtype, as gptqmodel computes it."""
    q = unpack_stream(qweight, info.bits, dim=0, count=info.in_features)
    z = unpack_stream(qzeros, info.bits, dim=1, count=info.out_features)
    g = g_idx.long()
    # integer difference first (exact), then one multiply in the scales' dtype: gptqmodel's order.
    return scales[g] * (q - z[g]).to(scales.dtype)


def _canonical(info, g_idx) -> torch.Tensor:
    return torch.arange(info.in_features, device=g_idx.device) // info.group


class GptqPacked(Layout):
    """gptqmodel's GPTQ packing: qweight (K*bits/32, N), qzeros (G, N*bits/32) in the in-memory "v2" form
    (no +1 offset), scales (G, N), g_idx (K,)."""

    name = "gptq-packed"
    v2_zero_points = True

    def dequantize(self, info, qweight, qzeros, scales, g_idx):
        return dequantize(info, qweight, qzeros, scales, g_idx)

    def torch_forward(self, info, x, tensors, *derived):
        named = _named(info, tensors)
        weight = dequantize(info, named["qweight"], named["qzeros"], named["scales"], named["g_idx"]).to(x.dtype)
        return add_bias(torch.matmul(x, weight), named)

    def int4_codes(self, info, named):
        q = unpack_stream(named["qweight"], 4, dim=0, count=info.in_features)
        z = unpack_stream(named["qzeros"], 4, dim=1, count=info.out_features)
        g = named["g_idx"].long()
        canonical = _canonical(info, g)
        perm = None
        if not torch.equal(g, canonical):  # act-order: permute the input so that groups are contiguous
            perm = torch.argsort(g, stable=True)
            if not torch.equal(g[perm], canonical):
                return None
            q = q[perm]
        return q, named["scales"], z, perm

    def int4_ok(self, info, named):
        return True

    def cpp_family(self, info, named):
        """4-bit, groups in order (no act-order), N a multiple of 16."""
        group = info.group
        if info.bits != 4 or group % 8 or info.in_features % group or info.out_features % 16:
            return None
        if not layouts.cpp_buffers_ok(named) or named["g_idx"].device.type != "cpu":
            return None
        return "gptq4" if torch.equal(named["g_idx"].long(), _canonical(info, named["g_idx"])) else None

    def gemv_packing(self, info, named):
        if info.bits != 4 or named["qweight"].dtype != torch.int32:
            return None
        return "gptq4" if torch.equal(named["g_idx"].long(), _canonical(info, named["g_idx"])) else "gptq4-g_idx"

    def pack_codes(self, info, codes_nk):
        """(K/8, N) int32: 8 input rows per word."""
        shifts = torch.arange(0, 32, 4, dtype=torch.int64)
        words = (codes_nk.to(torch.int64).reshape(info.out_features, -1, 8) << shifts).sum(-1).t()
        return layouts._int32_words(words)

    def merge_grid(self, site):
        m = site.module
        if not hasattr(m, "pack_block"):  # repacked through gptqmodel's own packer
            return None
        zeros = unpack_stream(m.qzeros, site.info.bits, dim=1, count=site.info.out_features).float()
        return m.scales.float(), zeros, m.g_idx.long()

    def merge_repack(self, site, weight, bias, scales, zeros, g_idx) -> None:
        """Repack the layer in place with gptqmodel's `pack_block` (in-memory zeros stay "v2")."""
        from . import normal_storage

        m = site.module
        linear = nn.Linear(site.info.in_features, site.info.out_features, bias=bias is not None)
        linear.weight.data.copy_(weight.T)
        if bias is not None:
            linear.bias.data.copy_(bias)
        if bias is not None and "bias" not in m._buffers:
            m.__dict__.pop("bias", None)  # a bias-less layer holds `bias = None` as a plain attribute
        m.pack_block(linear, scales.T.contiguous(), zeros.T.contiguous(), g_idx.to(torch.int32))
        normal_storage(m)  # pack_block works under inference_mode
        for attr in ("_g_idx_long_cache", "_zeros_cache"):
            if hasattr(m, attr):
                setattr(m, attr, None)
        if hasattr(m, "clear_weight_cache"):
            m.clear_weight_cache()
        if hasattr(m, "qzero_format"):
            m.qzero_format(format=2)  # what pack_block wrote; gptqmodel converts back to v1 when saving


gptq_packed = register_layout(GptqPacked())
