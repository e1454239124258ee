"""OFT: rotate the input block-wise by an orthogonal matrix, then run the quantized base once. x' = x @ blockdiag(R).

R = Cayley(Q) per block, Q the skew-symmetric matrix whose strict upper triangle is a row of `oft_R.weight`
((blocks or 1 with block_share), b(b-1)/2): PEFT's layout, so PEFT files load. Exact Cayley (I-Q)(I+Q)⁻¹, or
PEFT's Cayley–Neumann series I + 2Q + 2Q² + … + 2Q^(n-2) + Q^(n-1) with n = num_cayley_neumann_terms.
COFT: like PEFT, before every forward the weight is projected in place onto ||Q||_F <= eps/sqrt(blocks).
Dtype policy `adapter` (PEFT ≥0.19's OFT Linear): x cast to the adapter's dtype, rotated, cast back for the base.

module_dropout (PEFT builds a MultiplicativeDropoutLayer but never calls it): qpass applies it, as PEFT's
config documents it. In training, each forward, int(module_dropout × blocks) blocks chosen at random per
site are replaced by the identity (no effect with block_share, as in PEFT's layer); in eval nothing changes.
"""

import math

import torch

from qpass.config import OFTConfig
from qpass.errors import QpassError
from qpass.spec import AdapterSpec, Param, register


def blocks(site, cfg):
    try:
        return cfg.blocks(site.in_features)
    except QpassError as exc:
        n = site.in_features
        sizes = [d for d in (2, 4, 8, 16, 32, 64, 128) if n % d == 0 and d < n]
        raise QpassError(f"{site.path}: {exc}; pick oft_block_size from {sizes} (r=0), or r dividing {n} (oft_block_size=0)") from None


def params(site, cfg):
    n_blocks, b = blocks(site, cfg)
    init = torch.nn.init.zeros_ if cfg.init_weights else (lambda t: torch.nn.init.normal_(t, 0.0, 0.1))
    return {"oft_R.weight": Param((1 if cfg.block_share else n_blocks, b * (b - 1) // 2), init)}


def constants(site, cfg):
    n_blocks, _ = blocks(site, cfg)
    if cfg.module_dropout > 0 and not cfg.block_share and n_blocks > 1:
        return {"oft_dropped": torch.zeros(n_blocks)}  # 1 = block replaced by identity this forward
    return {}


def block_size(weight):
    return int(round((1 + math.sqrt(1 + 8 * weight.shape[1])) / 2))


def skew(vec, b):
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    m = torch.zeros(vec.shape[0], b, b, device=vec.device, dtype=vec.dtype)
    m[:, rows, cols] = vec
    return m - m.transpose(-2, -1)


def cayley(weight, cfg):
    n, b = weight.shape[0], block_size(weight)
    Q = skew(weight, b)
    if cfg.use_cayley_neumann:
        R = torch.eye(b, device=weight.device, dtype=weight.dtype).repeat(n, 1, 1)
        terms = cfg.num_cayley_neumann_terms
        if terms > 1:
            R = R + 2.0 * Q
            if terms > 2:
                power = torch.bmm(Q, Q)
                R = R + 2.0 * power
                for _ in range(3, terms - 1):
                    power = torch.bmm(power, Q)
                    R = R + 2.0 * power
                R = R + torch.bmm(power, Q)
    else:
        eye = torch.eye(b, device=weight.device).unsqueeze(0).expand(n, b, b)
        R = torch.linalg.solve(eye + Q, eye - Q, left=False)
    return R.to(weight.dtype)


def coft_project(weight, eps):
    """PEFT's `_project_batch`: pull each block's skew matrix back inside the Frobenius ball of radius eps/sqrt(n)."""
    b = block_size(weight)
    Q = skew(weight, b)
    eps = eps * 1 / torch.sqrt(torch.tensor(Q.shape[0]))
    norm = torch.norm(Q, dim=(1, 2), keepdim=True)
    out = torch.where(norm <= eps, Q, eps * (Q / norm))
    rows, cols = torch.triu_indices(b, b, 1, device=weight.device)
    return out[:, rows, cols]


def before_forward(slot, training):
    cfg = slot.cfg
    with torch.no_grad():
        if cfg.coft:
            w = slot.get("oft_R.weight")
            w.copy_(coft_project(w, cfg.eps))
        if "oft_dropped" in slot.constant_names:
            mask = slot.get("oft_dropped")
            if training:
                n = mask.shape[0]
                k = int(cfg.module_dropout * n)
                fresh = torch.cat([torch.ones(k, device=mask.device), torch.zeros(n - k, device=mask.device)])
                mask.copy_(fresh[torch.randperm(n, device=mask.device)])
            else:
                mask.zero_()


def compute(x, p, cfg):
    weight = p["oft_R.weight"]
    R = cayley(weight, cfg)
    b = R.shape[-1]
    n_blocks = x.shape[-1] // b
    if R.shape[0] == 1 and n_blocks > 1:  # block_share
        R = R.repeat(n_blocks, 1, 1)
    if "oft_dropped" in p:
        m = p["oft_dropped"].to(R.dtype).view(-1, 1, 1)
        R = (1 - m) * R + m * torch.eye(b, device=R.device, dtype=R.dtype)
    xr = x.reshape(*x.shape[:-1], n_blocks, b)
    return torch.einsum("...rk,rkc->...rc", xr, R).reshape(x.shape)


SPEC = register(
    AdapterSpec(
        name="oft",
        config=OFTConfig,
        attach="input",
        dtype_policy="adapter",
        params=params,
        constants=constants,
        compute=compute,
        check=lambda site, cfg: blocks(site, cfg),
        rank=lambda cfg: cfg.r or cfg.oft_block_size,
        before_forward=before_forward,
        # what before_forward and the compute read at trace time (a hot-swap that changes one of them retraces)
        traced_config=("dtype_policy", "coft", "eps", "module_dropout", "use_cayley_neumann", "num_cayley_neumann_terms"),
        description="OFT / COFT (block-orthogonal input rotation)",
    )
)
