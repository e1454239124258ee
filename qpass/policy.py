"""Dtype policies: how an adapter's math is placed in dtype relative to the quantized base.

A pattern spec names its policy; the engine applies it, so every adapter kind on every quant library
gets the same, declared behaviour instead of one hand-written variant per wrapper class.

| policy                    | input to the adapter            | result                                   |
|---------------------------|---------------------------------|------------------------------------------|
| adapter                   | cast to the adapter's dtype     | added in the adapter's dtype, cast to the base output's dtype (PEFT GPTQLoraLinear) |
| adapter-unless-autocast   | as `adapter`; no casts under autocast | delta cast to the output dtype, then added (PEFT AwqLoraLinear, OFT wrappers) |
| float32                   | cast to float32 (not under autocast) | whole delta in float32, one cast at the end (PEFT SVDQuantLinear / AdaLoRA-GPTQ) |
"""

from __future__ import annotations

import torch

POLICIES = ("adapter", "adapter-unless-autocast", "float32")


def _autocasting(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def compute_dtype(policy: str, x: torch.Tensor, adapter_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the adapter's input is cast to, or None for no cast."""
    if policy == "adapter":
        return adapter_dtype
    if _autocasting(x):
        return None
    return torch.float32 if policy == "float32" else adapter_dtype


def cast_input(policy: str, x: torch.Tensor, adapter_dtype: torch.dtype) -> torch.Tensor:
    dtype = compute_dtype(policy, x, adapter_dtype)
    if dtype is None or not x.is_floating_point() or x.dtype == dtype:
        return x
    return x.to(dtype)


def add_output(policy: str, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Combine the base output `y` with an output-attached adapter's `delta`."""
    if policy == "adapter":
        # PEFT's GPTQ LoRA: the sum is formed in the promoted dtype, then cast once.
        return (y + delta).to(y.dtype)
    return y + delta.to(y.dtype)
