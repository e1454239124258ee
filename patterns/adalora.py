"""AdaLoRA: SVD-form LoRA with adaptive rank. y' = y + (dropout(x) @ (A*E)ᵀ @ Bᵀ) * scaling / (ranknum + 1e-5).

Parameters under PEFT's names: `lora_A` (r, in), `lora_E` (r, 1), `lora_B` (out, r); `scaling` (= lora_alpha,
or r if lora_alpha is 0) and `ranknum` (= init_r, never changed by PEFT) are tensors the graph reads.
Dtype policy `float32` (PEFT's `SVDQuantLinear`): x and the whole delta in fp32, one cast at the end.
Rank allocation (`qpass.update_and_allocate`) masks `lora_E` in place: see qpass/adalora_allocator.py.
A rank pattern in the config (PEFT's saved form) sizes each site at sum(mask) ranks, as PEFT loads it.
"""

import torch

from qpass.config import AdaLoraConfig
from qpass.spec import AdapterSpec, LowRank, Param, register


def site_rank(path, cfg):
    mask = cfg.site_mask(path)
    return cfg.init_r if mask is None else sum(mask)


def params(site, cfg):
    r = site_rank(site.path, cfg)
    if cfg.init_lora_weights:
        normal, zeros = (lambda t: torch.nn.init.normal_(t, 0.0, 0.02)), torch.nn.init.zeros_
    else:  # PEFT leaves torch.randn values
        normal = zeros = torch.nn.init.normal_
    return {
        "lora_A": Param((r, site.in_features), normal),
        "lora_E": Param((r, 1), zeros),
        "lora_B": Param((site.out_features, r), normal),
    }


def constants(site, cfg):
    return {"scaling": cfg.scaling(), "ranknum": float(cfg.init_r)}


def compute(x, p):
    return (x @ (p["lora_A"] * p["lora_E"]).T @ p["lora_B"].T) * p["scaling"] / (p["ranknum"] + 1e-5)


def delta_scale(p):
    """The delta's one factor, as the fused forms apply it (`compute` divides the delta by ranknum + 1e-5
    after the product: the same value up to float32 rounding)."""
    return p["scaling"] / (p["ranknum"] + 1e-5)


def export(slot, cfg):
    """PEFT's `resize_state_dict_by_rank_pattern`: keep only the ranks the allocator kept."""
    out = {n: slot.get(n) for n in slot.param_names}
    mask = cfg.site_mask(slot.shape.path)
    if mask is not None and out["lora_A"].shape[0] == len(mask) and sum(mask) != len(mask):
        keep = torch.tensor(mask, dtype=torch.bool, device=out["lora_A"].device)
        out = {"lora_A": out["lora_A"][keep], "lora_E": out["lora_E"][keep], "lora_B": out["lora_B"][:, keep]}
    return out


SPEC = register(
    AdapterSpec(
        name="adalora",
        config=AdaLoraConfig,
        attach="output",
        dtype_policy="float32",
        params=params,
        constants=constants,
        compute=compute,
        dropout=lambda cfg: cfg.lora_dropout,
        rank=lambda cfg: cfg.init_r,
        export=export,
        description="AdaLoRA (SVD-form, adaptive rank)",
        # A * E is the down-projection, read in the graph each call (rank allocation masks lora_E in place):
        # sibling fusion and the kernels that take the adapter into the call; not the adapter pool (E and
        # ranknum are not in it)
        low_rank=LowRank(a="lora_A", b="lora_B", scaling=delta_scale, bias=None, rank_scale="lora_E"),
    )
)
