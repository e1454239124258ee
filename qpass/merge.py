"""`merge`: fold the active adapters into the quantized weights, so each site is a plain quantized layer again.

One method for every adapter kind: a prepared site computes an affine map x -> W_eff x + b_eff (LoRA,
QA-LoRA, AdaLoRA and OFT are all linear in x once dropout is off), so W_eff and b_eff are read off by
probing the site's own math (base in plain torch, fp32) with the identity and with zero. W_eff is then
requantised onto the layer's own grid (same bits, group size, g_idx, symmetry): per (group, output) the
better of (a) the existing scale/zero with the codes re-rounded — exact wherever the adapter did not move a
weight — and (b) a fresh round-to-nearest scale/zero. The error per site (max |ΔW|, and ‖ΔW‖ relative to
‖W_eff‖ and to the adapter's own ‖W_eff − W‖) is measured on the repacked layer and reported; the merge
refuses, naming the sites, when the relative error exceeds `max_rel_error`.

Repacking is the layout's (`Layout.merge_grid` / `merge_repack`): today gptqmodel layers holding GPTQ
packing, through gptqmodel's own `pack_block`.
"""

from __future__ import annotations

import os
import re
import types
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import resident, transaction
from .errors import QpassError
from .prepare import state_of, unprepare, unwrap


@dataclass
class MergeRow:
    module: str
    adapters: str
    max_abs_error: float
    rel_error: float  # ‖W_merged − W_eff‖ / ‖W_eff‖
    rel_to_adapter: float  # ‖W_merged − W_eff‖ / ‖W_eff − W_base‖ (how much of the adapter's change is lost)
    method: str


class MergeReport(list):
    def to_dict(self) -> list:
        return [asdict(r) for r in self]

    def __str__(self) -> str:
        from tabulate import tabulate

        rows = [[r.module, r.adapters, f"{r.max_abs_error:.3g}", f"{r.rel_error:.3g}", f"{r.rel_to_adapter:.3g}", r.method] for r in self]
        return tabulate(rows, headers=["module", "adapters", "max |ΔW|", "‖ΔW‖/‖W‖", "‖ΔW‖/‖adapter‖", "merged by"])


@torch.no_grad()
def effective_weight(site, names: tuple) -> tuple:
    """(W (in, out), b (out,)) of the site's affine map with adapters `names` active, in fp32."""
    info = site.info
    base = [t for t in site.base_tensors()]
    eye = torch.eye(info.in_features, dtype=torch.float32, device=base[0].device)
    zero = torch.zeros(1, info.in_features, dtype=torch.float32, device=base[0].device)
    adapter = [t for n in names for t in site.slots[n].tensors()]

    def run(x):
        xa = site.adapter_inputs(x, names, False, None)
        return site.run(x, xa, base, adapter, names, site.torch_base).float()

    b = run(zero)[0]
    return run(eye) - b, b


