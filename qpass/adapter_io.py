"""PEFT adapter directories: read (`adapter_config.json` + weights) and write, with PEFT's key names.

PEFT stores a site's tensor `lora_A.weight` of module `model.layers.0.self_attn.q_proj` under
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (adapter name stripped). qpass keeps
the same parameter names inside each adapter slot, so the mapping is a prefix.

The `target_modules` written are ones PEFT matches to exactly the sites that carry the adapter
(`peft_targets`): PEFT expands "all-linear" to nn.Linear/Conv1D only, which quantized layers are not, and
its rules for `layers_to_transform` differ from qpass's, so the config as given is written only when PEFT's
own rule (`peft_selects`) would pick exactly those sites from the model's module names.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import AdapterConfig, from_dict
from .errors import AdapterLoadError, QpassError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def is_adapter_path(adapter) -> bool:
    return isinstance(adapter, (str, os.PathLike))


@dataclass(frozen=True)
class InMemoryAdapter:
    """An adapter already in memory, accepted wherever an adapter directory is (`prepare`, `load_adapter`):
    its config, its tensors keyed as `read_weights` returns them, and a name for error messages.
    `qpass.from_peft` passes PEFT's adapters this way."""

    config: AdapterConfig
    weights: dict
    source: str


def read_config(path) -> AdapterConfig:
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterLoadError(f"adapter directory {str(path)!r} does not exist; pass the folder that holds {CONFIG_NAME}")
    cfg_file = directory / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterLoadError(f"{str(directory)!r} has no {CONFIG_NAME}; is it a PEFT adapter directory?")
    try:
        data = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{cfg_file} is not valid JSON ({exc}); re-save the adapter") from exc
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{cfg_file} must hold a JSON object; got {type(data).__name__}")
    return from_dict(data, source=str(cfg_file))


def read_weights(path) -> dict:
    """The adapter's tensors keyed by module path + parameter name (PEFT's prefix removed)."""
    directory = Path(path)
    st_file = directory / WEIGHTS_NAME
    bin_file = directory / LEGACY_WEIGHTS_NAME
    if st_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw = load_file(str(st_file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterLoadError(f"{st_file} is corrupt or truncated ({exc}); re-save or re-download the adapter") from exc
    elif bin_file.is_file():
        try:
            raw = torch.load(str(bin_file), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterLoadError(f"{bin_file} cannot be read ({exc}); re-save the adapter as safetensors") from exc
    else:
        raise AdapterLoadError(f"{str(directory)!r} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    return strip_prefix(raw)


def strip_prefix(raw: dict) -> dict:
    """PEFT's state-dict keys (`base_model.model.<module>.<param>`) as qpass's (`<module>.<param>`)."""
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}


def peft_selects(data: dict, key: str) -> bool:
    """Whether PEFT (`check_target_module_exists`, peft 0.17-0.21) adapts module `key` under config `data`.

    Its rule, which differs from qpass's discovery: `exclude_modules` first (regex: full match; list: equal or
    "." + entry suffix); a `target_modules` string is a full-match regex and ignores `layers_to_transform`; a
    list entry equal to the key matches outright; a suffix match is then filtered by `layers_to_transform`,
    the layer index being the first number after `layers_pattern` (default: after any dotted segment).
    "all-linear" is expanded by PEFT to nn.Linear/Conv1D modules only, none of which is a quantized site,
    so here it is an ordinary regex that matches nothing."""
    exclude = data.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = data.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = data.get("layers_to_transform")
    if not found or layers is None or (isinstance(layers, list) and not layers):
        return found
    patterns = data.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def peft_targets(cfg: AdapterConfig, module_names, targeted) -> dict:
    """The fields to write over `cfg.to_peft_dict()` so that PEFT adapts exactly `targeted` among
    `module_names` (every module name of the base model, as PEFT will see it). In order of preference:
    nothing (the config as given already selects them; never "all-linear" or None), the sorted short names
    (`["k_proj", "q_proj", ...]`), the sorted full paths, a regex of the full paths."""
    data = cfg.to_peft_dict()
    names = [n for n in module_names if n]
    targeted = set(targeted)

    def exact(over: dict) -> bool:
        trial = {**data, **over}
        return {n for n in names if peft_selects(trial, n)} == targeted

    given = cfg.target_modules
    # PEFT refuses a regex together with layers_to_transform / layers_pattern (qpass filters the regex's matches)
    regex_with_layers = isinstance(given, str) and (cfg.layers_to_transform is not None or bool(cfg.layers_pattern))
    if given is not None and given != "all-linear" and not regex_with_layers and exact({}):
        return {}
    short = {"target_modules": sorted({p.rsplit(".", 1)[-1] for p in targeted})}
    full = {"target_modules": sorted(targeted)}
    regex = {"target_modules": "|".join(re.escape(p) for p in sorted(targeted)), "layers_to_transform": None,
             "layers_pattern": None}
    for over in (short, full, regex):
        if exact(over):
            return over
    raise QpassError(
        f"cannot write target_modules that PEFT matches to exactly the {len(targeted)} adapted layers "
        f"(exclude_modules={cfg.exclude_modules!r} removes some of them under PEFT's rule); unset exclude_modules"
    )


def write(path, cfg: AdapterConfig, tensors: dict, *, base_model_name_or_path=None, task_type=None,
          module_names=None, targeted=None) -> None:
    """Write an adapter directory. With `module_names` (all of the base model's) and `targeted` (the modules
    that carry the adapter), `target_modules` is written so that PEFT adapts exactly those (`peft_targets`);
    `cfg` itself is not changed."""
    from safetensors.torch import save_file

    directory = Path(path)
    data = cfg.to_peft_dict()
    if module_names is not None and targeted is not None:
        data.update(peft_targets(cfg, module_names, targeted))
    directory.mkdir(parents=True, exist_ok=True)
    data["base_model_name_or_path"] = base_model_name_or_path or data.get("base_model_name_or_path")
    data["task_type"] = task_type or data.get("task_type")
    data["inference_mode"] = True
    (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_file({PREFIX + k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_NAME))
