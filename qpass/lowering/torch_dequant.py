"""torch-dequant: plain-torch unpack + dequantize + matmul in the activation dtype, from the layout's
`torch_forward`. Inductor fuses the dequantize into the matmul's producer; AOTAutograd derives the backward.
It takes every site, so it is the fallback of every other lowering."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..quant.layout import named
from .common import Base, cached


@dataclass
class Derived:
    """Small tensors derived once from a site's buffers for its plain-torch base (`Layout.derived`)."""

    items: list

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.items)

    def tensors(self) -> list:
        return list(self.items)


def derived_for(site) -> Optional[Derived]:
    """The site's derived tensors, made once and cached (re-made if a base buffer was replaced or changed in
    place), or None if its layout needs none."""
    info = site.info

    def make():
        items = info.layout.derived(info, named(info, site.base_tensors()))
        return None if items is None else Derived(items)

    return cached("derived", [site], make)


class TorchDequantBase(Base):
    """Each site's `torch_forward`, with its derived tensors if it has any (`derive`)."""

    lowering = "torch-dequant"

    def __init__(self, sites, derive: bool = True):
        self.sites = sites
        self.derived = [derived_for(s) if derive else None for s in sites]
        self.counts = [len(d.tensors()) if d is not None else 0 for d in self.derived]
        self.constants = [t for d in self.derived if d is not None for t in d.tensors()]

    def __call__(self, x, bases, kernel):
        ys, at = [], 0
        for site, n, base in zip(self.sites, self.counts, bases):
            ys.append(site.info.layout.torch_forward(site.info, x, list(base), *kernel[at : at + n]))
            at += n
        return ys


class TorchDequant:
    name = "torch-dequant"
    label = "torch-dequant"
    shares_bare_call = False

    def accepts(self, site, x, needs_grad) -> bool:
        return True

    def applies(self, site, x, needs_grad) -> bool:
        return True

    def base(self, sites, needs_grad, switches) -> Base:
        return TorchDequantBase(sites)
