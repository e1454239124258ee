"""qpass: a torch.compile pass that rewrites GPTQ/AWQ quantized-linear call sites into adapter-augmented subgraphs.

    model = qpass.compile(model, qpass.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    print(qpass.report(model))

The names below are imported on first use (PEP 562), so `import qpass` and `python -m qpass --help` do not
import torch.
"""

import importlib
import importlib.util
import sys
import types

# public name -> the module that defines it
_EXPORTS = {
    "AdaLoraConfig": ".config", "AdapterConfig": ".config", "LoraConfig": ".config", "OFTConfig": ".config",
    "register_config": ".config",
    "AdapterLoadError": ".errors", "QpassError": ".errors",
    "orthogonal_regularization": ".adalora_allocator", "update_and_allocate": ".adalora_allocator",
    "AdapterSpec": ".spec", "LowRank": ".spec", "Param": ".spec", "SiteShape": ".spec", "register": ".spec",
    "backend": ".backend",
    "compile": ".api", "report": ".api", "save_adapter": ".api",
    "from_peft": ".peft_interop",
    "guard_filter": ".guards",
    "prepare": ".prepare", "unprepare": ".prepare",
    "active_adapters": ".lifecycle", "disable_adapters": ".lifecycle", "hotswap_adapter": ".lifecycle",
    "load_adapter": ".lifecycle", "set_adapter": ".lifecycle",
    "merge": ".merge", "save_quantized": ".merge",
}
_NO_TORCH = {".config", ".errors"}  # plain Python: resolving these imports neither torch nor the hook

__all__ = [
    "AdaLoraConfig", "AdapterConfig", "AdapterLoadError", "OFTConfig", "orthogonal_regularization", "update_and_allocate", "AdapterSpec", "LoraConfig", "LowRank", "Param", "QpassError", "SiteShape",
    "backend", "compile", "from_peft", "guard_filter", "prepare", "register", "register_config", "report", "save_adapter",
    "active_adapters", "disable_adapters", "hotswap_adapter", "load_adapter", "merge", "save_quantized", "set_adapter", "unprepare",
]
__version__ = "0.1.0"


_hooked: list = []


def _install_hook() -> None:
    """Register torch.ops.qpass.site and put qpass's pass into every torch.compile (qpass.compile_hook).

    Installing it here, when the first name that needs torch is resolved, puts the pass in place before any
    graph qpass may rewrite is compiled; `qpass.prepare` also installs it (idempotent), for code that calls
    the private modules directly (`from qpass.prepare import prepare`)."""
    if _hooked:  # also breaks the recursion: those modules' own `from . import x` come back through __getattr__
        return
    _hooked.append(True)
    try:
        importlib.import_module(".ops", __name__)  # registers torch.ops.qpass.site
        importlib.import_module(".compile_hook", __name__).install()
    except BaseException:
        _hooked.clear()
        raise


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (`qpass.lowering`, `qpass.testing`, ...), as when `import qpass` imported them all
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        # no hook here: qpass's own modules come through this path while they import each other
        # (`from . import site`), and installing the hook then would import qpass.ops half-way through
        return importlib.import_module(f".{name}", __name__)
    if module not in _NO_TORCH:
        _install_hook()
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # resolved once
    return value


class _Package(types.ModuleType):
    """The import system binds a submodule on its package when it is first imported (`qpass.prepare =
    <module qpass.prepare>`), which would hide the lazily resolved function of the same name (`prepare`,
    `backend`, `merge`, `report`): those names stay the functions, as when this module imported them eagerly."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(set(globals()) | set(__all__))
