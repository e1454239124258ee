"""`base_layout="int4pack"`: hold each 4-bit layer's weights ONCE, in the CPU int4 kernel's layout.

The default (`base_layout="library"`) leaves the library's buffers as they are. GPTQ with groups in order and
AWQ decode from them directly (qpass's gemv kernel); for the rest (act-order GPTQ, or no C++ kernels) CPU bf16
decode steps keep a repacked copy of the 4-bit codes beside them (`qpass.lowering.packed_for`): fast decode,
but those 4-bit weights are held twice (the library's codes and the repacked ones).

With "int4pack", `prepare` converts every eligible site in place, as gptqmodel's own `TorchAtenLinear` does
on its first eval forward: `qweight` becomes aten's int4pack layout (same bytes: 4 bits per weight), plus
the kernel's bf16 `scales_and_zeros` table, the zero points as one uint8 code per (group, output)
(`qpass_zero_codes`) and, for act-order, the input permutation `ret_idx`; the library's `scales` stay. The site
then reads the `layouts.int4pack_resident` layout everywhere — decode through
`aten._weight_int4pack_mm_for_cpu` on the module's own buffers (no copy), compiled prefill and training through
qpass's C++ `int4pack_mm` (the `dequant-cpu` lowering; inductor's plain-torch dequantize where the kernels are not
built), eager through the plain-torch dequantize — both s * (q - z) with the library's scales and zero codes (the
library's arithmetic). The library's forward is no longer called for these sites.

The library's packed zero points and g_idx are kept off the module (small) so that the library layout can be
restored bit-exactly: `qpass.unprepare` and `qpass.merge` restore it (the codes are unpacked from the
int4pack layout and packed again the library's way), and `state_dict()` of a converted layer yields the
library's tensors, so `save_pretrained` writes a normal checkpoint.

Eligible: CPU, 4-bit GPTQ packing (gptqmodel, with g_idx) or AWQ packing (autoawq / gptqmodel AWQ), group
32/64/128/256, bfloat16 scales (the kernel's scale format: converting fp16/fp32 scales would round them).
Other sites keep their layout; the report says why.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .quant import layouts
from .quant.packing import int4pack_block_n, unpack_int4pack_cpu

LAYOUTS = ("library", "int4pack")
_NEW = ("scales_and_zeros", "qpass_zero_codes", "ret_idx")


def check_layout(base_layout) -> None:
    from .errors import QpassError

    if base_layout not in LAYOUTS:
        raise QpassError(f"base_layout must be one of {LAYOUTS}; got {base_layout!r}")


def why_not(site) -> Optional[str]:
    """None if `site` can be held in the int4pack layout, else the reason."""
    from . import lowering

    info = site.info
    module = site.module
    device = getattr(module, info.buffers[0]).device
    if device.type != "cpu":
        return f"int4pack layout is for CPU weights (this layer is on {device})"
    if not lowering.codes_ok(site):
        return (f"int4pack layout needs 4-bit GPTQ/AWQ packing with group in {lowering.GROUPS}; "
                f"this layer is {info.bits}-bit, group {info.group_size}, {info.cls_name}")
    scales = getattr(module, "scales")
    if scales.dtype != torch.bfloat16:
        return (f"scales are {scales.dtype}; the int4 kernel holds them in bfloat16, which would round them "
                "(use a bfloat16 model, or base_layout='library')")
    return None


def convert(site) -> Optional[str]:
    """Put `site`'s module in the int4pack layout; returns the reason if it cannot. Callers run it inside
    `qpass.transaction.changing`, which undoes it on failure."""
    from . import lowering

    reason = why_not(site)
    if reason is not None:
        return reason
    info = site.info
    module = site.module
    with torch.no_grad():
        found = lowering.codes_scales_zeros(site, site.base_tensors())
        packed = lowering.pack([site], "cpu", parts=[found])
    if packed is None:
        return "int4pack layout: this layer's codes cannot be repacked (act-order groups not contiguous)"
    zero_codes = found[2].to(torch.uint8).contiguous()
    # qweight is re-made from the codes on restore; scales stay on the module (the dequantize reads them)
    kept = {name: (None if name == "qweight" else module._buffers[name])
            for name in info.buffers if name not in ("bias", "scales")}
    for name in kept:
        del module._buffers[name]
    module.register_buffer("qweight", packed.weight)
    module.register_buffer("qpass_zero_codes", zero_codes)
    module.register_buffer("scales_and_zeros", packed.scales_and_zeros)
    if packed.perm is not None:
        module.register_buffer("ret_idx", packed.perm.to(torch.int32))
    bias = ("bias",) if "bias" in info.buffers else ()
    extra = ("ret_idx",) if packed.perm is not None else ()
    site.library_info = info
    site.library_buffers = kept
    site.info = dataclasses.replace(info, buffers=("qweight", "scales", "qpass_zero_codes", "scales_and_zeros") + extra + bias,
                                    layout=layouts.int4pack_resident, eager_base="torch")
    site.state_dict_hook = module._register_state_dict_hook(_library_state_dict)
    return None


def is_resident(site) -> bool:
    return getattr(site, "library_info", None) is not None


def library_qweight(site) -> torch.Tensor:
    """The library's `qweight` again, bit-exact, from the int4pack codes held now."""
    lib = site.library_info
    module = site.module
    codes = unpack_int4pack_cpu(module.qweight, lib.out_features, lib.in_features, int4pack_block_n())  # (N, K)
    perm = getattr(module, "ret_idx", None) if "ret_idx" in site.info.buffers else None
    if perm is not None:
        unpermuted = torch.empty_like(codes)
        unpermuted[:, perm.long()] = codes
        codes = unpermuted
    return lib.layout.pack_codes(lib, codes)


def restore(site) -> None:
    """Back to the library's layout, bit-exact; the site reads the library's buffers again."""
    if not is_resident(site):
        return
    module = site.module
    with torch.no_grad():
        qweight = library_qweight(site)
    for name in _NEW:
        module._buffers.pop(name, None)
    module._buffers.pop("qweight", None)
    for name, buf in site.library_buffers.items():
        module._buffers[name] = qweight if name == "qweight" else buf
    site.state_dict_hook.remove()
    site.info = site.library_info
    site.library_info = site.library_buffers = site.state_dict_hook = None


def _library_state_dict(module, state_dict, prefix, local_metadata):
    """state_dict of a converted layer in the library's tensors (a checkpoint saved now loads anywhere)."""
    site = module.__dict__.get("_qpass_site")
    if site is None or not is_resident(site):
        return state_dict
    for name in _NEW:
        state_dict.pop(prefix + name, None)
    for name, buf in site.library_buffers.items():
        state_dict[prefix + name] = library_qweight(site) if name == "qweight" else buf
    return state_dict


def kept_bytes(sites) -> int:
    """Bytes of the library tensors kept off the modules by converted sites (for memory accounting)."""
    return sum(t.numel() * t.element_size() for s in sites if is_resident(s)
               for t in s.library_buffers.values() if t is not None)
