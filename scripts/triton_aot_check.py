"""Compile every Triton kernel launch qpass makes for the GPU benchmark's model, ahead of time, for CUDA
architectures, on a machine without a GPU: Triton's own compiler and ptxas (both ship with triton), not its
interpreter. What the interpreter tests cannot see, this does: code the GPU compiler rejects, and tiles needing more
shared memory than one block may use on an architecture.

qpass's ops (int4_gemv: decode; int4_mm: prefill and the training forward; int4_mm_dx: the training backward) are
called on fake CUDA tensors with `JITFunction.run` replaced: each launch is compiled for the architecture as it is
made, and where its kernel needs more shared memory than a block may use there, Triton's OutOfResources is raised
into qpass's host code, as the GPU's launcher raises it when it loads the kernel; qpass then launches its next,
smaller configuration (`launch_first_fitting`). The host code picks tiles and launch options exactly as on a GPU
with H100/H200's 132 SMs.

Workloads: Llama-2-7B's projections (hidden 4096, intermediate 11008; q/k/v and gate/up as sibling calls), 4-bit,
group 128, LoRA r=16: decode (1 token), prefill (2048 tokens, up-projections folded), a training step (2 x 1024
tokens, forward and dx); GPTQ with groups in order, GPTQ act-order (g_idx) and AWQ; q/k/v with and without bias.

    .venv/bin/python scripts/triton_aot_check.py            # bf16, fp16, fp32; sm_90 (H100/H200), sm_80, sm_89
    .venv/bin/python scripts/triton_aot_check.py --dtypes bf16 --arch 90 --kinds gptq-act --sites qkv \
        --one-per-kernel                                     # what tests/test_triton.py runs

Prints one line per specialization and a summary per architecture; exits 1 if a kernel fails to compile, or a
workload finds no configuration that fits.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time

# the most shared memory one block may use (bytes, opt-in), by compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SMS = 132  # H100 / H200
HIDDEN, INTERMEDIATE, GROUP, RANK = 4096, 11008, 128, 16
SITES = {"qkv": (HIDDEN, [HIDDEN] * 3), "o": (HIDDEN, [HIDDEN]), "gate_up": (HIDDEN, [INTERMEDIATE] * 2),
         "down": (INTERMEDIATE, [HIDDEN])}
DTYPES = ("bf16", "fp16", "fp32")
KINDS = ("gptq", "gptq-act", "awq")
TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _launch_all(dtypes, kinds, sites, arch, one_per_kernel, out) -> dict:
    """Every workload's launches, each compiled for `arch` as it is made; a kernel needing more shared memory than
    one block may use there raises Triton's OutOfResources into qpass's host code, as the GPU's launcher does
    (qpass then tries its next, smaller configuration). Returns {"launches", "compiled", "refused", "failures",
    "max_shared"} over the distinct specializations."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    from qpass.kernels import triton_gemv, triton_int4, triton_mm

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}
    done: dict = {}  # spec -> shared bytes (None: did not compile)
    kernels: set = set()
    summary = {"launches": 0, "compiled": 0, "refused": 0, "failures": [], "max_shared": 0}

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = {**dict(zip(params, args)), **kwargs}
        sig, const = {}, {}
        for name, p in params.items():
            v = bound[name]
            if p.annotation == "tl.constexpr" or v is None:
                sig[name], const[name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[name] = "*" + names[v.dtype]
            elif isinstance(v, int) and not isinstance(v, bool):
                sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            else:
                raise TypeError(f"{self.fn.__name__}: argument {name} of type {type(v).__name__}")
        spec = {"fn": f"{self.fn.__module__}:{self.fn.__name__}", "sig": sig, "const": const, "opts": opts}
        key = json.dumps(spec, sort_keys=True)
        if key not in done:
            if one_per_kernel and spec["fn"] in kernels:
                return  # recorded, not compiled
            kernels.add(spec["fn"])
            done[key] = _compile_one(spec, arch, summary, out)
        if done[key] is not None and done[key] > SHARED_LIMIT[arch]:
            raise OutOfResources(done[key], SHARED_LIMIT[arch], "shared memory")

    real_run, real_programs = JITFunction.run, triton_gemv._programs
    JITFunction.run = run
    triton_gemv._programs = lambda device: 2 * SMS  # as on the GPU: 2 programs per SM
    triton_int4._FITTING.clear()
    try:
        with FakeTensorMode():
            for dtype in (getattr(torch, TORCH_NAMES[d]) for d in dtypes):
                for kind in kinds:
                    for site in sites:
                        k, ns = SITES[site]
                        for bias in (False, True) if site == "qkv" else (False,):
                            try:
                                _workloads(torch, triton_gemv, triton_mm, dtype, kind, k, ns, bias)
                            except OutOfResources as exc:  # no configuration fitted
                                summary["failures"].append(f"sm_{arch} {dtype} {kind} {site}: {exc}")
    finally:
        JITFunction.run, triton_gemv._programs = real_run, real_programs
        triton_int4._FITTING.clear()
    return summary


def _workloads(torch, triton_gemv, triton_mm, dtype, kind, k, ns, bias) -> None:
    """One sibling group's calls: decode, prefill, training forward and dx (fake CUDA tensors)."""
    awq, cuda = kind == "awq", "cuda"
    qweight = [torch.empty((k, n // 8) if awq else (k // 8, n), dtype=torch.int32, device=cuda) for n in ns]
    qzeros = [torch.empty(k // GROUP, n // 8, dtype=torch.int32, device=cuda) for n in ns]
    scales = [torch.empty(k // GROUP, n, dtype=torch.float16, device=cuda) for n in ns]
    g_idx = [torch.empty(k, dtype=torch.int32, device=cuda) if kind == "gptq-act" else None for _ in ns]
    biases = [torch.empty(n, dtype=dtype, device=cuda) if bias else None for n in ns]
    groups = [GROUP] * len(ns)
    lora = ([torch.empty(RANK, k, device=cuda) for _ in ns], [torch.empty(n, RANK, device=cuda) for n in ns],
            [torch.empty(1, device=cuda) for _ in ns])
    x1 = torch.empty(1, k, dtype=dtype, device=cuda)
    triton_gemv.int4_gemv._init_fn(x1, qweight, qzeros, scales, g_idx, biases, groups, awq, *lora)
    x = torch.empty(2048, k, dtype=dtype, device=cuda)
    up_t = [torch.empty(2048, RANK, dtype=dtype, device=cuda) for _ in ns]
    up_w = [torch.empty(RANK, n, dtype=dtype, device=cuda) for n in ns]
    triton_mm.int4_mm._init_fn(x, qweight, qzeros, scales, g_idx, biases, groups, awq, up_t, up_w)
    triton_mm.int4_mm._init_fn(x, qweight, qzeros, scales, g_idx, biases, groups, awq, [], [])
    dy = torch.empty(2048, sum(ns), dtype=dtype, device=cuda)
    triton_mm.int4_mm_dx._init_fn(dy, qweight, qzeros, scales, g_idx, groups, awq)


def _compile_one(spec, arch, summary, out):
    """Compile one specialization for `arch`: its shared memory in bytes, or None where it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = spec["fn"].split(":")
    fn = getattr(importlib.import_module(module), name)
    params = list(fn.arg_names)
    sig = {p: spec["sig"][p] for p in params}
    const = {(params.index(p),): v for p, v in spec["const"].items()}
    # as the JIT specializes torch's allocations: every pointer 16-byte aligned
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if sig[p].startswith("*")}
    io = next(f"{p[:-4]}={sig[p][1:]}" for p in ("x_ptr", "dy_ptr", "out_ptr") if p in sig)
    label = f"sm_{arch} {name} {io} " + " ".join(
        f"{k}={v}" for k, v in sorted({**spec["const"], **spec["opts"]}.items()) if v is not None)
    summary["launches"] += 1
    start = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                                options=spec["opts"] or None)
    except Exception as exc:  # reported, and counted as a failure
        summary["failures"].append(f"{label}: {type(exc).__name__}: {str(exc)[:400]}")
        print(f"FAIL {label}: {exc}", file=out, flush=True)
        return None
    shared = kernel.metadata.shared
    summary["compiled"] += 1
    fits = shared <= SHARED_LIMIT[arch]
    if fits:
        summary["max_shared"] = max(summary["max_shared"], shared)
    else:
        summary["refused"] += 1
    print(f"{'ok  ' if fits else 'big '} {label}  shared {shared} B{'' if fits else ' (too big: smaller next)'}  "
          f"{time.perf_counter() - start:.1f} s", file=out, flush=True)
    return shared


def check(dtypes=DTYPES, archs=(90, 80, 89), kinds=KINDS, sites=tuple(SITES), one_per_kernel=False,
          out=sys.stdout) -> dict:
    """Per architecture: {"launches", "compiled", "refused" (did not fit: qpass took a smaller one), "failures",
    "max_shared" (of the launches that fitted)}."""
    return {arch: _launch_all(dtypes, kinds, sites, arch, one_per_kernel, out) for arch in archs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="activation dtypes, of " + ", ".join(DTYPES))
    parser.add_argument("--arch", default="90,80,89", help="compute capabilities, of " + ", ".join(map(str, SHARED_LIMIT)))
    parser.add_argument("--kinds", default=",".join(KINDS), help="layer kinds, of " + ", ".join(KINDS))
    parser.add_argument("--sites", default=",".join(SITES), help="sibling groups, of " + ", ".join(SITES))
    parser.add_argument("--one-per-kernel", action="store_true", help="compile only the first launch of each kernel")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    archs = [int(a) for a in args.arch.split(",") if a]
    kinds = [k for k in args.kinds.split(",") if k]
    sites = [s for s in args.sites.split(",") if s]
    bad = [d for d in dtypes if d not in DTYPES] + [str(a) for a in archs if a not in SHARED_LIMIT] + \
        [k for k in kinds if k not in KINDS] + [s for s in sites if s not in SITES]
    if bad:
        parser.error(f"unknown dtype, architecture, kind or site: {', '.join(bad)}")
    start = time.perf_counter()
    summary = check(dtypes, archs, kinds, sites, args.one_per_kernel)
    for arch, r in summary.items():
        print(f"sm_{arch}: {r['launches']} specializations, {r['compiled']} compiled, {r['refused']} too big for a "
              f"block (a smaller one launched instead), {len(r['failures'])} failures, max shared memory launched "
              f"{r['max_shared']} B of {SHARED_LIMIT[arch]}")
    print(f"{time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if any(r["failures"] for r in summary.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
