"""Matcher for AutoAWQ's `awq.modules.linear.gemm.WQLinear_GEMM` (AWQ GEMM layout, 4-bit).

Only autoawq >= 0.2.0 is matched (as PEFT): an older version raises ImportError naming the version
needed. The base is computed from the module's own buffers (`layouts.awq`: AWQ's packing order, checked
in tests against `awq.utils.packing_utils.dequantize_gemm`), in eager too: `WQLinear_GEMM.forward` has no
CPU path where triton is installed (`RuntimeError: invalid argument to exchangeDevice`) and its backward
needs CUDA kernels.

autoawq is not imported here: a model holding a WQLinear_GEMM has necessarily imported its module.
"""

from __future__ import annotations

import sys

from packaging.version import Version
from torch import nn

from . import QuantInfo, Unsupported, layouts

LIBRARY = "autoawq"
MIN_VERSION = "0.2.0"
_MODULE = "awq.modules.linear.gemm"


def installed_version():
    """autoawq's installed version string, or None (tests monkeypatch this)."""
    import importlib.metadata as md

    try:
        return md.version("autoawq")
    except md.PackageNotFoundError:
        return None


def _check_version() -> None:
    version = installed_version()
    if version is None or Version(version) < Version(MIN_VERSION):
        raise ImportError(
            f"qpass needs autoawq>={MIN_VERSION} to adapt WQLinear_GEMM layers; found {version or 'no autoawq'}. "
            f"Upgrade it: pip install --no-deps 'autoawq>={MIN_VERSION}'"
        )


def match(module: nn.Module):
    gemm = sys.modules.get(_MODULE)
    cls = getattr(gemm, "WQLinear_GEMM", None)
    if cls is None or not isinstance(module, cls):
        return None
    _check_version()
    bits = int(module.w_bit)
    if bits != 4:
        return Unsupported(LIBRARY, type(module).__name__, f"{bits}-bit WQLinear_GEMM (autoawq packs 4-bit only)")
    return QuantInfo(
        library=LIBRARY,
        cls_name=type(module).__name__,
        method="awq",
        bits=bits,
        group_size=int(module.group_size),
        sym=False,
        desc_act=False,
        in_features=int(module.in_features),
        out_features=int(module.out_features),
        buffers=("qweight", "qzeros", "scales") + (("bias",) if getattr(module, "bias", None) is not None else ()),
        layout=layouts.awq,
        eager_base="torch",
    )
