"""gemv-cpu and dequant-cpu: qpass's own C++ kernels (qpass/kernels) on the library's buffers, no copy.

- gemv-cpu: `{family}_gemv` reads the 4-bit codes as the layout holds them, float32 accumulation, any
  activation dtype; siblings and their low-rank adapters in one call. Decode steps.
- dequant-cpu: `{family}_mm` unpacks the codes by vector C++ straight into the activation dtype and runs the
  GEMM on them (bit-exact weights, no copy kept); its backward (dx) unpacks again. Prefill and training.

A layout says which kernel family reads it (`Layout.cpp_family`): "gptq4", "awq4" or "int4pack". Families
differ only in which buffers the kernel takes; `_FAMILIES` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import kernels
from ..quant.layout import named
from ..quant.packing import int4pack_block_n
from .common import Base, add_bias, decode

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Adapter dtypes the kernels read A and B in (multiplied in float32).
LOW_RANK_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Family:
    buffers: tuple  # the tensors the kernel takes per site, after x
    gemv: Optional[Callable]
    mm: Callable
    mm_lora: Callable
    awq: bool = False  # for the pooled gemv, which takes the packing as a flag
    block_n: bool = False  # the int4pack kernels take the layout's block width after the group size


def _families() -> dict:
    return {
        "gptq4": Family(("qweight", "qzeros", "scales"), kernels.gptq4_gemv, kernels.gptq4_mm, kernels.gptq4_mm_lora),
        "awq4": Family(("qweight", "qzeros", "scales"), kernels.awq4_gemv, kernels.awq4_mm, kernels.awq4_mm_lora, awq=True),
        "int4pack": Family(("qweight", "scales", "qpass_zero_codes"), None, kernels.int4pack_mm, kernels.int4pack_mm_lora,
                           block_n=True),
    }


def family(site) -> Optional[str]:
    """The kernel family that reads `site`'s buffers as they are, if the kernels are built here."""
    info = site.info
    found = info.layout.cpp_family(info, named(info, site.base_tensors()))
    return found if found is not None and kernels.available() else None


def gemv_reads(site, fam: Optional[str]) -> bool:
    """The gemv kernel takes GPTQ, and AWQ with the group a multiple of 8 (its words hold 8 columns)."""
    return fam == "gptq4" or (fam == "awq4" and site.info.group % 8 == 0)


def call(sites, fam: str, x, bases, lowering: str, extras=None, pool=None) -> list:
    """The base outputs of `sites` (siblings reading x) from the kernel `lowering` on their own buffers: one
    call for siblings with the same group size (output columns concatenated), else one call per site (also for
    act-order sites in the int4pack layout: each has its own input permutation). `fam`: the sites' kernel
    family, decided when the graph is lowered (`family` reads the buffers, which a trace must not).

    `extras`, per site: (A, B, scaling) of a low-rank adapter the kernel computes in the call, or (t, w): t
    (..., r) and w (r, N) in x's dtype whose product the GEMM adds (the up-projection folded in). `pool`
    (gemv-cpu): (data, scalings, entries), the adapters read from the model's adapter pool (qpass.pool)."""
    own = [named(s.info, b) for s, b in zip(sites, bases)]
    groups = {s.info.group for s in sites}
    if len(sites) > 1 and (len(groups) > 1 or any("ret_idx" in n for n in own)):
        return [call([s], fam, x, [b], lowering, None if extras is None else [extras[i]],
                     None if pool is None else (pool[0], pool[1], [pool[2][i]]))[0]
                for i, (s, b) in enumerate(zip(sites, bases))]
    fam = _families()[fam]
    h = x.reshape(-1, sites[0].info.in_features)
    if "ret_idx" in own[0]:  # act-order int4pack: the codes' rows are in the permuted input order
        h = h.index_select(-1, own[0]["ret_idx"].long())
    weights = [[n[b] for n in own] for b in fam.buffers]
    shape = (groups.pop(),) + ((int4pack_block_n(),) if fam.block_n else ())
    low_rank = extras is not None and len(extras[0]) == 3
    if pool is not None:
        data, scalings, entries = pool
        y = kernels.gemv_pooled(fam.awq, h, *weights, *shape, data, scalings, [i for e in entries for i in e.ints()])
    elif lowering == "gemv-cpu":
        y = fam.gemv(h, *weights, *shape, *_extra_args(extras, h))
    else:
        y = (fam.mm_lora if low_rank else fam.mm)(h, *weights, *shape, *_extra_args(extras, h))
    y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
    outs = y.split([s.info.out_features for s in sites], -1) if len(sites) > 1 else [y]
    return [add_bias(s, o, b) for s, o, b in zip(sites, outs, bases)]


