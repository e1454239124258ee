"""QA-LoRA: LoRA on group-pooled inputs. y' = y + lora_B(lora_A(pool_G(dropout(x)) * (in // G))) * scaling.

PEFT's `QALoraLinearVariant`: the input is split into contiguous groups of G = `qalora_group_size` features,
each group averaged, the pooled vector multiplied by the number of groups; `lora_A` is (r, in_features // G).
Selected by `LoraConfig(use_qalora=True)`. Scaling, rsLoRA, dropout and the dtype policy (`adapter`) are LoRA's.

Deliberate difference: with `lora_bias=True`, PEFT creates `lora_B.bias` but its QA-LoRA forward ignores it
(the bias never trains and stays at its zero init); qpass adds it, as plain LoRA does. PEFT files load as they
are (their bias is zero).
"""

import torch.nn.functional as F

from qpass.config import LoraConfig
from qpass.errors import QpassError
from qpass.spec import AdapterSpec, LowRank, Param, register

from .lora import init_A, init_B, scaling


def params(site, cfg):
    p = {
        "lora_A.weight": Param((cfg.r, site.in_features // cfg.qalora_group_size), init_A(cfg)),
        "lora_B.weight": Param((site.out_features, cfg.r), init_B(cfg)),
    }
    if cfg.lora_bias:
        p["lora_B.bias"] = Param((site.out_features,), lambda t: t.zero_())
    return p


def pool_groups(x, a):
    """What lora_A reads: x averaged over contiguous groups of in_features // a.shape[1] features, times the
    number of groups (PEFT's order of operations)."""
    groups = a.shape[1]
    return x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups).mean(dim=-1) * groups


def compute(x, p):
    a = p["lora_A.weight"]
    return F.linear(F.linear(pool_groups(x, a), a), p["lora_B.weight"], p.get("lora_B.bias")) * p["scaling"]


def _divisors_near(n, g):
    return sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - g), -d))


def check(site, cfg):
    if cfg.use_dora:
        raise NotImplementedError(f"{site.path}: DoRA and QA-LoRA at the same time are not supported (as in PEFT); set use_dora=False")
    G = cfg.qalora_group_size
    if site.in_features % G:
        hint = site.group_size if site.group_size > 0 and site.in_features % site.group_size == 0 else _divisors_near(site.in_features, G)[0]
        raise QpassError(
            f"{site.path}: qalora_group_size={G} does not divide in_features={site.in_features}; "
            f"use e.g. qalora_group_size={hint}" + (" (the layer's quantization group size)" if hint == site.group_size else "")
        )


SPEC = register(
    AdapterSpec(
        name="qalora",
        config=LoraConfig,
        applies=lambda cfg: cfg.use_qalora,
        attach="output",
        dtype_policy="adapter",
        params=params,
        constants=scaling,
        compute=compute,
        dropout=lambda cfg: cfg.lora_dropout,
        check=check,
        description="QA-LoRA (group-pooled LoRA)",
        # LoRA on pool_groups(x): sibling fusion and the fold into dequant-cpu's GEMM (t computed in the graph);
        # not the kernels that compute x A^T themselves, nor the adapter pool (A is narrower than x)
        low_rank=LowRank(a="lora_A.weight", b="lora_B.weight", scaling="scaling", bias="lora_B.bias",
                         down_input=pool_groups),
    )
)
