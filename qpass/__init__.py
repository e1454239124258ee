"""qpass: a torch.compile pass that rewrites GPTQ/AWQ quantized-linear call sites into adapter-augmented subgraphs.

    model = qpass.compile(model, qpass.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    print(qpass.report(model))
"""

from . import ops as _ops  # registers torch.ops.qpass.site
from .api import compile, report, save_adapter
from .backend import backend
from .config import AdapterConfig, LoraConfig
from .errors import AdapterLoadError, QpassError
from .prepare import prepare
from .spec import AdapterSpec, Param, SiteShape, register

__all__ = [
    "AdapterConfig", "AdapterLoadError", "AdapterSpec", "LoraConfig", "Param", "QpassError", "SiteShape",
    "backend", "compile", "prepare", "register", "report", "save_adapter",
]
__version__ = "0.1.0"
