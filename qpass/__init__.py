"""qpass: a torch.compile pass that rewrites GPTQ/AWQ quantized-linear call sites into adapter-augmented subgraphs.

    model = qpass.compile(model, qpass.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    print(qpass.report(model))
"""

from . import ops as _ops  # registers torch.ops.qpass.site
from . import compile_hook as _compile_hook
from .api import compile, report, save_adapter
from .backend import backend
from .config import AdaLoraConfig, AdapterConfig, LoraConfig, OFTConfig
from .adalora_allocator import orthogonal_regularization, update_and_allocate
from .errors import AdapterLoadError, QpassError
from .guards import guard_filter
from .lifecycle import active_adapters, disable_adapters, hotswap_adapter, load_adapter, set_adapter
from .merge import merge, save_quantized
from .peft_interop import from_peft
from .prepare import prepare, unprepare
from .spec import AdapterSpec, Param, SiteShape, register

__all__ = [
    "AdaLoraConfig", "AdapterConfig", "AdapterLoadError", "OFTConfig", "orthogonal_regularization", "update_and_allocate", "AdapterSpec", "LoraConfig", "Param", "QpassError", "SiteShape",
    "backend", "compile", "from_peft", "guard_filter", "prepare", "register", "report", "save_adapter",
    "active_adapters", "disable_adapters", "hotswap_adapter", "load_adapter", "merge", "save_quantized", "set_adapter", "unprepare",
]
__version__ = "0.1.0"

_compile_hook.install()  # every torch.compile of a prepared model rewrites its sites (qpass.compile_hook)
