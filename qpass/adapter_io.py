"""PEFT adapter directories: read (`adapter_config.json` + weights) and write, with PEFT's key names.

PEFT stores a site's tensor `lora_A.weight` of module `model.layers.0.self_attn.q_proj` under
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (adapter name stripped). qpass keeps
the same parameter names inside each adapter slot, so the mapping is a prefix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import AdapterConfig, from_dict
from .errors import AdapterLoadError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def is_adapter_path(adapter) -> bool:
    return isinstance(adapter, (str, os.PathLike))


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
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}


def write(path, cfg: AdapterConfig, tensors: dict, *, base_model_name_or_path=None, task_type=None) -> None:
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    data = cfg.to_peft_dict()
    data["base_model_name_or_path"] = base_model_name_or_path or data.get("base_model_name_or_path")
    data["task_type"] = task_type or data.get("task_type")
    data["inference_mode"] = True
    (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    save_file({PREFIX + k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_NAME))
