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

import contextlib
import json
import os
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch  # called through the module: tests replace save_file there
import torch

from .config import AdapterConfig, from_dict
from .errors import AdapterLoadError, QpassError, QpassWarning

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)  # an adapter folder's own files
TEMP_MARK = ".qpass-tmp-"  # in the names of the folders `replacing_dir` writes into ...
OLD_MARK = ".qpass-old-"  # ... and moves the replaced folder to, both beside the target


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
        try:
            raw = safetensors.torch.load_file(str(st_file))
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterLoadError(f"{st_file} is corrupt or truncated ({exc}); re-save or re-download the adapter") from exc
    elif bin_file.is_file():
        try:
            raw = torch.load(str(bin_file), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterLoadError(f"{bin_file} cannot be read ({exc}); re-save the adapter as safetensors") from exc
    else:
        raise AdapterLoadError(f"{str(directory)!r} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    weights = strip_prefix(raw)
    check_finite(weights, str(directory))
    return weights


def check_finite(weights: dict, source: str) -> list:
    """The names of `weights`' floating-point tensors that hold NaN or inf, in order; if there are any, a
    `QpassWarning` names the first three and the count (the adapter's outputs would be NaN/inf: it diverged in
    training or the file is damaged). Every adapter read from a folder passes here (`read_weights`: prepare,
    load_adapter, hotswap_adapter), and those handed over in memory (`InMemoryAdapter`: from_peft)."""
    bad = [k for k, v in weights.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.is_meta and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        warnings.warn(
            f"{source}: {len(bad)} adapter tensor(s) hold NaN or inf values: {bad[:3]}{more}; every layer they adapt "
            "will output NaN/inf. The adapter diverged in training or the file is damaged: re-train or re-save it "
            "(qpass.report(model) lists them while they are loaded)",
            QpassWarning, stacklevel=2,
        )
    return bad


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
    `cfg` itself is not changed.

    All or nothing (`replacing_dir`): if writing fails (a full disk, Ctrl-C), an adapter already at `path` is
    left exactly as it was and nothing else is left behind. Files of an existing folder other than an
    adapter's own (adapter_config.json, adapter_model.safetensors, adapter_model.bin) — a README, a tokenizer —
    are kept."""
    data = cfg.to_peft_dict()
    if module_names is not None and targeted is not None:
        data.update(peft_targets(cfg, module_names, targeted))
    data["base_model_name_or_path"] = base_model_name_or_path or data.get("base_model_name_or_path")
    data["task_type"] = task_type or data.get("task_type")
    data["inference_mode"] = True
    tensors = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with replacing_dir(path, what="adapter", files=f"{CONFIG_NAME} and {WEIGHTS_NAME}",
                       replaced=lambda name: name in ADAPTER_FILES) as directory:
        (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        safetensors.torch.save_file(tensors, str(directory / WEIGHTS_NAME))


# ---- all-or-nothing folders ---------------------------------------------------------------------------


@contextlib.contextmanager
def replacing_dir(path, *, what: str, files: str, replaced=lambda name: False):
    """`with replacing_dir(path, ...) as tmp:` write the folder's files into `tmp`; when the block ends without
    an exception, `tmp` becomes `path` (the same parent folder, so each step is one rename); when it raises
    (an OSError, a KeyboardInterrupt, ...), `tmp` is removed and `path` is as it was.

    `path` new: `tmp` is renamed to it (parent folders are created). `path` an existing folder: it is renamed
    aside, `tmp` renamed in, and the old folder removed; if the second rename fails the old folder goes back.
    The old folder's entries that the block did not write and that `replaced(name)` does not claim (the files
    of the kind being written, from an earlier save) are carried over into the new folder first, as hard links
    where the file system allows (else copies), so a folder holding other files keeps them.
    A symlink to a folder is followed: the folder it points to is replaced.

    Refused with a QpassError naming `path`, before anything is written: `path` (or a folder above it) an
    existing file; `path` the working directory or a folder holding it (renaming it would strand the
    process); no temporary folder can be made beside it. `what` and `files` word those messages."""
    given = os.fspath(path)
    target = Path(os.path.realpath(given))
    for p in (target, *target.parents):
        if p.exists() and not p.is_dir():
            where = "is" if p == target else f"is under {str(p)!r}, which is"
            raise QpassError(
                f"cannot save the {what} to {given!r}: it {where} an existing file, not a folder; qpass writes a "
                f"folder ({files}) there. Pass the path of a new or existing folder, or move the file away"
            )
    cwd = os.path.realpath(os.getcwd())
    if target.parent == target or cwd == str(target) or cwd.startswith(str(target) + os.sep):
        raise QpassError(
            f"cannot save the {what} to {given!r}: it is the working directory or holds it, and qpass replaces the "
            f"folder as a whole (written beside it, then renamed into place). Save to a subfolder, e.g. "
            f"{os.path.join(given, what)!r}, or change the working directory first"
        )
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_dir(parent, f".{target.name}{TEMP_MARK}")
    except OSError as exc:
        raise QpassError(
            f"cannot save the {what} to {given!r}: no temporary folder can be made in {str(parent)!r} ({exc}); qpass "
            f"writes the {what} there first and renames it into place, so that a failed save leaves {given!r} as it "
            f"was. Make {str(parent)!r} writable, or save elsewhere"
        ) from exc
    try:
        yield tmp
        if target.is_dir():
            shutil.copymode(target, tmp)
            _carry_over(target, tmp, replaced)
            _swap(target, tmp)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder `parent/<prefix><random>` (made with the usual permissions, unlike mkdtemp's 0o700)."""
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, replaced) -> None:
    """The entries of `old` that `new` lacks and `replaced` does not claim, into `new` (`old` unchanged)."""
    for entry in os.scandir(old):
        dst = new / entry.name
        if os.path.lexists(dst) or replaced(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)


def _swap(target: Path, tmp: Path) -> None:
    """`tmp` in place of the folder `target`: `target` renamed aside, `tmp` renamed in, the old one removed; if
    anything (a KeyboardInterrupt too) stops it between the renames, the old folder is put back."""
    old = target.parent / f".{target.name}{OLD_MARK}{secrets.token_hex(4)}"
    try:
        os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        if old.exists():
            if tmp.exists():  # the new folder did not move in: the old one goes back
                os.rename(old, target)
            else:  # it did: the swap is complete
                shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
