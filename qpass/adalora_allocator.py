"""AdaLoRA's adaptive rank: PEFT's `RankAllocator` on a qpass-prepared model, and the orthogonality regulariser.

    loss = model(**batch).loss + qpass.orthogonal_regularization(model)   # PEFT adds this inside forward
    loss.backward(); optimizer.step()
    qpass.update_and_allocate(model, global_step)                         # after step(), before zero_grad()
    optimizer.zero_grad()

The allocator follows PEFT's `RankAllocator` step for step: per-entry sensitivity |p * grad| smoothed by an EMA
(beta1) and its uncertainty by another (beta2); a triplet's score is E's score plus the mean scores of its row
of A and column of B; a cubic budget schedule from sum(init_r) to target_r × sites between `tinit` and
`total_step - tfinal`; every `deltaT` steps the lowest-scoring triplets get `lora_E = 0`. Masking writes into
`lora_E` in place and the budget is plain Python, so neither ever recompiles a compiled model. The resulting
rank pattern is kept on the adapter's config as PEFT keeps it, so `qpass.save_adapter` writes it (and drops
the pruned ranks from the saved tensors) exactly as `PeftModel.save_pretrained` does.

One deliberate difference: where PEFT's `torch.kthvalue(k=0)` raises (a budget equal to the initial one while a
mask is due, e.g. init_r == target_r), qpass keeps every rank.
"""

from __future__ import annotations

import torch

from .config import AdaLoraConfig
from .errors import QpassError
from .state import state_of, unwrap

_ALLOCATORS_ATTR = "_qpass_rank_allocators"
_NAMES = ("lora_A", "lora_B", "lora_E")


class RankAllocator:
    """PEFT's RankAllocator over the AdaLoRA slots of one adapter (path -> AdapterSlot)."""

    def __init__(self, cfg: AdaLoraConfig, slots: dict):
        self.cfg = cfg
        self.slots = dict(slots)
        self.beta1, self.beta2 = cfg.beta1, cfg.beta2
        self.init_bgt = sum(slot.get("lora_A").shape[0] for slot in self.slots.values())
        self.target_bgt = cfg.target_r * len(self.slots)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def _params(self):
        for path, slot in self.slots.items():
            for name in _NAMES:
                yield (path, name), slot.get(name)

    def budget_schedule(self, step: int) -> tuple:
        cfg = self.cfg
        if step <= cfg.tinit:
            return self.init_bgt, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % cfg.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        for key, p in self._params():
            if p.grad is None:
                raise QpassError(
                    f"{key[0]}.{key[1]} has no gradient; call qpass.update_and_allocate after loss.backward() "
                    "and before optimizer.zero_grad()"
                )
            if key not in self.ipt:
                self.ipt[key] = torch.zeros_like(p)
                self.exp_avg_ipt[key] = torch.zeros_like(p)
                self.exp_avg_unc[key] = torch.zeros_like(p)
            self.ipt[key] = (p * p.grad).abs().detach()
            self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * self.ipt[key]
            self.exp_avg_unc[key] = (
                self.beta2 * self.exp_avg_unc[key] + (1 - self.beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()
            )

    def _score(self, key) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict:
        triplet = {}
        for path in self.slots:
            ipt_a = torch.mean(self._score((path, "lora_A")), dim=1, keepdim=True)
            ipt_b = torch.mean(self._score((path, "lora_B")), dim=0, keepdim=False).view(-1, 1)
            ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1, keepdim=False)
            triplet[path] = (self._score((path, "lora_E")).view(-1) + ipt_ab.view(-1)).view(-1, 1)
        k = self.init_bgt - budget
        if k > 0:
            threshold = torch.kthvalue(torch.cat([t.view(-1) for t in triplet.values()]), k=k)[0].item()
        else:
            threshold = float("-inf")
        rank_pattern = {}
        for path, slot in self.slots.items():
            drop = triplet[path] <= threshold
            slot.get("lora_E").masked_fill_(drop, 0.0)
            rank_pattern[f"{path}.lora_E"] = (~drop).view(-1).tolist()
        return rank_pattern

    def update_and_allocate(self, global_step: int, force_mask: bool = False):
        if global_step < self.cfg.total_step - self.cfg.tfinal:
            self.update_ipt()
        budget, mask_ind = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(budget) if (mask_ind or force_mask) else None
        return budget, rank_pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, rank_pattern: dict) -> None:
        for path, slot in self.slots.items():
            mask = self.cfg.site_mask(path)
            if mask is None:
                continue
            lora_e = slot.get("lora_E")
            keep = torch.tensor(mask, dtype=torch.bool, device=lora_e.device).unsqueeze(-1)
            lora_e.masked_fill_(~keep, 0.0)


def _adalora_adapter(state, adapter_name):
    names = [n for n, c in state.configs.items() if isinstance(c, AdaLoraConfig)]
    if adapter_name is not None:
        if adapter_name not in names:
            raise QpassError(f"adapter {adapter_name!r} is not an AdaLoRA adapter of this model; AdaLoRA adapters: {names}")
        return adapter_name, state.configs[adapter_name]
    if len(names) != 1:
        raise QpassError(
            f"this model has {len(names)} AdaLoRA adapters ({names}); "
            + ("prepare it with a qpass.AdaLoraConfig" if not names else "pass adapter_name=")
        )
    return names[0], state.configs[names[0]]


def _slots(state, adapter_name) -> dict:
    return {path: site.slots[adapter_name] for path, site in state.sites.items() if adapter_name in site.slots}


def allocator(model, adapter_name=None) -> RankAllocator:
    """The model's rank allocator for its AdaLoRA adapter (created on first use, as PEFT creates it with the model)."""
    state = state_of(model)
    name, cfg = _adalora_adapter(state, adapter_name)
    owner = unwrap(model)
    allocators = owner.__dict__.setdefault(_ALLOCATORS_ATTR, {})
    if name not in allocators:
        allocators[name] = RankAllocator(cfg, _slots(state, name))
    return allocators[name]


def update_and_allocate(model, global_step: int, *, adapter_name=None):
    """One AdaLoRA budget step (PEFT's `AdaLoraModel.update_and_allocate`): update the importance scores, and
    every `deltaT` steps mask `lora_E` down to the scheduled budget. Call after `optimizer.step()`, before
    `zero_grad()`. Returns the current rank pattern (`{"<path>.lora_E": [kept?, ...]}`) or None before the first mask."""
    alloc = allocator(model, adapter_name)
    cfg = alloc.cfg
    final = cfg.total_step - cfg.tfinal
    if global_step < final:
        _, rank_pattern = alloc.update_and_allocate(global_step)
        if rank_pattern:
            cfg.rank_pattern = rank_pattern
    elif global_step == final:
        _, rank_pattern = alloc.update_and_allocate(global_step, force_mask=True)
        cfg.rank_pattern = rank_pattern
        alloc.reset_ipt()
    elif cfg.rank_pattern:
        alloc.mask_using_rank_pattern(cfg.rank_pattern)
    return cfg.rank_pattern


def orthogonal_regularization(model, *, adapter_name=None) -> torch.Tensor:
    """`orth_reg_weight` × mean over A and B matrices of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F: the term PEFT's
    AdaLoraModel adds to `outputs.loss`. Add it to the loss before `backward()`."""
    state = state_of(model)
    name, cfg = _adalora_adapter(state, adapter_name)
    total, count = 0, 0
    for slot in _slots(state, name).values():
        for key in ("lora_A", "lora_B"):
            p = slot.get(key)
            cov = p @ p.T if key == "lora_A" else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    if count:
        total = total / count
    return cfg.orth_reg_weight * total
