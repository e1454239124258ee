"""mm-cuda: qpass's Triton dequant-GEMM (qpass/kernels/triton_mm.py) on the library's 4-bit buffers, no dense weight.

CUDA prefill and training, any token count, fp16/bf16/fp32 activations, the packings gemv-cuda reads
(`Layout.gemv_packing`; K % 16 == 0, N % 8 == 0): each tile of W dequantized in the kernel's prologue, float32
accumulation, bias added before the one rounding; sibling sites in one op call, their columns concatenated. The op
has an autograd formula (dx = dy W^T from a second kernel on the same buffers), so graphs that need gradients
take it too. Graphs without gradient fold each low-rank adapter's up-projection into the GEMM (`folded_up`, as
dequant-cpu does): t (x's dtype) times (s B)^T added to the accumulator.

"auto" does not pick it yet (`applies` is False): the plain-torch dequantize + cuBLAS GEMM (torch-dequant) stays the
CUDA prefill and training path until a GPU measurement (benchmarks/run.py --device cuda) shows the fused kernel
pays. `qpass.backend(lowering="mm-cuda")` requests it. Nothing here imports triton until a graph is lowered onto it.
"""

from __future__ import annotations

import torch

from .common import Base
from .triton import TritonBase, _cuda_act, _triton, packing


class MmBase(TritonBase):
    """Sibling bases (same x, same packing family) in one `qpass_triton::int4_mm` call; with `takes_folded_up`,
    each site's up-projection in that call too."""

    lowering = "mm-cuda"

    def __init__(self, sites, folded_up: bool):
        super().__init__(sites, low_rank=False)
        self.takes_folded_up = folded_up

    def __call__(self, x, bases, kernel):
        return self._mm(x, bases, [])

    def folded_up(self, x, bases, ups):
        return self._mm(x, bases, ups)

    def _mm(self, x, bases, ups) -> list:
        from ..kernels import triton_mm  # noqa: F401 (defines qpass_triton::int4_mm; imports triton)

        h, args = self.operands(x, bases)
        up_t = [t.reshape(h.shape[0], -1) for t, _ in ups]
        return self.outputs(x, torch.ops.qpass_triton.int4_mm(h, *args, up_t, [u for _, u in ups]))


class MmCuda:
    name = "mm-cuda"
    label = "mm-cuda (Triton dequant-GEMM on the library layout, no copy)"
    shares_bare_call = True  # siblings with no active adapter: one call for their bases

    def accepts(self, site, x, needs_grad) -> bool:
        return _cuda_act(x) and _triton() and packing(site) is not None

    def applies(self, site, x, needs_grad) -> bool:
        # not measured on a GPU yet: torch-dequant (dequantize + cuBLAS) keeps CUDA prefill and training (docstring)
        return False

    def base(self, sites, needs_grad, switches) -> Base:
        # as dequant-cpu: graphs without gradient take the up-projection into the GEMM (FOLD_UP)
        return MmBase(sites, folded_up=switches.fold_up and not needs_grad)
