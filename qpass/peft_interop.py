"""PEFT models handed to qpass: `from_peft` takes their adapters over; `prepare` and `report` refuse them.

A `peft.PeftModel` has already replaced each targeted layer by PEFT's adapter layer (e.g. `GPTQLoraLinear`)
around the quantized one. qpass preparing that model would attach its own adapter under PEFT's, and the
two would run stacked: different logits, silently. `from_peft` instead reads PEFT's adapters (configs and
weights), gets the base model back with its original quantized layers (`unload()`), and attaches the same
adapters with qpass, through the same loading and validation code as an adapter directory.

`peft` is imported lazily: it is an optional dependency, and a model can only hold PEFT's layers if it is
already imported.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Optional

import torch
from torch import nn

from . import adapter_io, lifecycle, quant
from .config import to_config
from .errors import QpassError
from .prepare import check_options, plan_adapter, prepare, unprepare
from .quant import QuantInfo, Unsupported
from .state import state_of
from .targeting import discover


def peft_layers(model: nn.Module) -> Optional[str]:
    """None, or what makes `model` a PEFT model (a `PeftModel`, a PEFT tuner, or a model holding PEFT's
    adapter layers), in words, for an error message."""
    peft = sys.modules.get("peft")
    if peft is None or not isinstance(model, nn.Module):
        return None
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    kinds = tuple(c for c in (getattr(peft, "PeftModel", None), getattr(peft, "PeftMixedModel", None)) if c is not None)
    if isinstance(model, kinds):
        return f"{type(model).__name__} is a PEFT model (peft.PeftModel)"
    if isinstance(model, BaseTuner):
        return f"{type(model).__name__} is a PEFT tuner model"
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            return f"{type(model).__name__} holds PEFT adapter layers ({path}: {type(module).__name__})"
    return None


def _under(path: str, prefixes: dict) -> bool:
    """Whether `path` lies strictly inside one of the modules named in `prefixes`."""
    while "." in path:
        path = path.rsplit(".", 1)[0]
        if path in prefixes:
            return True
    return False


def _base_view(model: nn.Module, tuners: dict) -> list:
    """(path, module) of `model` as it will be once PEFT unloads: each adapter layer is its base layer and
    PEFT's own submodules (base_layer, lora_A, ...) are not there."""
    return [(path, tuners[path].get_base_layer() if path in tuners else module)
            for path, module in model.named_modules() if not _under(path, tuners)]


def _adapted(tuners: dict, name: str) -> list:
    """The modules where PEFT holds adapter `name`."""
    return sorted(path for path, layer in tuners.items()
                  if any(name in getattr(layer, attr, ()) for attr in layer.adapter_layer_names))


def _unload(model: nn.Module, tuners: dict) -> None:
    """PEFT's `unload()` (no merge) for adapter layers around quantized linear layers: each adapter layer is
    replaced by its base layer, and the model's `peft_config` attribute goes. PEFT's own `unload()` cannot be
    used for every kind: OFT's (BaseTuner._replace_module) assigns `weight` to the base layer, a read-only
    property of gptqmodel's layers, and raises half-way, with some layers already unloaded."""
    _put(model, tuners, lambda layer: layer.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.peft_config


def _put(model: nn.Module, tuners: dict, module_for) -> None:
    """Set `module_for(layer)` in place of each outermost PEFT adapter layer (`tuners`: path -> layer)."""
    for path, layer in tuners.items():
        if not _under(path, tuners):
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, module_for(layer))


def _owned(param_name: str, name: str) -> bool:
    return f".{name}." in param_name or param_name.endswith(f".{name}")


