"""LoRA: y' = y + lora_B(lora_A(dropout(x))) * scaling, with rsLoRA, lora_bias and dropout.

scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; held as a tensor so changing it never
recompiles. Parameter names are PEFT's, so PEFT adapter files load as they are. Dtype policy `adapter`
(PEFT's GPTQLoraLinear): x is cast to the adapter's dtype, the sum is formed there and cast back once.
"""

import math

import torch
import torch.nn.functional as F

from qpass.config import LoraConfig
from qpass.errors import QpassError
from qpass.spec import AdapterSpec, LowRank, Param, register


def init_A(cfg):
    if cfg.init_lora_weights == "gaussian":
        return lambda t: torch.nn.init.normal_(t, std=1 / cfg.r)
    return lambda t: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # nn.Linear's init, as PEFT


def init_B(cfg):
    if cfg.init_lora_weights is False:  # PEFT: no identity init, B keeps nn.Linear's random init
        return lambda t: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return torch.nn.init.zeros_


def params(site, cfg):
    p = {
        "lora_A.weight": Param((cfg.r, site.in_features), init_A(cfg), rank_dim=0),
        "lora_B.weight": Param((site.out_features, cfg.r), init_B(cfg), rank_dim=1),
    }
    if cfg.lora_bias:
        p["lora_B.bias"] = Param((site.out_features,), torch.nn.init.zeros_)
    return p


def scaling(site, cfg):
    return {"scaling": cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)}


def compute(x, p):
    return F.linear(F.linear(x, p["lora_A.weight"]), p["lora_B.weight"], p.get("lora_B.bias")) * p["scaling"]


def check(site, cfg):
    if cfg.use_dora:
        raise QpassError(f"{site.path}: DoRA is not supported on quantized layers (as in PEFT); set use_dora=False")


SPEC = register(
    AdapterSpec(
        name="lora",
        config=LoraConfig,
        applies=lambda cfg: not cfg.use_qalora,
        attach="output",
        dtype_policy="adapter",
        params=params,
        constants=scaling,
        compute=compute,
        dropout=lambda cfg: cfg.lora_dropout,
        check=check,
        description="LoRA / rsLoRA / lora_bias",
        low_rank=LowRank(a="lora_A.weight", b="lora_B.weight", scaling="scaling", bias="lora_B.bias"),
    )
)
