"""qpass's own CPU kernels, built on this machine the first time a graph wants one.

`gptq4_gemv(x, qweights, qzeros, scales, group[, lora_a, lora_b, scaling])` and `awq4_gemv(...)` (gemv.cpp): a
decode-step matmul (a few rows) that reads 4-bit GPTQ weights in gptqmodel's own packing, or AWQ weights in
AutoAWQ's GEMM packing (autoawq's WQLinear_GEMM, gptqmodel's AWQ classes), for every activation dtype
(bfloat16 x through AVX512-BF16 dot products where the CPU has them, else widened to float32 and multiplied
by the AVX-512, AVX2 or portable loop, returned in bfloat16; others multiplied and returned as float32),
optionally with each site's LoRA added in the same call. The int4 kernel aten ships
(`_weight_int4pack_mm_for_cpu`) needs the weights repacked into its own layout — a second copy of every
weight — and bf16 activations; this kernel needs neither.

`{gptq4,awq4,int4pack}_mm(x, ..., extra_in, extra_w)` and `..._dequant` (dequant.cpp): the prefill / training
GEMM — 4-bit codes unpacked into the activation dtype, bit-exact to the library's dequantize. bfloat16 x
(GPTQ/AWQ packing, the int4pack layout; AVX512-BF16): qpass's own micro-kernel, the codes unpacked into its B
panels (64 columns, in L2); otherwise cache-sized column chunks, each multiplied by the GEMM library at once
(half-precision x on CPUs without a fast half-precision GEMM: in float32 on the same values, `wide_gemm`).
Optional low-rank terms (LoRA's up-projection) added in the same accumulation; differentiable (the backward
unpacks again).

Built with `torch.utils.cpp_extension.load` (-O3, -march=native; once per machine, then loaded from torch's
extension cache; the extension's name carries the instruction set and a digest of the source,
the compiler flags and this CPU's flags, so a shared cache never hands one CPU's build to another). If the
build fails (no compiler), `available()` is False, the reason is kept in `unavailable_reason()` and the
lowerings use aten's kernel. Set QPASS_CPP_KERNELS=0 to never build or use them.

QPASS_CPU_ISA=avx512|avx2|portable forces one instruction-set path instead of this CPU's (native, the
default): -march=x86-64 plus the x86-64-v4 AVX-512 set / AVX2+FMA+F16C / nothing; avx512 and avx2 are refused
(QpassError) on a CPU that lacks them. `isa()` says which path the loaded build took ("avx512-bf16", "avx512",
"avx2" or "portable"), asked of the library itself. One process loads one build.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

_SOURCES = [Path(__file__).with_name(name) for name in ("gemv.cpp", "dequant.cpp")]
_HEADERS = [Path(__file__).with_name(name) for name in ("packed_check.h", "vec.h")]  # in the build digest: a change rebuilds
_LOCK = threading.Lock()
_STATE: dict = {}  # "ok": bool, "reason": str, "path": the loaded library, "isa": what it says it was built for


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# QPASS_CPU_ISA: the instruction-set path the kernels are compiled for (the #if chain in packed_check.h picks the
# AVX-512, AVX2 or portable loops from the compiler's target). "native" (default) builds for this CPU; the others
# force one path whatever the CPU, for testing a path this machine would not take (tests/test_kernels.py), or for
# one build that runs on several CPUs. Each is its own extension (the name carries the ISA and the digest).
_ISA_FLAGS = {
    "native": ["-march=native"],
    # the x86-64-v4 set (every AVX-512 CPU has it); no AVX512-BF16, so an
    # AVX512-BF16 CPU tests its plain AVX-512 loops this way and its bf16 loops under "native"
    "avx512": ["-march=x86-64", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512cd", "-mavx2", "-mfma",
               "-mf16c"],
    "avx2": ["-march=x86-64", "-mavx2", "-mfma", "-mf16c"],  # QPASS_AVX2: AVX2 + FMA + F16C
    "portable": ["-march=x86-64"],  # baseline x86-64 (SSE2); on other CPUs the compiler's default target
}
# the /proc/cpuinfo flags a forced build's code needs to run here (it would die on an illegal instruction)
_ISA_NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma", "f16c"),
              "avx2": ("avx2", "fma", "f16c")}


def requested_isa() -> str:
    """QPASS_CPU_ISA (lower-cased; "native" when unset): native, avx512, avx2 or portable."""
    return os.environ.get("QPASS_CPU_ISA", "").strip().lower() or "native"


def _isa_flags(isa: str) -> list:
    """The compiler flags for `isa`; a QpassError for a name qpass does not know, or a path this CPU cannot run."""
    import platform

    from ..errors import QpassError

    if isa not in _ISA_FLAGS:
        raise QpassError(f"QPASS_CPU_ISA={isa!r} is not one of {', '.join(_ISA_FLAGS)}; unset it to build for this CPU "
                         "(native)")
    if isa == "native":
        return list(_ISA_FLAGS[isa])
    if platform.machine().lower() not in ("x86_64", "amd64"):
        if isa == "portable":
            return []  # the compiler's default target
        raise QpassError(f"QPASS_CPU_ISA={isa}: an x86-64 instruction set, and this CPU is {platform.machine()}; use "
                         "native or portable")
    have = set(_cpu_flags().split())
    missing = [f for f in _ISA_NEEDS.get(isa, ()) if f not in have]
    if missing:
        raise QpassError(f"QPASS_CPU_ISA={isa}: this CPU lacks {' '.join(missing)} (/proc/cpuinfo), so a build for it "
                         "would stop on an illegal instruction; use native, portable"
                         + (" or avx2" if isa == "avx512" and not [f for f in _ISA_NEEDS["avx2"] if f not in have] else ""))
    return list(_ISA_FLAGS[isa])


def _build(isa: str, flags: list) -> str:
    """Builds (or loads from torch's extension cache) and loads the kernels for `isa`; returns the library's path."""
    from torch.utils import cpp_extension

    source = "".join(p.read_text() for p in _SOURCES + _HEADERS)
    digest = hashlib.sha1((source + isa + " ".join(flags) + _cpu_flags() + torch.__version__).encode()).hexdigest()[:12]
    name = f"qpass_kernels_{isa}_{digest}"
    from ..log import Step  # progress lines (silent in library use): a build is long enough to announce

    cached = os.path.isfile(os.path.join(cpp_extension._get_build_directory(name, False), f"{name}.so"))
    with Step(f"building qpass CPU kernels for {isa} (once per machine, ~30 s)", "built qpass CPU kernels", silent=cached):
        path = cpp_extension.load(
            name=name, sources=[str(p) for p in _SOURCES], extra_cflags=["-O3", *flags, "-fopenmp"],
            extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    # torch returns the library's path here (documented as nothing); else where it builds
    return path or os.path.join(cpp_extension._get_build_directory(name, False), f"{name}.so")


def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call) for QPASS_CPU_ISA (default
    native). A QPASS_CPU_ISA that is unknown, or names a path this CPU cannot run, raises QpassError instead of
    falling back: the build asked for is not the one that would run."""
    if os.environ.get("QPASS_CPP_KERNELS", "1") == "0":
        return False
    with _LOCK:
        if "ok" not in _STATE:
            isa = requested_isa()
            flags = _isa_flags(isa)  # raises: a wrong QPASS_CPU_ISA is the user's to fix, not a reason to fall back
            try:
                _STATE["path"] = _build(isa, flags)
                _STATE["ok"], _STATE["reason"] = True, ""
            except Exception as exc:  # no compiler, no ninja, a read-only cache...: fall back, say why once
                _STATE["ok"], _STATE["reason"] = False, f"{type(exc).__name__}: {exc}"
                warnings.warn(f"qpass: the CPU kernels could not be built ({_STATE['reason'][:300]}); "
                              "decode steps use aten's int4 kernel on a repacked copy of the weights and prefill "
                              "/ training inductor's plain-torch dequantize instead",
                              stacklevel=2)
        return _STATE["ok"]


def isa() -> str:
    """The instruction-set path the loaded kernels were compiled with, as the library itself says (its exported
    `qpass_isa()`, the #if chain in packed_check.h): "avx512-bf16" (AVX-512 loops and the AVX512-BF16 bf16
    loops), "avx512", "avx2" or "portable". Raises RuntimeError where the kernels are not available."""
    if not available():
        raise RuntimeError(f"qpass: the CPU kernels are not available ({unavailable_reason()})")
    if "isa" not in _STATE:
        import ctypes

        fn = ctypes.CDLL(_STATE["path"]).qpass_isa  # the process's copy: dlopen of a loaded library reuses it
        fn.restype = ctypes.c_char_p
        _STATE["isa"] = fn().decode()
    return _STATE["isa"]


def unavailable_reason() -> Optional[str]:
    if os.environ.get("QPASS_CPP_KERNELS", "1") == "0":
        return "disabled by QPASS_CPP_KERNELS=0"
    return _STATE.get("reason") or None


_LIB = torch.library.Library("qpass_kernels", "DEF")


def _gemv_fake(x, qweight, qzeros, scales, group, *lora):
    return x.new_empty((x.shape[0], sum(s.shape[1] for s in scales)))


# each site's LoRA as tensors, or (_pooled) at offsets into the model's adapter pool (qpass.pool)
_GEMV_LORA = {"": "Tensor[] lora_a, Tensor[] lora_b, Tensor[] scaling", "_pooled": "Tensor pool, Tensor scalings, int[] lora"}
for _layout in ("gptq4", "awq4"):
    for _suffix, _lora in _GEMV_LORA.items():
        _LIB.define(f"{_layout}_gemv{_suffix}(Tensor x, Tensor[] qweight, Tensor[] qzeros, Tensor[] scales, int group, "
                    f"{_lora}) -> Tensor")
        torch.library.register_fake(f"qpass_kernels::{_layout}_gemv{_suffix}", _gemv_fake, lib=_LIB)


def gemv_pooled(awq: bool, x: torch.Tensor, qweight: list, qzeros: list, scales: list, group: int,
                pool: torch.Tensor, scalings: torch.Tensor, lora: list) -> torch.Tensor:
    """`gptq4_gemv` (`awq4_gemv` with `awq`) with each site's LoRA read from an adapter pool (`qpass.pool`): one
    flat float32 or bfloat16 tensor holding every A and B, and one float32 tensor of scalings. `lora` holds
    four ints per site: A's offset and B's offset in `pool` (elements), the rank r, the scaling's index."""
    if x.dtype != torch.bfloat16:
        x = x.float()
    op = torch.ops.qpass_kernels.awq4_gemv_pooled if awq else torch.ops.qpass_kernels.gptq4_gemv_pooled
    return op(x.contiguous(), qweight, qzeros, scales, group, pool, scalings, list(lora))


def gptq4_gemv(x: torch.Tensor, qweight: list, qzeros: list, scales: list, group: int, lora_a=(), lora_b=(),
               scaling=()) -> torch.Tensor:
    """(M, sum N_i) = x (M, K) @ [W_1 | W_2 | ...], W_i the 4-bit GPTQ weights of site i, accumulated in
    float32 and rounded once to x's dtype (bfloat16 x; any other dtype is multiplied as, and returned in,
    float32). With `lora_a`/`lora_b`/`scaling` (per site: A (r_i, K) and B (N_i, r_i), both float32 or both
    bfloat16, and a one-element float32 scaling) site i's columns also get scaling_i * (x A_i^T) B_i^T, computed
    in float32, before that one rounding.
    bfloat16 x takes the AVX512-BF16 loop where the CPU has it."""
    if x.dtype != torch.bfloat16:
        x = x.float()
    return torch.ops.qpass_kernels.gptq4_gemv(x.contiguous(), qweight, qzeros, scales, group, list(lora_a),
                                              list(lora_b), list(scaling))


def awq4_gemv(x: torch.Tensor, qweight: list, qzeros: list, scales: list, group: int, lora_a=(), lora_b=(),
              scaling=()) -> torch.Tensor:
    """As `gptq4_gemv`, for 4-bit AWQ packing (qweight (K, N/8), AutoAWQ's column interleave); the group a
    multiple of 8."""
    if x.dtype != torch.bfloat16:
        x = x.float()
    return torch.ops.qpass_kernels.awq4_gemv(x.contiguous(), qweight, qzeros, scales, group, list(lora_a),
                                             list(lora_b), list(scaling))


_LIB.define("gemv_bf16_loop(Tensor device) -> bool")


def gemv_bf16_loop() -> bool:
    """Whether the gemv kernels were built with their AVX512-BF16 loop (the build targets this machine's CPU)."""
    return torch.ops.qpass_kernels.gemv_bf16_loop(torch.empty(0))


# ---- the prefill / training GEMMs (dequant.cpp): x @ W with W unpacked in cache-sized column chunks ---------

_LIB.define("gptq4_dequant(Tensor[] qweight, Tensor[] qzeros, Tensor[] scales, int group, ScalarType dtype) -> Tensor")
_LIB.define("gptq4_mm(Tensor x, Tensor[] qweight, Tensor[] qzeros, Tensor[] scales, int group, Tensor[] extra_in, "
            "Tensor[] extra_w) -> Tensor")
_LIB.define("awq4_dequant(Tensor[] qweight, Tensor[] qzeros, Tensor[] scales, int group, ScalarType dtype) -> Tensor")
_LIB.define("awq4_mm(Tensor x, Tensor[] qweight, Tensor[] qzeros, Tensor[] scales, int group, Tensor[] extra_in, "
            "Tensor[] extra_w) -> Tensor")
_LIB.define("int4pack_dequant(Tensor[] qweight, Tensor[] scales, Tensor[] zero_codes, int group, int block_n, "
            "ScalarType dtype) -> Tensor")
_LIB.define("int4pack_mm(Tensor x, Tensor[] qweight, Tensor[] scales, Tensor[] zero_codes, int group, int block_n, "
            "Tensor[] extra_in, Tensor[] extra_w) -> Tensor")


@torch.library.register_fake("qpass_kernels::gptq4_dequant", lib=_LIB)
def _(qweight, qzeros, scales, group, dtype):
    return qweight[0].new_empty((qweight[0].shape[0] * 8, sum(s.shape[1] for s in scales)), dtype=dtype)


@torch.library.register_fake("qpass_kernels::awq4_dequant", lib=_LIB)
def _(qweight, qzeros, scales, group, dtype):
    return qweight[0].new_empty((qweight[0].shape[0], sum(s.shape[1] for s in scales)), dtype=dtype)


@torch.library.register_fake("qpass_kernels::int4pack_dequant", lib=_LIB)
def _(qweight, scales, zero_codes, group, block_n, dtype):
    return qweight[0].new_empty((scales[0].shape[0] * group, sum(s.shape[1] for s in scales)), dtype=dtype)


def _mm_fake(x, qweight, b, c, *rest):
    # the third list holds one (G, N) tensor per site in every layout (scales; int4pack: zero codes)
    return x.new_empty((x.shape[0], sum(t.shape[1] for t in c)))


for _op in ("gptq4_mm", "awq4_mm", "int4pack_mm"):
    torch.library.register_fake(f"qpass_kernels::{_op}", _mm_fake, lib=_LIB)

# x @ W + scaling_i (x A_i^T) B_i^T per site with LoRA's up-projection inside the GEMM: prefill graphs (no
# gradient; no autograd formula registered).
_LORA_ARGS = "Tensor[] lora_a, Tensor[] lora_b, Tensor[] scaling"
_LIB.define(f"gptq4_mm_lora(Tensor x, Tensor[] qweight, Tensor[] qzeros, Tensor[] scales, int group, {_LORA_ARGS}) -> Tensor")
_LIB.define(f"awq4_mm_lora(Tensor x, Tensor[] qweight, Tensor[] qzeros, Tensor[] scales, int group, {_LORA_ARGS}) -> Tensor")
_LIB.define("int4pack_mm_lora(Tensor x, Tensor[] qweight, Tensor[] scales, Tensor[] zero_codes, int group, int block_n, "
            f"{_LORA_ARGS}) -> Tensor")
for _op in ("gptq4_mm_lora", "awq4_mm_lora", "int4pack_mm_lora"):
    torch.library.register_fake(f"qpass_kernels::{_op}", _mm_fake, lib=_LIB)


@functools.cache
def wide_gemm(dtype: torch.dtype) -> bool:
    """Whether a CPU GEMM in half-precision `dtype` is done in float32 here: oneDNN has no fast kernel for it on
    this CPU (bf16 without AVX-512, fp16 without AVX512-FP16: a reference loop, orders of magnitude slower than
    its float32 GEMM). The C++ `_mm` kernels ask oneDNN the same questions (`wide` in dequant.cpp) and, like this,
    ask once per process: the backward calls it for every matmul."""
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in a's dtype; through float32 where `wide_gemm` (products of half-precision values are exact in
    float32 and the half-precision GEMM accumulates in float32 too, so only the speed changes)."""
    if a.device.type == "cpu" and wide_gemm(a.dtype):
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


def _register_backward(mm: str, dequant: str) -> None:
    """The backward of `mm(x, list, list, list, *ints, extra_in, extra_w)` = x @ W (+ extra_in[i] @ extra_w[i]
    per site): dx = dy @ W^T with W unpacked again by `dequant(list, list, list, *ints, dtype)` instead of saved
    (training holds the 4-bit weights only); d extra_in[i] = dy_i @ extra_w[i]^T, d extra_w[i] = extra_in[i]^T @ dy_i."""

    def setup(ctx, inputs, output):
        x, a, b, c, *rest = inputs
        ints, ein, ew = rest[:-2], rest[-2], rest[-1]
        ctx.sites, ctx.ints, ctx.extras = len(a), ints, len(ein)
        ctx.splits = [t.shape[1] for t in c]
        ctx.save_for_backward(*a, *b, *c, *ein, *ew)

    def backward(ctx, grad):
        saved, n, e = list(ctx.saved_tensors), ctx.sites, ctx.extras
        lists = saved[:n], saved[n : 2 * n], saved[2 * n : 3 * n]
        ein, ew = saved[3 * n : 3 * n + e], saved[3 * n + e :]
        dx = None
        if ctx.needs_input_grad[0]:
            w = getattr(torch.ops.qpass_kernels, dequant)(*lists, *ctx.ints, grad.dtype)
            dx = _matmul(grad, w.t())
        dys = grad.split(ctx.splits, 1) if e else []
        none = [None] * n
        return ((dx, none, none, none) + (None,) * len(ctx.ints)
                + ([_matmul(dy, w.t()) for dy, w in zip(dys, ew)], [_matmul(t.t(), dy) for dy, t in zip(dys, ein)]))

    torch.library.register_autograd(f"qpass_kernels::{mm}", backward, setup_context=setup, lib=_LIB)


_register_backward("gptq4_mm", "gptq4_dequant")
_register_backward("awq4_mm", "awq4_dequant")
_register_backward("int4pack_mm", "int4pack_dequant")


def gptq4_dequant(qweight: list, qzeros: list, scales: list, group: int, dtype: torch.dtype) -> torch.Tensor:
    """(K, sum N_i) in `dtype`: [W_1 | W_2 | ...], W_i = s * (q - z) of site i rounded as gptqmodel does."""
    return torch.ops.qpass_kernels.gptq4_dequant(qweight, qzeros, scales, group, dtype)


def gptq4_mm(x: torch.Tensor, qweight: list, qzeros: list, scales: list, group: int, extra_in=(), extra_w=()) -> torch.Tensor:
    """(M, sum N_i) in x's dtype = x (M, K) @ [W_1 | W_2 | ...] (4-bit GPTQ packing); with `extra_in`/`extra_w`
    (one (M, r_i) and one (r_i, N_i) per site, x's dtype) site i's columns also get extra_in[i] @ extra_w[i],
    in the same GEMM. Differentiable in x and the extras."""
    return torch.ops.qpass_kernels.gptq4_mm(x, qweight, qzeros, scales, group, list(extra_in), list(extra_w))


def awq4_dequant(qweight: list, qzeros: list, scales: list, group: int, dtype: torch.dtype) -> torch.Tensor:
    """(K, sum N_i) in `dtype` from 4-bit AWQ packing: s * (q - z) of site i rounded as AutoAWQ does."""
    return torch.ops.qpass_kernels.awq4_dequant(qweight, qzeros, scales, group, dtype)


def awq4_mm(x: torch.Tensor, qweight: list, qzeros: list, scales: list, group: int, extra_in=(), extra_w=()) -> torch.Tensor:
    """As `gptq4_mm`, for 4-bit AWQ packing."""
    return torch.ops.qpass_kernels.awq4_mm(x, qweight, qzeros, scales, group, list(extra_in), list(extra_w))


def gptq4_mm_lora(x: torch.Tensor, qweight: list, qzeros: list, scales: list, group: int, lora_a: list, lora_b: list,
                  scaling: list) -> torch.Tensor:
    """(M, sum N_i) in x's dtype = x @ [W_1 | W_2 | ...] with site i's columns plus scaling_i * (x A_i^T) B_i^T:
    A_i (r_i, K) and B_i (N_i, r_i) both float32 or both bfloat16, scaling_i one element. t = x A^T in float32
    and scaling * B are each rounded to x's dtype, their product summed with x W in float32 and rounded once
    (LoRA's up-projection in the base GEMM: prefill). bfloat16 x with AVX512-BF16: all in the kernel, t by
    float32 FMAs. No gradient."""
    return torch.ops.qpass_kernels.gptq4_mm_lora(x, qweight, qzeros, scales, group, list(lora_a), list(lora_b),
                                                 list(scaling))


def awq4_mm_lora(x: torch.Tensor, qweight: list, qzeros: list, scales: list, group: int, lora_a: list, lora_b: list,
                 scaling: list) -> torch.Tensor:
    """As `gptq4_mm_lora`, for 4-bit AWQ packing."""
    return torch.ops.qpass_kernels.awq4_mm_lora(x, qweight, qzeros, scales, group, list(lora_a), list(lora_b),
                                                list(scaling))


def int4pack_mm_lora(x: torch.Tensor, qweight: list, scales: list, zero_codes: list, group: int, block_n: int,
                     lora_a: list, lora_b: list, scaling: list) -> torch.Tensor:
    """As `gptq4_mm_lora`, for the int4pack layout (x in the codes' row order, and A's columns with it)."""
    return torch.ops.qpass_kernels.int4pack_mm_lora(x, qweight, scales, zero_codes, group, block_n, list(lora_a),
                                                    list(lora_b), list(scaling))


def int4pack_dequant(qweight: list, scales: list, zero_codes: list, group: int, block_n: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """(K, sum N_i) in `dtype` from int4pack codes (qpass.resident's layout): s * (q - z), in the codes' row order."""
    return torch.ops.qpass_kernels.int4pack_dequant(qweight, scales, zero_codes, group, block_n, dtype)


def int4pack_mm(x: torch.Tensor, qweight: list, scales: list, zero_codes: list, group: int, block_n: int,
                extra_in=(), extra_w=()) -> torch.Tensor:
    """As `gptq4_mm`, for the int4pack layout (x in the codes' row order)."""
    return torch.ops.qpass_kernels.int4pack_mm(x, qweight, scales, zero_codes, group, block_n, list(extra_in),
                                               list(extra_w))