def from_peft(peft_model, **prepare_kwargs) -> nn.Module:
    """Take the adapters of a `peft.PeftModel` over with qpass; returns the base model, prepared.

    Every adapter PEFT holds (`peft_model.peft_config`) is read with its weights
    (`peft.get_peft_model_state_dict`) and checked against the base model, as an adapter directory would be,
    before anything changes. Then PEFT's adapter layers are unloaded (as `peft_model.unload()` does) to give
    the base model back with its original quantized layers, the active adapter is attached with
    `qpass.prepare(base, ..., **prepare_kwargs)` (adapter_dtype, max_rank, base_layout), the others with
    `qpass.load_adapter`; PEFT's adapter names are kept, PEFT's active adapters are active, and each adapter
    trains (requires_grad) as it did in PEFT. The logits are PEFT's. Use the returned model: `peft_model` no
    longer holds adapters. If attaching fails, PEFT's layers are put back.

    Only what qpass serves is taken over: adapters of kinds qpass implements (LoRA, QA-LoRA, AdaLoRA, OFT),
    on quantized layers it recognises; anything else (an adapter on a plain nn.Linear, modules_to_save, an
    adapter merged into the weights) raises a QpassError naming it, with the PEFT model left as it was.
    AdaLoRA's allocator statistics are not carried over (its rank pattern and masked weights are).
    """
    _check_call(peft_model, prepare_kwargs)
    from peft.tuners.tuners_utils import BaseTunerLayer

    # ---- everything that can be checked, before PEFT's model changes ------------------------------------
    model = peft_model.base_model.model  # the user's model, PEFT's layers in it
    if getattr(model, "_qpass", None) is not None:
        raise QpassError("the model under this PeftModel is already prepared by qpass; unprepare it first")
    names = list(peft_model.peft_config)
    active = [n for n in peft_model.active_adapters if n in names] or names[:1]
    tuners = {path: m for path, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    merged = sorted(path for path, layer in tuners.items() if layer.merged)
    if merged:
        raise QpassError(f"{merged[0]}: PEFT has merged adapter(s) into this layer's weights; call "
                         "peft_model.unmerge_adapter() before qpass.from_peft")
    view = _base_view(model, tuners)
    adapters = {name: _read_adapter(peft_model, name, tuners, view, prepare_kwargs) for name in names}
    trainable = {name: any(p.requires_grad for pn, p in model.named_parameters() if _owned(pn, name)) for name in names}

    # ---- the takeover --------------------------------------------------------------------------------
    config = model.__dict__.get("peft_config")
    _unload(model, tuners)
    try:
        _attach(model, names, active, adapters, trainable, prepare_kwargs)
    except BaseException:
        _reload(model, tuners, config)  # PEFT's model as it was
        raise
    return model


def _check_call(peft_model, prepare_kwargs: dict) -> None:
    """`from_peft`'s arguments: a PeftModel, and keyword arguments `prepare` takes (its adapter name aside)."""
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a test extra
        raise QpassError("qpass.from_peft needs the `peft` package (pip install peft)") from exc
    if isinstance(peft_model, torch._dynamo.eval_frame.OptimizedModule):
        raise QpassError("this PEFT model is wrapped by torch.compile; pass the original module "
                         "(peft_model._orig_mod) to qpass.from_peft, then compile the model it returns")
    if not isinstance(peft_model, peft.PeftModel):
        found = peft_layers(peft_model)
        hint = (f" ({found}; wrap it in a peft.PeftModel or unload PEFT first)" if found is not None
                else "; for a model without PEFT adapters use qpass.prepare(model, config)")
        raise QpassError(f"qpass.from_peft takes a peft.PeftModel; got {type(peft_model).__name__}{hint}")
    allowed = [n for n, p in inspect.signature(prepare).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "adapter_name"]
    if "adapter_name" in prepare_kwargs:
        raise QpassError("qpass.from_peft keeps PEFT's adapter names; do not pass adapter_name")
    unknown = sorted(set(prepare_kwargs) - set(allowed))
    if unknown:
        raise QpassError(f"qpass.from_peft: unknown argument(s) {unknown}; it passes {allowed} to qpass.prepare")
    for name in peft_model.peft_config:
        if not isinstance(name, str) or not name.isidentifier():
            raise QpassError(f"PEFT adapter {name!r}: qpass adapter names must be Python identifiers; "
                             "load the adapter into PEFT under such a name")
        check_options(name, prepare_kwargs.get("max_rank"), prepare_kwargs.get("base_layout", "library"))


def _read_adapter(peft_model, name: str, tuners: dict, view: list, prepare_kwargs: dict) -> adapter_io.InMemoryAdapter:
    """PEFT adapter `name` as qpass will load it (config and weights), checked against the model as it will
    be without PEFT's layers (`view`, from `_base_view`): raises naming what qpass cannot serve."""
    from peft import get_peft_model_state_dict

    model = peft_model.base_model.model
    source = f"PEFT adapter {name!r}"
    # the state dict first: for AdaLoRA it also drops the adapter name from the config's rank_pattern keys,
    # as PEFT's save_pretrained does
    weights = adapter_io.strip_prefix(get_peft_model_state_dict(peft_model, adapter_name=name,
                                                                save_embedding_layers=False))
    try:
        cfg = to_config(peft_model.peft_config[name])
    except QpassError as exc:
        raise QpassError(f"{source}: {exc}") from exc
    adapted = _adapted(tuners, name)
    for path in adapted:
        base = tuners[path].get_base_layer()
        info = quant.match(base)
        if not isinstance(info, QuantInfo):
            why = info.reason if isinstance(info, Unsupported) else "not a quantized linear layer"
            raise QpassError(
                f"{source} adapts {path} ({type(base).__name__}: {why}); qpass serves adapters on "
                "GPTQ/AWQ quantized linear layers only, so taking it over would silently drop that part of it"
            )
    found = {c.path for c in discover(model, cfg, modules=view) if c.targeted and isinstance(c.info, QuantInfo)}
    if found != set(adapted):
        # PEFT's matching (e.g. of layers_to_transform) picked other layers than qpass's would: name them
        cfg = dataclasses.replace(cfg, target_modules=adapted, layers_to_transform=None, layers_pattern=None,
                                  exclude_modules=None)
    adapter = adapter_io.InMemoryAdapter(cfg, weights, source)
    plan_adapter(model, adapter, prepare_kwargs.get("adapter_dtype", torch.float32), prepare_kwargs.get("max_rank"),
                 modules=view)  # raises naming what does not fit
    return adapter


def _attach(base, names, active, adapters, trainable, prepare_kwargs) -> None:
    left = peft_layers(base)
    if left is not None:  # e.g. a tuner layer nested in another, or one PEFT holds outside its adapter layers
        raise QpassError(f"qpass.from_peft: after unloading PEFT's adapter layers, {left}")
    first = active[0]
    prepare(base, adapters[first], adapter_name=first, **prepare_kwargs)
    try:
        for name in names:
            if name != first:
                lifecycle.load_adapter(base, adapters[name], name)  # via the module: a test interrupts it there
        if active != [first]:
            lifecycle.set_adapter(base, active)
        for site in state_of(base).sites.values():
            for name, slot in site.slots.items():
                slot.requires_grad_(trainable[name])
    except BaseException:
        unprepare(base)
        raise


def _reload(model: nn.Module, tuners: dict, config) -> None:
    """Undo `_unload`: PEFT's adapter layers back where they were."""
    _put(model, tuners, lambda layer: layer)
    if config is not None:
        model.peft_config = config