def _extra_args(extras, h) -> tuple:
    if extras is None:
        return ()
    if len(extras[0]) == 3:  # (A, B, scaling) per site
        return tuple(list(part) for part in zip(*extras))
    return ([t.reshape(h.shape[0], -1) for t, _ in extras], [w for _, w in extras])


class CppBase(Base):
    """Sibling bases in one kernel call; with `takes_low_rank`, their adapters in that call too."""

    fused = True

    def __init__(self, sites, lowering: str, low_rank: bool, folded_up: bool):
        self.sites, self.lowering = sites, lowering
        fams = {family(s) for s in sites}
        if len(fams) != 1 or None in fams:
            raise ValueError(f"qpass: {lowering} cannot take {[s.path for s in sites]} together (kernel families {fams})")
        self.family = fams.pop()
        self.constants = []
        self.takes_low_rank = low_rank
        self.takes_folded_up = folded_up
        self.reads_pool = lowering == "gemv-cpu" and low_rank

    def __call__(self, x, bases, kernel):
        return call(self.sites, self.family, x, bases, self.lowering)

    def low_rank(self, x, bases, adapters):
        return call(self.sites, self.family, x, bases, self.lowering, adapters)

    def folded_up(self, x, bases, ups):
        return call(self.sites, self.family, x, bases, self.lowering, ups)

    def pooled(self, x, bases, data, scalings, entries):
        return call(self.sites, self.family, x, bases, self.lowering, pool=(data, scalings, entries))


def _cpu_act(x) -> bool:
    return x.device.type == "cpu" and x.dtype in _ACT_DTYPES


class GemvCpu:
    name = "gemv-cpu"
    label = "gemv-cpu (library layout, no copy)"
    shares_bare_call = True  # siblings with no active adapter: one call for their bases

    def accepts(self, site, x, needs_grad) -> bool:
        return x.device.type == "cpu" and gemv_reads(site, family(site))

    def applies(self, site, x, needs_grad) -> bool:
        return _cpu_act(x) and decode(x, needs_grad) and gemv_reads(site, family(site))

    def base(self, sites, needs_grad, switches) -> Base:
        # decode steps take each site's whole adapter into the call: t = x A^T for all siblings, then
        # scaling * t B^T added to each column block's float32 accumulator before its one store
        return CppBase(sites, self.name, low_rank=self.reads_pool(needs_grad, switches), folded_up=False)

    def reads_pool(self, needs_grad, switches) -> bool:
        """The kernel reads each adapter at its offsets in the model's adapter pool (qpass.pool)."""
        return switches.gemv_low_rank and not needs_grad


class DequantCpu:
    name = "dequant-cpu"
    label = "dequant-cpu (C++ unpack + GEMM, no copy)"
    shares_bare_call = True

    def accepts(self, site, x, needs_grad) -> bool:
        return x.device.type == "cpu" and family(site) is not None

    def applies(self, site, x, needs_grad) -> bool:
        """Prefill and training; also fp32/fp16 decode where gemv-cpu does not apply (bf16 decode of a
        layout gemv cannot read goes to aten's int4 kernel)."""
        if not _cpu_act(x):
            return False
        fam = family(site)
        return fam is not None and (gemv_reads(site, fam) or not decode(x, needs_grad) or x.dtype != torch.bfloat16)

    def base(self, sites, needs_grad, switches) -> Base:
        # graphs that need no gradient fold the up-projection into the GEMM: its input is [x | t] and each
        # unpacked weight chunk gets (s B)^T's columns as r more rows, one float32 accumulation, one rounding.
        # The whole adapter goes into the call (t = x A^T computed there too), except for act-order weights in
        # the int4pack layout, whose x is permuted for the codes but not for A.
        fold = switches.fold_up and not needs_grad
        permuted = any("ret_idx" in s.info.buffers for s in sites)
        return CppBase(sites, self.name, low_rank=fold and not permuted, folded_up=fold)
