"""gemv-cuda: qpass's Triton decode kernel (qpass/kernels/triton_gemv.py) on the library's 4-bit buffers, no copy.

Decode steps on CUDA (at most `DECODE_MAX_TOKENS` rows, no gradient), any activation dtype: the 4-bit codes read
as the layout holds them (`Layout.gemv_packing`: GPTQ with groups in order or act-order through g_idx, AWQ GEMM
packing), float32 accumulation; sibling sites in one op call, and each site's whole low-rank adapter and bias
added before the one rounding. The kernel has no backward: graphs that need gradients never take it.

Nothing here runs for CPU inputs (`applies` is False first), and triton is imported only when a CUDA graph is
lowered onto this kernel.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch

from ..quant.layout import named
from .common import Base, decode

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BUFFERS = ("qweight", "qzeros", "scales")  # what the kernel takes per site, after x (GPTQ and AWQ alike)
_PACKINGS = ("gptq4", "gptq4-g_idx", "awq4")


@functools.cache
def _triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def packing(site) -> Optional[str]:
    """The packing the kernel reads `site`'s buffers in (the layout's answer), if it can: K a multiple of 16
    (the kernel's smallest K block), N of 8 (whole zero-point words), scales it reads, all on one device."""
    info = site.info
    tensors = site.base_tensors()
    own = named(info, tensors)
    found = info.layout.gemv_packing(info, own)
    if found not in _PACKINGS or info.in_features % 16 or info.out_features % 8:
        return None
    if len({t.device for t in tensors}) != 1:  # e.g. a g_idx a library moved to the CPU: the kernel reads one device
        return None
    return found if own["scales"].dtype in _ACT_DTYPES else None


class TritonBase(Base):
    """Sibling bases (same x, same packing family) in one op call; with `takes_low_rank`, their adapters too."""

    fused = True
    lowering = "gemv-cuda"

    def __init__(self, sites, low_rank: bool):
        packs = [packing(s) for s in sites]
        families = {p[:4] for p in packs if p is not None}
        if None in packs or len(families) != 1:
            raise ValueError(f"qpass: {self.lowering} cannot take {[s.path for s in sites]} together "
                             f"(packings {packs})")
        self.sites = sites
        self.awq = families.pop() == "awq4"
        self.by_g_idx = [p == "gptq4-g_idx" for p in packs]  # act-order: the kernel reads each row's group
        self.constants = []
        self.takes_low_rank = low_rank

    def __call__(self, x, bases, kernel):
        return self._call(x, bases, None)

    def low_rank(self, x, bases, adapters):
        return self._call(x, bases, adapters)

    def _call(self, x, bases, adapters) -> list:
        from ..kernels import triton_gemv  # noqa: F401 (defines qpass_triton::int4_gemv; imports triton)

        h, args = self.operands(x, bases)
        lora = [list(part) for part in zip(*adapters)] if adapters else [[], [], []]
        return self.outputs(x, torch.ops.qpass_triton.int4_gemv(h, *args, *lora))

    def operands(self, x, bases) -> tuple:
        """x as (M, K) and the op's per-site arguments after it: qweight, qzeros, scales, g_idx, bias lists, the
        groups and the AWQ flag (every qpass_triton op takes them in this order)."""
        own = [named(s.info, b) for s, b in zip(self.sites, bases)]
        g_idx = [n["g_idx"] if flag else None for n, flag in zip(own, self.by_g_idx)]
        weights = [[n[b] for n in own] for b in _BUFFERS]
        return x.reshape(-1, self.sites[0].info.in_features), (*weights, g_idx, [n.get("bias") for n in own],
                                                              [s.info.group for s in self.sites], self.awq)

    def outputs(self, x, y) -> list:
        """The op's (M, sum N) output as one y per site, x's leading dims restored."""
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return list(y.split([s.info.out_features for s in self.sites], -1)) if len(self.sites) > 1 else [y]


# The device types the Triton lowerings take: CUDA. tests/test_triton.py's interpreter child adds "cpu" to compile
# whole models onto them (Triton's interpreter runs the kernels on CPU tensors).
DEVICES = ("cuda",)


def _cuda_act(x) -> bool:
    return x.device.type in DEVICES and x.dtype in _ACT_DTYPES


class GemvCuda:
    name = "gemv-cuda"
    label = "gemv-cuda (Triton on the library layout, no copy)"
    shares_bare_call = True  # siblings with no active adapter: one call for their bases

    def accepts(self, site, x, needs_grad) -> bool:
        return _cuda_act(x) and not needs_grad and _triton() and packing(site) is not None

    def applies(self, site, x, needs_grad) -> bool:
        return _cuda_act(x) and decode(x, needs_grad) and _triton() and packing(site) is not None

    def base(self, sites, needs_grad, switches) -> Base:
        # as gemv-cpu: decode steps take each site's whole low-rank adapter into the call (GEMV_LORA)
        return TritonBase(sites, low_rank=switches.gemv_low_rank and not needs_grad)
