"""The C++ kernels' calls, one by one: median ms per call over interleaved rounds, for the shapes of one
2048-hidden decoder layer (q/k/v, gate/up, down; group 128; fp16 scales), GPTQ and AWQ packing, with and without
a rank-16 LoRA, float32 and bfloat16 x, 1 and 4 rows (gemv) and 128 rows (dequant + GEMM), and the bare unpack.

For before/after comparisons of kernel changes: one process loads one build of the kernels, so run this once per
build (e.g. a worktree of the old commit, with its own TORCH_EXTENSIONS_DIR), alternating, and compare the JSON
files (benchmarks/README.md, "The kernels written once"). Usage: python benchmarks/kernel_calls.py OUT.json [ROUNDS]
"""
import json
import statistics
import sys
import time

import torch

from qpass import kernels

H, I, G = 2048, 5632, 128  # hidden, intermediate, group


def packed(k: int, n: int, awq: bool):
    """Random 4-bit codes and zero points in the library's packing, fp16 scales (the values do not matter)."""
    qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8) if awq else (k // 8, n), dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // G, n // 8), dtype=torch.int32)
    return qweight, qzeros, (torch.rand(k // G, n) * 0.01).half()


def cases() -> dict:
    out = {}
    for awq in (False, True):
        tag = "awq" if awq else "gptq"
        gemv = kernels.awq4_gemv if awq else kernels.gptq4_gemv
        for name, k, ns in (("qkv", H, [H, 256, 256]), ("gate_up", H, [I, I]), ("down", I, [H])):
            sites = [packed(k, n, awq) for n in ns]
            bufs = [[s[i] for s in sites] for i in range(3)]
            for lora in (False, True):
                a = [torch.randn(16, k) * 0.01 for _ in ns] if lora else []
                b = [torch.randn(n, 16) * 0.01 for n in ns] if lora else []
                scaling = [torch.tensor([2.0]) for _ in ns] if lora else []
                for dt in (torch.float32, torch.bfloat16):
                    for m in (1, 4):
                        key = f"{tag}-{name}-{'lora' if lora else 'base'}-{str(dt)[6:]}-m{m}"
                        out[key] = (gemv, (torch.randn(m, k).to(dt), *bufs, G, a, b, scaling))
        bufs = [[t] for t in packed(H, I, awq)]
        for dt in (torch.float32, torch.bfloat16):
            mm = kernels.awq4_mm if awq else kernels.gptq4_mm
            dequant = kernels.awq4_dequant if awq else kernels.gptq4_dequant
            out[f"{tag}-mm-{str(dt)[6:]}-m128"] = (mm, (torch.randn(128, H).to(dt), *bufs, G))
            out[f"{tag}-dequant-{str(dt)[6:]}"] = (dequant, (*bufs, G, dt))
    return out


def main(path: str, rounds: int) -> None:
    assert kernels.available(), kernels.unavailable_reason()
    torch.manual_seed(0)
    calls = cases()
    times = {k: [] for k in calls}
    for f, args in calls.values():  # warm-up
        for _ in range(3):
            f(*args)
    for _ in range(rounds):  # interleaved: each round calls every case once
        for key, (f, args) in calls.items():
            t0 = time.perf_counter()
            f(*args)
            times[key].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    with open(path, "w") as fh:
        json.dump({"isa": kernels.isa(), "rounds": rounds, "ms": ms}, fh, indent=1)
    print(kernels.isa(), f"{sum(ms.values()):.1f} ms over {len(ms)} calls")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15)
