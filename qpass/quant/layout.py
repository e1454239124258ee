"""Weight layouts: how a quantized module's tensors hold its weight, and what may read them.

A `Layout` is a registered object (as torchao's): a matcher names one in each `QuantInfo` it returns, and the
engine asks the layout — plain-torch forward, dequantize, which kernels can read it, how to repack it —
instead of testing which layout it is. Every hook's default means "not supported", so a layout overrides only
what it has. Adding a quantization library = one matcher file (`qpass/quant/<library>.py`) and, if its packing
is new, one `Layout` registered there; nothing in the lowerings or in merge changes.

Invariants: a layout is stateless (one shared instance per name), and `named` is always the site's
`info.buffers` zipped with the module's current tensors, so every answer follows the buffers as they are now.
"""

from __future__ import annotations

from typing import Optional

import torch


class Layout:
    name: str = ""
    # The module already holds aten's CPU int4pack layout (`qweight`, `scales_and_zeros`, optional `ret_idx`):
    # aten's int4 kernel and qpass's int4pack kernels read it as it is, no repacked copy.
    holds_int4pack: bool = False
    # The zero points are held in gptqmodel's in-memory "v2" form: a checkpoint save converts them (merge.py).
    v2_zero_points: bool = False

    # ---- plain torch (eager, and the torch-dequant lowering that inductor fuses) -------------------------

    def dequantize(self, info, *tensors) -> torch.Tensor:
        """(in_features, out_features) weight from the layout's weight tensors (not the bias)."""
        raise NotImplementedError(f"layout {self.name} has no dequantize")

    def torch_forward(self, info, x: torch.Tensor, tensors: list, *derived) -> torch.Tensor:
        """y = x @ W + bias from the module's own tensors (`info.buffers` order) and any `derived` tensors."""
        raise NotImplementedError(f"layout {self.name} has no plain-torch forward")

    def derived(self, info, named: dict) -> Optional[list]:
        """Small tensors made once from the buffers that `torch_forward` reads as `*derived` (cached by the
        lowering, re-made when a buffer changes), or None."""
        return None

    # ---- kernel eligibility ----------------------------------------------------------------------------

    def int4_codes(self, info, named: dict):
        """(codes (K, N) int32, scales (G, N), zero codes (G, N), input permutation or None) of a 4-bit grouped
        weight, which the int4pack lowerings repack once for aten's int4 kernel; None if not available."""
        return None

    def int4_ok(self, info, named: dict) -> bool:
        """aten's int4 kernel can compute this site: from its codes repacked (`int4_codes`), or as it is held
        (`holds_int4pack`). Shape rules (4 bits, group size) are the lowering's."""
        return False

    def cpp_family(self, info, named: dict) -> Optional[str]:
        """Which of qpass's C++ kernel families reads these buffers as they are ("gptq4", "awq4" or
        "int4pack", see qpass.lowering.cpp), or None."""
        return None

    def gemv_packing(self, info, named: dict) -> Optional[str]:
        """Which 4-bit packing these buffers hold as they are, on any device, for kernels that read it in place
        (qpass's Triton gemv, qpass.lowering.triton): "gptq4" (GPTQ, groups in input order), "gptq4-g_idx" (GPTQ,
        act-order: each row's group read through g_idx) or "awq4" (AutoAWQ's GEMM packing); None if neither."""
        return None

    # ---- repacking -------------------------------------------------------------------------------------

    def pack_codes(self, info, codes_nk: torch.Tensor) -> torch.Tensor:
        """The library's `qweight` from (N, K) 4-bit codes (qpass.resident restores the library layout)."""
        raise NotImplementedError(f"layout {self.name} cannot pack codes")

    def merge_grid(self, site):
        """(scales (G, N) fp32, zeros (G, N) fp32, g_idx) of the layer's quantization grid, if `merge` can
        requantize onto it and repack the layer in place (`merge_repack`); None if it cannot."""
        return None

    def merge_repack(self, site, weight, bias, scales, zeros, g_idx) -> None:
        raise NotImplementedError(f"layout {self.name} cannot be repacked by merge")

    # ---- identity --------------------------------------------------------------------------------------

    def __reduce__(self):
        """Pickles (and copies) as its name: one instance per layout, compared by `is`."""
        return (get, (self.name,))

    def __repr__(self) -> str:
        return f"<layout {self.name}>"


_REGISTRY: dict = {}


def register_layout(layout: Layout) -> Layout:
    """Make `layout` known by its name (what pickles carry). Returns it."""
    if not layout.name:
        raise ValueError(f"{type(layout).__name__}: a layout needs a name")
    other = _REGISTRY.get(layout.name)
    if other is not None and type(other) is not type(layout):
        raise ValueError(f"a layout named {layout.name!r} is already registered ({type(other).__name__})")
    _REGISTRY.setdefault(layout.name, layout)
    return _REGISTRY[layout.name]


def get(name: str) -> Layout:
    if name not in _REGISTRY:
        from . import _matchers  # the matcher files register their layouts on import

        _matchers()
    return _REGISTRY[name]


def named(info, tensors) -> dict:
    """The site's tensors by buffer name."""
    return dict(zip(info.buffers, tensors))


def add_bias(out: torch.Tensor, named: dict) -> torch.Tensor:
    bias = named.get("bias")
    return out if bias is None else out + bias.to(out.dtype)