def _requantize(W: torch.Tensor, scales, zeros, g_idx, bits: int, sym: bool):
    """Choose per (group, out) between the existing grid (codes re-rounded) and fresh RTN; returns (scales, zeros)."""
    maxq = 2**bits - 1
    new_s, new_z = scales.clone(), zeros.clone()
    for g in range(scales.shape[0]):
        rows = W[g_idx == g]  # (n_g, out)
        if rows.numel() == 0:
            continue
        s_old = scales[g].half().float()
        z_old = zeros[g]
        lo, hi = rows.amin(0).clamp(max=0), rows.amax(0).clamp(min=0)
        if sym:
            s_new = (2 * torch.maximum(lo.abs(), hi) / maxq).clamp(min=1e-6).half().float()
            z_new = torch.full_like(s_new, (maxq + 1) // 2)
        else:
            s_new = ((hi - lo) / maxq).clamp(min=1e-6).half().float()
            z_new = torch.round(-lo / s_new).clamp(0, maxq)

        def err(s, z):
            q = torch.clamp(torch.round(rows / s + z), 0, maxq)
            return ((s * (q - z) - rows) ** 2).sum(0)

        use_new = err(s_new, z_new) < err(s_old, z_old)
        new_s[g] = torch.where(use_new, s_new, s_old)
        new_z[g] = torch.where(use_new, z_new, z_old)
    return new_s, new_z


def _fake_quant(W, scales, zeros, g_idx, bits):
    maxq = 2**bits - 1
    s, z = scales[g_idx], zeros[g_idx]
    return s * (torch.clamp(torch.round(W / s + z), 0, maxq) - z)


def merge(model: nn.Module, *, max_rel_error: float = 0.05, max_adapter_loss: float = 0.5) -> nn.Module:
    """Fold the active adapters into the quantized weights and remove qpass from the model (in place; returns
    the plain model, no longer prepared). `model.qpass_merge_report` holds the per-site errors.

    Refuses, naming the sites and leaving the model as it was, when a site's merged weight would differ from
    the adapted one by more than `max_rel_error` (relative to ‖W_eff‖), or would lose more than
    `max_adapter_loss` of the adapter's own change ‖W_eff − W‖ (an adapter finer than the quantization step
    would otherwise be rounded away silently)."""
    state = state_of(model)
    with transaction.changing(unwrap(model), "merge"):  # refused or interrupted: as it was, int4pack layout included
        for site in state.sites.values():  # base_layout="int4pack": merge onto the library's own layout and grid
            resident.restore(site)
        return _merge(model, state, max_rel_error, max_adapter_loss)


def _merge(model, state, max_rel_error: float, max_adapter_loss: float) -> nn.Module:
    base_model = unwrap(model)
    plans = []
    for path, site in state.sites.items():
        names = site.active_names()
        if not names:
            continue
        grid = site.info.layout.merge_grid(site)
        if grid is None:
            raise QpassError(f"{path}: merging into {site.info.cls_name} ({site.info.library}, layout {site.info.layout.name}) "
                             "is not supported: the layout cannot requantize in place. Merge works on gptqmodel "
                             "GPTQ-packed layers (TorchLinear, TorchCpuAvx512Linear, ... before any repack)")
        repack = site.info.layout.merge_repack
        W0, b0 = effective_weight(site, ())
        W1, b1 = effective_weight(site, names)
        scales, zeros, g_idx = grid
        new_s, new_z = _requantize(W1, scales, zeros, g_idx, site.info.bits, bool(site.info.sym))
        err = _fake_quant(W1, new_s, new_z, g_idx, site.info.bits) - W1
        rel = (err.norm() / W1.norm().clamp(min=1e-12)).item()
        delta = (W1 - W0).norm().item()
        loss = (err.norm() / (W1 - W0).norm()).item() if delta > 0 else 0.0
        plans.append((path, site, names, W0, W1, b0, b1, new_s, new_z, g_idx, repack, rel, loss))
    if not plans:
        raise QpassError("no active adapter to merge; call qpass.set_adapter(model, name) first")
    bad = [(p[0], p[-2], p[-1]) for p in plans if p[-2] > max_rel_error or p[-1] > max_adapter_loss]
    if bad:
        listed = ", ".join(f"{path} (error {rel:.3g} of the weight, {loss:.0%} of the adapter lost)" for path, rel, loss in bad[:5])
        raise QpassError(
            f"merging would change {len(bad)} site(s) by more than max_rel_error={max_rel_error} or lose more than "
            f"max_adapter_loss={max_adapter_loss} of the adapter: {listed}; the adapter is too fine for this bit width — "
            "keep it unmerged, or pass larger limits"
        )
    report = MergeReport()
    for path, site, names, W0, W1, b0, b1, new_s, new_z, g_idx, repack, _, _ in plans:
        had_bias = getattr(site.module, "bias", None) is not None
        bias = b1 if (had_bias or b1.abs().max() > 0) else None
        repack(site, W1, bias, new_s, new_z, g_idx)
        W_new, _ = effective_weight(site, ())
        diff = W_new - W1
        report.append(MergeRow(path, ",".join(names), diff.abs().max().item(), (diff.norm() / W1.norm()).item(),
                               (diff.norm() / (W1 - W0).norm().clamp(min=1e-12)).item(), "requantize (same grid or RTN per group)"))
    unprepare(base_model)
    base_model.qpass_merge_report = report
    return base_model


def save_quantized(model: nn.Module, path, **save_pretrained_kwargs) -> None:
    """`model.save_pretrained(path)` for a merged (or plain) gptqmodel-quantized transformers model, writing
    GPTQ zero points in the on-disk "v1" form (zero − 1) that `from_pretrained` expects.

    transformers 5.23 + gptqmodel 7.7 save the in-memory "v2" zero points as they are, so a plain
    save_pretrained → from_pretrained round trip of a GPTQ checkpoint shifts every zero point by one, with no
    qpass involved (the logits change visibly). This converts, saves, and restores.

    All or nothing (`adapter_io.replacing_dir`): the checkpoint is written into a temporary folder beside
    `path` and renamed into place, so if saving fails (a full disk, Ctrl-C) a checkpoint already at `path` is
    left exactly as it was. Files of an existing folder that this save does not write are kept (a tokenizer, a
    README), except weight files of an earlier save (`model*.safetensors`, `pytorch_model*.bin`, their
    `.index.json`), which would otherwise mix with the new weights.
    """
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    from .adapter_io import replacing_dir
    from .quant import QuantInfo, match

    model = unwrap(model)
    if getattr(model, "_qpass", None) is not None:
        raise QpassError("this model is still prepared by qpass; qpass.merge(model) or qpass.unprepare(model) first "
                         "(qpass.save_adapter saves the adapters alone)")
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else (qc or {})
    on_disk_v1 = str(qc.get("checkpoint_format", qc.get("format", ""))).lower() == "gptq" and qc.get("quant_method") == "gptq"
    if save_pretrained_kwargs.get("push_to_hub"):  # transformers names the repo after the folder: not the temporary one
        save_pretrained_kwargs.setdefault("repo_id", os.path.basename(os.path.realpath(os.fspath(path))))
    with replacing_dir(path, what="checkpoint", files="config.json and the model's weights",
                       replaced=_is_weights_file) as directory:
        saved = []
        try:
            if on_disk_v1:
                for _, module in model.named_modules():
                    info = match(module)
                    if isinstance(info, QuantInfo) and info.layout.v2_zero_points:
                        saved.append((module, module.qzeros.detach().clone()))
                        grid = types.SimpleNamespace(bits=info.bits, pack_dtype=torch.int32)
                        convert_gptq_v2_to_v1_format_module(module, grid)
            model.save_pretrained(str(directory), **save_pretrained_kwargs)
        finally:
            for module, qzeros in saved:
                module.qzeros.data.copy_(qzeros)


_WEIGHTS_FILE = re.compile(r"(model|pytorch_model|tf_model|flax_model)([-.][^/]*)?\.(safetensors|bin|h5|msgpack)(\.index\.json)?")


def _is_weights_file(name: str) -> bool:
    """A transformers weights file or shard index (what an earlier save of a checkpoint wrote)."""
    return _WEIGHTS_FILE.fullmatch(name) is not None
