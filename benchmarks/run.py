"""qpass benchmark harness: one process, interleaved runs after warm-up, medians; JSON + PNG with ratios.

    .venv/bin/python benchmarks/run.py            # full: Llama hidden 1024 / intermediate 2816 / 4 layers / vocab 4096
    .venv/bin/python benchmarks/run.py --quick    # tiny sizes, few repeats (what tests/test_benchmarks.py runs)
    python benchmarks/run.py --device cuda        # the GPU run: Llama-2-7B shapes, CUDA graphs (see run_cuda)

Configurations (all bf16, LoRA r=16 alpha=32 on all 7 projections, 4-bit group 128 real gptqmodel/autoawq layers):
  peft_eager         PEFT on gptqmodel TorchLinear, eager
  peft_compiled      same, torch.compile (inductor)
  peft_aten_compiled PEFT on gptqmodel TorchAtenLinear (CPU int4 kernel), torch.compile — the strongest peer
                     (inference only: the layer locks its mode on its first forward)
  qpass              qpass.compile (LoRA), inductor
  qpass_base         qpass with every adapter disabled (the quantized base, qpass-lowered), compiled
  qpass_bf16_adapters  qpass with the LoRA weights in bfloat16 (prepare(adapter_dtype=torch.bfloat16)); not a
                     target row: the targets use float32 adapters, PEFT's default
  base_eager         the quantized model without adapters, gptqmodel TorchLinear, eager
  base_compiled      same, torch.compile (graph breaks in the library; not in the default set, qpass_base is the
                     compiled quantized base)
  dense_lora_compiled  the unquantized bf16 model + PEFT LoRA, torch.compile
  qpass_awq / peft_awq_eager / peft_aten_awq_compiled   the same for AWQ layers (autoawq WQLinear_GEMM for
                     qpass, gptqmodel AwqTorchLinear / TorchAtenAwqLinear for PEFT)
Workloads:
  decode   one new token with a KV cache (transformers DynamicCache) holding the prompt's 128 positions; the
           cache is cropped back to 128 after each step so every timed step has the same shapes
  prefill  1 x 128 tokens, no cache (use_cache=False)
  train    1 x 128 tokens: forward + loss + backward + AdamW step + zero_grad
Timing: every (config, workload) is warmed up (the first call compiles; its time minus the median is reported as
compile seconds), then rounds run each (workload, config) in turn; medians over rounds. A round's sample of a
short call (a decode step: 5 ms) is the mean of back-to-back calls lasting about --min-sample-ms (60 ms), as a
generation loop runs them; a single 5 ms call is at the mercy of the VM's scheduler.
Memory: tensor bytes each model holds (parameters, buffers, qpass's repacked int4 copies) and the process RSS
growth sampled during each configuration's calls; the process peak RSS (ru_maxrss) too.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
if __name__ == "__main__":  # run as a script: progress lines on stderr, third-party start-up noise off
    from qpass.log import quiet_third_party, show_progress

    quiet_third_party()  # before torch, transformers and gptqmodel are imported
    show_progress()

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from qpass.log import Step  # noqa: E402
from qpass.testing import kv_cache  # noqa: E402

PROGRESS_BAR = __name__ == "__main__"  # the timed rounds' bar (stderr); off when a test imports the harness

FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=4096)
QUICK = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=256)
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORKLOADS = ("decode", "prefill", "train")
FULL_CONFIGS = ["peft_eager", "peft_compiled", "peft_aten_compiled", "qpass", "qpass_base", "qpass_bf16_adapters",
                "qpass_int4pack", "base_eager",
                "dense_lora_compiled", "qpass_awq", "peft_awq_eager", "peft_aten_awq_compiled"]
QUICK_CONFIGS = ["peft_eager", "qpass", "qpass_base", "base_eager"]  # one compiled configuration family: fast
DTYPE = torch.bfloat16


# ---- memory -------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples the process RSS every millisecond while `with sampler.window():` is open; keeps the max."""

    def __init__(self):
        self.peak = 0
        self.active = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            if self.active:
                self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def measure(self, fn):
        start = rss_bytes()
        self.peak = start
        self.active = True
        try:
            fn()
        finally:
            self.active = False
        return start, max(self.peak, rss_bytes())

    def close(self):
        self._stop = True


def tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ---- models -------------------------------------------------------------------------------------------


def build(kind: str, sizes: dict, group: int, seed: int = 0):
    from qpass import testing

    if kind == "dense":
        return testing.build_llama(seed=seed, dtype=DTYPE, **sizes)
    if kind in ("gptq_torch", "gptq_aten"):
        cls = None
        if kind == "gptq_aten":
            from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear as cls
        model = testing.build_llama(seed=seed, dtype=DTYPE, **sizes)
        return testing.quantize_gptq(model, bits=4, group_size=group, sym=True, cls=cls).to(DTYPE)
    if kind in ("awq_autoawq", "awq_torch", "awq_aten"):
        cls = None
        if kind == "awq_torch":
            from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear as cls
        if kind == "awq_aten":
            from gptqmodel.nn_modules.qlinear.torch_aten_kernel_awq import TorchAtenAwqLinear as cls
        model = testing.build_llama(seed=seed, dtype=DTYPE, **sizes)
        return testing.quantize_awq(model, bits=4, group_size=group, cls=cls).to(DTYPE)
    raise ValueError(kind)


def peft_wrap(model, r):
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJ, lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))


class Config:
    """One configuration: a model and how to call it; `workloads` lists what it supports."""

    def __init__(self, name, model, call, *, workloads=WORKLOADS, note="", qpass_model=None, group=None):
        self.name, self.model, self.call = name, model, call
        self.workloads = tuple(workloads)
        self.note = note
        self.qpass_model = qpass_model
        self.group = group


def make_configs(names, sizes, group, r):
    import qpass

    cfgs = []

    def qpass_cfg(name, kind, base_only=False, base_layout="library", adapter_dtype=torch.float32,
                  workloads=WORKLOADS):
        model = build(kind, sizes, group)
        qpass.prepare(model, qpass.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"), base_layout=base_layout,
                      adapter_dtype=adapter_dtype)
        randomize_lora(model)
        if base_only:
            for site in model._qpass.sites.values():
                site.disabled = True
        compiled = torch.compile(model, backend=qpass.backend(), options={"guard_filter_fn": qpass.guard_filter})  # as qpass.compile
        return Config(name, model, compiled, qpass_model=model, group="awq" if "awq" in kind else "gptq",
                      workloads=("decode", "prefill") if base_only else workloads,
                      note="adapters disabled: nothing to train" if base_only else "")

    for name in names:
        if name == "peft_eager":
            m = peft_wrap(build("gptq_torch", sizes, group), r)
            randomize_lora(m)
            cfgs.append(Config(name, m, m, group="gptq"))
        elif name == "peft_compiled":
            m = peft_wrap(build("gptq_torch", sizes, group), r)
            randomize_lora(m)
            cfgs.append(Config(name, m, torch.compile(m), group="gptq"))
        elif name == "peft_aten_compiled":
            m = peft_wrap(build("gptq_aten", sizes, group), r)
            randomize_lora(m)
            cfgs.append(Config(name, m, torch.compile(m), workloads=("decode", "prefill"), group="gptq",
                               note="TorchAtenLinear locks inference mode on its first forward: no training"))
        elif name == "qpass":
            cfgs.append(qpass_cfg(name, "gptq_torch"))
        elif name == "qpass_base":
            cfgs.append(qpass_cfg(name, "gptq_torch", base_only=True))
        elif name == "qpass_bf16_adapters":  # prepare(adapter_dtype=torch.bfloat16): half the adapter bytes
            cfgs.append(qpass_cfg(name, "gptq_torch", adapter_dtype=torch.bfloat16, workloads=("decode", "prefill")))
        elif name == "qpass_int4pack":  # 4-bit weights held once, in the int4 kernel's layout
            cfgs.append(qpass_cfg(name, "gptq_torch", base_layout="int4pack"))
        elif name == "base_eager":
            m = build("gptq_torch", sizes, group)
            cfgs.append(Config(name, m, m, workloads=("decode", "prefill"), group="gptq", note="no adapters: nothing to train"))
        elif name == "base_compiled":
            m = build("gptq_torch", sizes, group)
            cfgs.append(Config(name, m, torch.compile(m), workloads=("decode", "prefill"), group="gptq",
                               note="no adapters: nothing to train"))
        elif name == "dense_lora_compiled":
            m = peft_wrap(build("dense", sizes, group), r)
            randomize_lora(m)
            cfgs.append(Config(name, m, torch.compile(m), group="dense"))
        elif name == "qpass_awq":
            cfgs.append(qpass_cfg(name, "awq_autoawq"))
        elif name == "peft_awq_eager":
            m = peft_wrap(build("awq_torch", sizes, group), r)
            randomize_lora(m)
            cfgs.append(Config(name, m, m, group="awq"))
        elif name == "peft_aten_awq_compiled":
            m = peft_wrap(build("awq_aten", sizes, group), r)
            randomize_lora(m)
            cfgs.append(Config(name, m, torch.compile(m), workloads=("decode", "prefill"), group="awq",
                               note="TorchAtenAwqLinear locks inference mode on its first forward: no training"))
        else:
            raise SystemExit(f"unknown configuration {name!r}")
    return cfgs


# ---- workloads ----------------------------------------------------------------------------------------


class Workloads:
    def __init__(self, vocab, prompt=128, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(0, vocab, (1, prompt), generator=g)
        self.next_token = torch.randint(0, vocab, (1, 1), generator=g)
        self.caches = {}
        self.optimizers = {}

    def _cache(self, cfg):
        from transformers import DynamicCache

        if cfg.name not in self.caches:
            self._mode(cfg, False)
            cache = DynamicCache(config=getattr(cfg.model, "config", None))
            with torch.no_grad():
                cfg.model(self.prompt, **kv_cache(cache), use_cache=True)  # eager prefill fills the cache
            self.caches[cfg.name] = cache
        return self.caches[cfg.name]

    @staticmethod
    def _mode(cfg, training):
        """Switch train/eval only when it changes: `Module.train()` walks every submodule (measured on the full
        model: 0.14 ms for qpass's, 1.27 ms for PEFT's), which is no part of a decode, prefill or training step;
        until 2026-11-24 every timed step paid it."""
        if cfg.model.training != training:
            cfg.model.train(training)

    def decode(self, cfg):
        cache = self._cache(cfg)
        self._mode(cfg, False)
        n = self.prompt.shape[1]
        with torch.no_grad():
            out = cfg.call(self.next_token, **kv_cache(cache), use_cache=True,
                           cache_position=torch.tensor([n]), position_ids=torch.tensor([[n]]))
        cache.crop(-1)  # back to the prompt: every timed step sees the same shapes
        return out.logits

    def prefill(self, cfg):
        self._mode(cfg, False)
        with torch.no_grad():
            return cfg.call(self.prompt, use_cache=False).logits

    def optimizer(self, cfg):
        """One AdamW per configuration, made at its first train step (kept in `self.optimizers`)."""
        if cfg.name not in self.optimizers:
            params = [p for p in cfg.model.parameters() if p.requires_grad]
            self.optimizers[cfg.name] = torch.optim.AdamW(params, lr=1e-4)
        return self.optimizers[cfg.name]

    def train(self, cfg):
        self._mode(cfg, True)
        opt = self.optimizer(cfg)
        loss = cfg.call(self.prompt, labels=self.prompt, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss


def dynamo_counts():
    """(graphs compiled, graph breaks) so far. Breaks wholly inside a quantization library are left out:
    gptqmodel compiles its own dequantize and breaks there whenever its layers run eagerly (e.g. while filling
    a KV cache eagerly), which belongs to no configuration's compiled graph (qpass's report does the same)."""
    from qpass.compile_hook import _library_internal

    c = torch._dynamo.utils.counters
    breaks = [r for r in torch._dynamo.utils.graph_break_reasons if not _library_internal(r)]
    return c["stats"].get("unique_graphs", 0), len(breaks)


# ---- the run ------------------------------------------------------------------------------------------


def run(args):
    sizes = QUICK if args.quick else FULL
    group = 32 if args.quick else 128
    repeats = args.repeats or (3 if args.quick else 12)
    min_sample = (args.min_sample_ms if args.min_sample_ms is not None else 0 if args.quick else 60.0) / 1e3
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.configs.split(",") if args.configs else (QUICK_CONFIGS if args.quick else FULL_CONFIGS)
    workloads = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    print(f"building {len(names)} configurations ({'quick' if args.quick else 'full'} sizes {sizes})", flush=True)
    with Step(f"building {len(names)} models (quantized by gptqmodel / autoawq packers)", "built the models"):
        cfgs = make_configs(names, sizes, group, args.rank)
    w = Workloads(sizes["vocab_size"], prompt=16 if args.quick else 128)
    sampler = RssSampler()
    results = {c.name: {"note": c.note, "group": c.group, "tensor_bytes": tensor_bytes(c.model)} for c in cfgs}

    # warm-up: first call compiles; graphs / breaks counted per (config, workload)
    calls = {}
    for wl in workloads:
        for c in cfgs:
            if wl not in c.workloads:
                continue
            graphs0, breaks0 = dynamo_counts()
            t0 = time.perf_counter()
            with Step(f"warm-up: first {wl} call of {c.name}", f"warm-up: first {wl} call of {c.name} done"):
                getattr(w, wl)(c)
            first = time.perf_counter() - t0
            for _ in range(args.warmup):
                t0 = time.perf_counter()
                getattr(w, wl)(c)
                warm = time.perf_counter() - t0
            graphs1, breaks1 = dynamo_counts()
            # a sample is `calls` back-to-back calls (a short call alone is at the mercy of the VM's scheduler)
            calls[(c.name, wl)] = max(1, min(50, math.ceil(min_sample / warm))) if args.warmup else 1
            results[c.name].setdefault(wl, {}).update(first_call_s=first, graphs=graphs1 - graphs0,
                                                       graph_breaks=breaks1 - breaks0,
                                                       calls_per_sample=calls[(c.name, wl)])
            print(f"  warm {wl:8s} {c.name:24s} first call {first:7.2f} s  graphs {graphs1 - graphs0} "
                  f"breaks {breaks1 - breaks0}", flush=True)

    # interleaved timed rounds
    times = {(c.name, wl): [] for c in cfgs for wl in workloads if wl in c.workloads}
    rss = {c.name: 0 for c in cfgs}
    bar = tqdm(total=repeats * len(times), desc=f"timed: {repeats} interleaved rounds", unit="sample",
               disable=not PROGRESS_BAR)
    for r in range(repeats):
        for wl in workloads:
            for c in cfgs:
                if wl not in c.workloads:
                    continue
                bar.update()
                box = {}

                k = calls[(c.name, wl)]

                def once():
                    t0 = time.perf_counter()
                    for _ in range(k):
                        getattr(w, wl)(c)
                    box["t"] = (time.perf_counter() - t0) / k

                start, peak = sampler.measure(once)
                times[(c.name, wl)].append(box["t"] * 1e3)
                rss[c.name] = max(rss[c.name], peak - start)
    bar.close()
    for (name, wl), ts in times.items():
        med = statistics.median(ts)
        entry = results[name][wl]
        entry.update(median_ms=med, min_ms=min(ts), max_ms=max(ts), n=len(ts),
                     compile_s=max(0.0, entry["first_call_s"] - med / 1e3))
    for c in cfgs:
        results[c.name]["step_rss_growth_bytes"] = rss[c.name]
        if c.qpass_model is not None:
            from qpass import lowering, resident

            sites = list(c.qpass_model._qpass.sites.values())
            results[c.name]["repacked_bytes"] = lowering.repacked_bytes(sites) + resident.kept_bytes(sites)
            rep = c.qpass_model._qpass.report
            results[c.name]["report_summary"] = rep.summary()
            results[c.name]["base_lowering"] = sorted({row.base for row in rep.rows if row.base})
            results[c.name]["adapter_bytes"] = sum(p.numel() * p.element_size() for p in c.qpass_model.parameters()
                                                   if p.requires_grad)

    extra = {}
    qp = next((c for c in cfgs if c.name == "qpass"), None)
    if qp is not None and "decode" in workloads:
        extra["profile_decode"] = profile(w, qp, args.profile_rows)
        if "prefill" in workloads:
            extra["recompiles"] = recompile_check(w, qp)
    if args.kernels:
        extra["kernels"] = kernel_table(sizes, group)
    sampler.close()

    out = {
        "command": "benchmarks/run.py " + " ".join(sys.argv[1:]),
        "mode": "quick" if args.quick else "full",
        "sizes": sizes, "group_size": group, "lora_rank": args.rank, "dtype": str(DTYPE), "repeats": repeats,
        "min_sample_ms": min_sample * 1e3,
        "environment": {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        },
        "decode_method": "1 token with a DynamicCache of 128 prompt positions (cropped back after each step)",
        "results": results,
        "targets": targets(results),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_seconds": time.perf_counter() - t_start,
        **extra,
    }
    return write_results(out, args, table)


# ---- checks and reports ---------------------------------------------------------------------------------


def profile(w, cfg, rows):
    from torch.profiler import ProfilerActivity, profile as prof

    for _ in range(2):
        w.decode(cfg)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(5):
            w.decode(cfg)
    events = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "calls_per_step": e.count / 5, "self_ms_per_step": e.self_cpu_time_total / 5e3,
             "percent": 100 * e.self_cpu_time_total / total} for e in events[:rows]]


def recompile_check(w, cfg):
    """prefill -> decode (cache growing, its length marked dynamic) -> prefill -> decode: compiles after the
    first of each shape family are recompiles."""
    from transformers import DynamicCache

    model = cfg.model
    model.eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=__import__("qpass").backend())
    frames = lambda: torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)  # noqa: E731
    log = []
    n = w.prompt.shape[1]
    with torch.no_grad():
        for phase in range(2):
            cache = DynamicCache(config=model.config)
            before = frames()
            ids = torch.tensor(w.prompt[:, : n - 4 * phase].tolist())  # another prompt length the second time (fresh: a
            # sliced view would add a stride guard, a recompile that real contiguous inputs never cause)
            torch._dynamo.mark_dynamic(ids, 1)
            compiled(ids, **kv_cache(cache), use_cache=True)
            log.append(("prefill", phase, frames() - before))
            pos = ids.shape[1]
            for step in range(3):
                before = frames()
                for layer in getattr(cache, "layers", []):
                    for t in (layer.keys, layer.values):
                        torch._dynamo.mark_dynamic(t, 2)
                compiled(w.next_token, **kv_cache(cache), use_cache=True, cache_position=torch.tensor([pos]),
                         position_ids=torch.tensor([[pos]]))
                log.append(("decode", phase * 3 + step, frames() - before))
                pos += 1
    first_prefill = log[0][2]
    first_decode = log[1][2]
    after = sum(c for _, _, c in log[2:4]) + sum(c for _, _, c in log[4:])
    return {"log": log, "graphs_first_prefill": first_prefill, "graphs_first_decode": first_decode,
            "graphs_after_first_of_each": after}


def kernel_table(sizes, group):
    """Per weight shape of the model: the int4 CPU kernel vs bf16 / fp32 GEMM on an already dense weight
    (the lower bound of dequant + matmul) vs qpass's compiled torch-dequant of one gptqmodel layer, at 1 and 128 tokens;
    at 1 token also qpass's gemv kernel on the layer's own packing (the decode lowering, no copy), at 128
    tokens qpass's C++ unpack + GEMM (the prefill / training lowering, no copy)."""
    import qpass
    from qpass import kernels
    from qpass.testing import gptq_linear_from

    h, i = sizes["hidden_size"], sizes["intermediate_size"]
    shapes = [(h, h), (h, 3 * h), (h, 2 * i), (i, h)]
    rows = []

    def best(f, n=15):
        for _ in range(2):
            f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    for k, n in shapes:
        lin = torch.nn.Linear(k, n, bias=False)
        q = gptq_linear_from(lin, bits=4, group_size=group).to(DTYPE)
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.randn(k // group, n, 2, dtype=DTYPE)
        qm = torch.nn.Sequential(q)
        qpass.prepare(qm, qpass.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        for site in qm._qpass.sites.values():
            site.disabled = True
        cq = torch.compile(qm, backend=qpass.backend(lowering="torch-dequant"))
        for m in (1, 128):
            x = torch.randn(1, m, k, dtype=DTYPE)
            wb, wf = torch.randn(k, n, dtype=DTYPE), torch.randn(k, n)
            with torch.no_grad():
                rows.append({
                    "K": k, "N": n, "tokens": m,
                    "int4pack_cpu_bf16_ms": best(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x[0], packed, group, sz)),
                    "dense_bf16_mm_ms": best(lambda: x @ wb),
                    "dense_fp32_mm_ms": best(lambda: x.float() @ wf),
                    "qpass_torch_dequant_bf16_ms": best(lambda: cq(x)),
                    "qpass_gemv_cpu_bf16_ms": best(lambda: kernels.gptq4_gemv(x[0], [q.qweight], [q.qzeros], [q.scales], group).to(DTYPE))
                    if m == 1 and kernels.available() else None,
                    "qpass_dequant_cpu_bf16_ms": best(lambda: kernels.gptq4_mm(x[0], [q.qweight], [q.qzeros], [q.scales], group))
                    if m > 1 and kernels.available() else None,
                })
    return rows


def _ms(results, name, wl):
    return results.get(name, {}).get(wl, {}).get("median_ms")


def targets(results):
    out = []

    def ratio(label, slow_cfg, fast_cfg, wl, goal, higher_is_faster=True):
        a, b = _ms(results, slow_cfg, wl), _ms(results, fast_cfg, wl)
        if a is None or b is None:
            return
        r = a / b
        out.append({"target": label, "ratio": round(r, 3), "goal": goal, "met": bool(r >= goal),
                    "baseline_ms": round(a, 3), "qpass_ms": round(b, 3)})

    for q, sfx in (("qpass", ""), ("qpass_awq", " (AWQ)")):
        ratio(f"decode vs PEFT+compile TorchAten{sfx}", "peft_aten_compiled" if not sfx else "peft_aten_awq_compiled", q, "decode", 1.2)
        ratio(f"decode vs PEFT eager TorchLinear{sfx}", "peft_eager" if not sfx else "peft_awq_eager", q, "decode", 10.0)
        ratio(f"prefill vs PEFT eager TorchLinear{sfx}", "peft_eager" if not sfx else "peft_awq_eager", q, "prefill", 1.5)
        ratio(f"prefill vs dense bf16 + LoRA compiled{sfx}", "dense_lora_compiled", q, "prefill", 1.0)
        ratio(f"train step vs PEFT eager{sfx}", "peft_eager" if not sfx else "peft_awq_eager", q, "train", 1.3)
    for wl in WORKLOADS:
        a, b = _ms(results, "qpass", wl), _ms(results, "qpass_base", wl)
        if a is not None and b is not None:
            out.append({"target": f"qpass LoRA within 10% of qpass base ({wl})", "ratio": round(a / b, 3),
                        "goal": "<= 1.10", "met": bool(a / b <= 1.10), "baseline_ms": round(b, 3), "qpass_ms": round(a, 3)})
    # base_layout="int4pack": the 4-bit weights held once (decode speed of the int4 kernel, memory of the base)
    ratio("decode vs PEFT+compile TorchAten (int4pack layout)", "peft_aten_compiled", "qpass_int4pack", "decode", 1.2)
    ratio("decode vs PEFT eager TorchLinear (int4pack layout)", "peft_eager", "qpass_int4pack", "decode", 10.0)
    ratio("prefill vs PEFT eager TorchLinear (int4pack layout)", "peft_eager", "qpass_int4pack", "prefill", 1.5)
    ratio("train step vs PEFT eager (int4pack layout)", "peft_eager", "qpass_int4pack", "train", 1.3)
    base = results.get("base_eager")
    for name, what in (("qpass", "qpass model + repacked copies"), ("qpass_int4pack", "qpass int4pack layout + kept library scales"),
                       ("qpass_awq", "qpass AWQ model + repacked copies")):
        q = results.get(name)
        if q and "adapter_bytes" in q and (base or name == "qpass_awq"):
            held = q["tensor_bytes"] + q.get("repacked_bytes", 0)
            # the AWQ model's own tensors are its quantized base plus adapters (base_eager is the GPTQ model)
            ref = q["tensor_bytes"] if name == "qpass_awq" else base["tensor_bytes"] + q["adapter_bytes"]
            out.append({"target": f"memory held: {what} <= 1.1x quantized base + adapters",
                        "ratio": round(held / ref, 3), "goal": "<= 1.10", "met": bool(held / ref <= 1.10),
                        "baseline_bytes": ref, "qpass_bytes": held})
    q = results.get("qpass")
    if q and base and "adapter_bytes" in q:
        gq, gb = q.get("step_rss_growth_bytes", 0), base.get("step_rss_growth_bytes", 0)
        out.append({"target": "RSS growth during a step: qpass vs quantized base eager", "qpass_bytes": gq,
                    "baseline_bytes": gb, "met": bool(gq <= 1.1 * gb + (1 << 20)), "goal": "<= 1.1x (+1 MiB slack)"})
    return out


def table(out) -> str:
    from tabulate import tabulate

    res = out["results"]
    rows = []
    for name, r in res.items():
        row = [name]
        for wl in WORKLOADS:
            e = r.get(wl)
            row.append("—" if not e or "median_ms" not in e else f"{e['median_ms']:.2f}")
        for wl in WORKLOADS:
            e = r.get(wl)
            row.append("—" if not e or "compile_s" not in e else f"{e['compile_s']:.1f}")
        row.append(sum(r.get(wl, {}).get("graph_breaks", 0) for wl in WORKLOADS))
        row.append(f"{(r['tensor_bytes'] + r.get('repacked_bytes', 0)) / 2**20:.1f}")
        rows.append(row)
    head = ["config", "decode ms", "prefill ms", "train ms", "compile s dec", "compile s pre", "compile s train",
            "graph breaks", "model MiB"]
    lines = [tabulate(rows, headers=head, tablefmt="github"), ""]
    for t in out["targets"]:
        lines.append(f"{'MET ' if t['met'] else 'MISS'}  {t['target']}: {t.get('ratio', '')} (goal {t['goal']})")
    rc = out.get("recompiles")
    if rc:
        lines.append(f"recompiles after the first prefill and first decode: {rc['graphs_after_first_of_each']}")
    return "\n".join(lines)


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = out["results"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    for ax, wl in zip(axes, WORKLOADS):
        names = [n for n in res if _ms(res, n, wl) is not None]
        vals = [_ms(res, n, wl) for n in names]
        ref = _ms(res, "peft_eager", wl)
        colors = ["tab:green" if n.startswith("qpass") else "tab:gray" for n in names]
        ax.barh(names, vals, color=colors)
        ax.set_xscale("log")
        ax.set_title(f"{wl} (ms, median; ratio vs PEFT eager)")
        for i, v in enumerate(vals):
            label = f"{v:.1f}" + (f"  ({ref / v:.1f}x)" if ref else "")
            ax.text(v, i, " " + label, va="center", fontsize=8)
        ax.invert_yaxis()
    env = out["environment"]
    fig.suptitle(f"qpass benchmark ({out['mode']}): {out['sizes']['hidden_size']}/{out['sizes']['intermediate_size']}, "
                 f"{out['sizes']['num_hidden_layers']} layers, bf16, LoRA r={out['lora_rank']}; "
                 f"{env['threads']} threads, load {env['loadavg_before'][0]:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- the GPU run (--device cuda) ----------------------------------------------------------------------------
# Llama-2-7B's shapes (4 of its 32 layers), 4-bit group-128 GPTQ TorchLinear, LoRA r=16 on all 7 projections,
# bf16. Decode: one token after a StaticCache holding a 128-position prompt, written at the same position every
# step (the CPU run crops a DynamicCache instead); compiled configurations decode with mode="reduce-overhead"
# (CUDA graphs). Prefill 1 x 2048, train step 2 x 1024 (forward + loss + backward + AdamW + zero_grad), both
# use_cache=False (on torch 2.11 a compiled forward that builds a DynamicCache fails in dynamo's guards). Every
# sample is timed by CUDA events around back-to-back calls; peak memory is torch.cuda.max_memory_allocated over
# one call after warm-up.

CUDA_SIZES = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000)
CUDA_CONFIGS = ["peft_eager", "peft_compiled", "dense_lora_compiled", "qpass", "qpass_base", "qpass_mm_cuda"]
# qpass_mm_cuda: qpass, mm-cuda (fused dequant-GEMM), requested explicitly ("auto" keeps torch-dequant for prefill and
# training): prefill and train step only, timed against qpass's rows (torch-dequant) by the mm-cuda target rows
CUDA_SHAPES = {"full": {"decode": (1, 1), "prefill": (1, 2048), "train": (2, 1024)},
               "quick": {"decode": (1, 1), "prefill": (1, 128), "train": (2, 64)}}
CUDA_PROMPT = 128
CUDA_DEVICE = "cuda"


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/run.py --device cuda: no CUDA device here (torch.cuda.is_available() is False, "
                         f"torch {torch.__version__}); run it on a GPU machine (scripts/gpu-check.sh), or leave out "
                         "--device cuda for the CPU run")


_PACKED: dict = {}  # (projection, shape, group) -> packed buffers: every model of a run has the same seeded weights


def gptq_rtn_buffers(weight, group: int) -> dict:
    """4-bit GPTQ buffers (CPU) of `weight` (N, K), quantized as qpass.testing's `gptq_linear_from` does
    (symmetric round-to-nearest against fp16 scales, groups in order; the same buffers bit for bit), rounded on
    the weight's device and packed by the GPTQ layout's vectorised packer instead of gptqmodel's per-layer
    `pack_block` (minutes for a 7B-shaped model on the CPU)."""
    import types

    from qpass.quant.gptqmodel import gptq_packed

    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group, group)
    amax = torch.maximum(w.amin(2).clamp(max=0).abs(), w.amax(2).clamp(min=0))
    scales = (2 * amax / 15).clamp(min=1e-6).half()  # (N, G): stored as fp16, the codes rounded against those
    codes = (torch.round(w / scales.float().unsqueeze(2)) + 8).clamp(0, 15).to(torch.int32).reshape(n, k).cpu()
    zeros = torch.full((k // group, n), 8, dtype=torch.int32)  # symmetric: zero code 8, packed along N
    return {"qweight": gptq_packed.pack_codes(types.SimpleNamespace(in_features=k, out_features=n), codes),
            "qzeros": gptq_packed.pack_codes(types.SimpleNamespace(in_features=n, out_features=k // group), zeros).t(),
            "scales": scales.t().cpu(), "g_idx": torch.arange(k, dtype=torch.int32) // group}


def gptq_rtn_linear(name: str, linear, group: int):
    """A gptqmodel TorchLinear on `linear`'s device holding `gptq_rtn_buffers` of its weight (made once per run)."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    from qpass.quant import normal_storage

    n, k = linear.weight.shape
    key = (name, n, k, group)
    if key not in _PACKED:
        _PACKED[key] = gptq_rtn_buffers(linear.weight, group)
    q = TorchLinear(bits=4, group_size=group, sym=True, desc_act=False, in_features=k, out_features=n, bias=False)
    with torch.no_grad():
        for buffer, value in _PACKED[key].items():
            getattr(q, buffer).copy_(value)
    normal_storage(q)
    q.post_init()
    return q.eval().to(linear.weight.device)


def cuda_model(kind: str, sizes: dict, group: int):
    """The bf16 Llama built on the GPU ("dense"), or with its 7 projections per layer as 4-bit GPTQ ("gptq")."""
    from qpass import testing

    with torch.device(CUDA_DEVICE):
        model = testing.build_llama(seed=0, dtype=DTYPE, **sizes)
    if kind == "gptq":
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJ:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, gptq_rtn_linear(name, module, group).to(DTYPE))
    model.config.use_cache = False
    return model


class CudaConfig(Config):
    """A configuration on the GPU: `call` for prefill and training, `decode_call` for decode steps."""

    def __init__(self, name, model, call, decode_call, **kw):
        super().__init__(name, model, call, **kw)
        self.decode_call = decode_call


def cuda_configs(names, sizes, group, r):
    import qpass

    def compiled(model, mode=None):
        return torch.compile(model, mode=mode)

    cfgs = []
    for name in names:
        if name in ("peft_eager", "peft_compiled", "dense_lora_compiled"):
            m = peft_wrap(cuda_model("dense" if name.startswith("dense") else "gptq", sizes, group), r)
            randomize_lora(m)
            if name == "peft_eager":
                cfgs.append(CudaConfig(name, m, m, m, group="gptq"))
            else:
                cfgs.append(CudaConfig(name, m, compiled(m), compiled(m, "reduce-overhead"),
                                       group="dense" if name.startswith("dense") else "gptq"))
        elif name in ("qpass", "qpass_base", "qpass_mm_cuda"):
            m = cuda_model("gptq", sizes, group)
            qpass.prepare(m, qpass.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
            randomize_lora(m)
            for site in m._qpass.sites.values():
                site.disabled = name == "qpass_base"
            opts = {"guard_filter_fn": qpass.guard_filter}  # as qpass.compile
            if name == "qpass_mm_cuda":
                call = torch.compile(m, backend=qpass.backend(lowering="mm-cuda"), options=opts)
                cfgs.append(CudaConfig(name, m, call, None, qpass_model=m, group="gptq", workloads=("prefill", "train"),
                                       note="qpass, mm-cuda (fused dequant-GEMM)"))
                continue
            cfgs.append(CudaConfig(name, m, torch.compile(m, backend=qpass.backend(), options=opts),
                                   torch.compile(m, backend=qpass.backend(mode="reduce-overhead"), options=opts),
                                   qpass_model=m, group="gptq",
                                   workloads=("decode", "prefill") if name == "qpass_base" else WORKLOADS))
        else:
            raise SystemExit(f"unknown configuration {name!r} for --device cuda (one of {', '.join(CUDA_CONFIGS)})")
    return cfgs


class CudaWorkloads:
    def __init__(self, vocab, shapes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = {wl: torch.randint(0, vocab, shape, generator=g).to(CUDA_DEVICE) for wl, shape in shapes.items()}
        self.prompt = torch.randint(0, vocab, (1, CUDA_PROMPT), generator=g).to(CUDA_DEVICE)
        self.position = torch.tensor([CUDA_PROMPT], device=CUDA_DEVICE)
        self.caches, self.optimizers = {}, {}

    def decode(self, cfg):
        from transformers import StaticCache

        Workloads._mode(cfg, False)
        with torch.no_grad():
            if cfg.name not in self.caches:  # the prompt, eagerly: the cache's tensors are made outside any graph
                cache = StaticCache(config=cfg.model.config, max_cache_len=CUDA_PROMPT + 1)
                cfg.model(self.prompt, **kv_cache(cache), use_cache=True)
                self.caches[cfg.name] = cache
            torch.compiler.cudagraph_mark_step_begin()
            cache = self.caches[cfg.name]
            logits = cfg.decode_call(self.ids["decode"], **kv_cache(cache), cache_position=self.position,
                                     use_cache=True).logits
            if getattr(cache.layers[0], "cumulative_length", None) is not None:
                cache.crop(-1)  # transformers 5.x counts the positions written: back to the prompt's
            return logits

    def prefill(self, cfg):
        Workloads._mode(cfg, False)
        with torch.no_grad():
            return cfg.call(self.ids["prefill"], use_cache=False).logits

    def train(self, cfg):
        Workloads._mode(cfg, True)
        opt = Workloads.optimizer(self, cfg)
        ids = self.ids["train"]
        loss = cfg.call(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss


def cuda_time(fn, calls: int) -> float:
    """ms per call: CUDA events around `calls` back-to-back calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def cuda_peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def cuda_warm(w, cfgs, workloads, results, warmup, min_sample_s) -> dict:
    """First calls (compile), warm-up, calls per sample and peak memory per (config, workload)."""
    calls = {}
    for wl in workloads:
        for c in (c for c in cfgs if wl in c.workloads):
            graphs0, breaks0 = dynamo_counts()
            t0 = time.perf_counter()
            with Step(f"warm-up: first {wl} call of {c.name}", f"warm-up: first {wl} call of {c.name} done"):
                getattr(w, wl)(c)
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            warm = min(cuda_time(lambda: getattr(w, wl)(c), 1) for _ in range(max(1, warmup)))
            graphs1, breaks1 = dynamo_counts()
            calls[(c.name, wl)] = max(1, min(50, math.ceil(min_sample_s * 1e3 / max(warm, 1e-3))))
            results[c.name].setdefault(wl, {}).update(
                first_call_s=first, graphs=graphs1 - graphs0, graph_breaks=breaks1 - breaks0,
                calls_per_sample=calls[(c.name, wl)], peak_memory_bytes=cuda_peak(lambda: getattr(w, wl)(c)))
            print(f"  warm {wl:8s} {c.name:24s} first call {first:7.2f} s  graphs {graphs1 - graphs0} "
                  f"breaks {breaks1 - breaks0}", flush=True)
    return calls


def cuda_targets(results) -> list:
    out = []

    def ratio(label, slow, fast, wl, goal):
        a, b = _ms(results, slow, wl), _ms(results, fast, wl)
        if a is not None and b is not None:
            out.append({"target": label, "ratio": round(a / b, 3), "goal": goal, "met": bool(a / b >= goal),
                        "baseline_ms": round(a, 3), "qpass_ms": round(b, 3)})

    ratio("decode vs PEFT+compile (CUDA graphs both)", "peft_compiled", "qpass", "decode", 1.2)
    ratio("decode vs PEFT eager", "peft_eager", "qpass", "decode", 10.0)
    ratio("prefill vs PEFT eager", "peft_eager", "qpass", "prefill", 1.5)
    ratio("prefill vs dense bf16 + LoRA compiled", "dense_lora_compiled", "qpass", "prefill", 1.0)
    ratio("train step vs PEFT eager", "peft_eager", "qpass", "train", 1.3)
    a, b = _ms(results, "qpass", "decode"), _ms(results, "qpass_base", "decode")
    if a is not None and b is not None:
        out.append({"target": "qpass LoRA within 10% of qpass base (decode)", "ratio": round(a / b, 3),
                    "goal": "<= 1.10", "met": bool(a / b <= 1.10), "baseline_ms": round(b, 3), "qpass_ms": round(a, 3)})
    q, p = results.get("qpass", {}).get("train", {}), results.get("peft_eager", {}).get("train", {})
    if "peak_memory_bytes" in q and "peak_memory_bytes" in p:
        r = q["peak_memory_bytes"] / p["peak_memory_bytes"]
        out.append({"target": "train peak memory: qpass <= 1.1x PEFT eager", "ratio": round(r, 3), "goal": "<= 1.10",
                    "met": bool(r <= 1.10), "baseline_bytes": p["peak_memory_bytes"],
                    "qpass_bytes": q["peak_memory_bytes"]})
    # whether "auto" should pick mm-cuda: met where the fused dequant-GEMM beats torch-dequant (qpass's own rows)
    ratio("prefill: mm-cuda vs torch-dequant (qpass)", "qpass", "qpass_mm_cuda", "prefill", 1.0)
    ratio("train step: mm-cuda vs torch-dequant (qpass)", "qpass", "qpass_mm_cuda", "train", 1.0)
    m, t = results.get("qpass_mm_cuda", {}).get("train", {}), results.get("qpass", {}).get("train", {})
    if "peak_memory_bytes" in m and "peak_memory_bytes" in t:
        r = m["peak_memory_bytes"] / t["peak_memory_bytes"]
        out.append({"target": "train peak memory: mm-cuda <= torch-dequant (qpass)", "ratio": round(r, 3),
                    "goal": "<= 1.00", "met": bool(r <= 1.0), "baseline_bytes": t["peak_memory_bytes"],
                    "qpass_bytes": m["peak_memory_bytes"]})
    return out


def cuda_table(out) -> str:
    from tabulate import tabulate

    rows = [[name] + [f"{r[wl]['peak_memory_bytes'] / 2**20:.0f}" if "peak_memory_bytes" in r.get(wl, {}) else "—"
                      for wl in WORKLOADS] + [", ".join(r.get("lowerings", []))]
            for name, r in out["results"].items()]
    head = ["config", "decode peak MiB", "prefill peak MiB", "train peak MiB", "qpass lowerings"]
    peaks = tabulate(rows, headers=head, tablefmt="github")
    return table(out) + "\n\n" + peaks


def run_cuda(args):
    require_cuda()
    sizes = QUICK if args.quick else CUDA_SIZES
    shapes = CUDA_SHAPES["quick" if args.quick else "full"]
    repeats = args.repeats or (3 if args.quick else 10)
    names = args.configs.split(",") if args.configs else CUDA_CONFIGS
    workloads = args.workloads.split(",") if args.workloads else list(WORKLOADS)
    min_sample = (args.min_sample_ms if args.min_sample_ms is not None else 20.0) / 1e3
    t_start = time.perf_counter()
    torch.manual_seed(0)
    with Step(f"building {len(names)} models on the GPU", "built the models"):
        cfgs = cuda_configs(names, sizes, 128, args.rank)
    w = CudaWorkloads(sizes["vocab_size"], shapes)
    results = {c.name: {"note": c.note, "group": c.group, "tensor_bytes": tensor_bytes(c.model)} for c in cfgs}
    calls = cuda_warm(w, cfgs, workloads, results, args.warmup, min_sample)
    times = {key: [] for key in calls}
    for _ in tqdm(range(repeats), desc=f"timed: {repeats} interleaved rounds", disable=not PROGRESS_BAR):
        for (name, wl), k in calls.items():
            c = next(c for c in cfgs if c.name == name)
            times[(name, wl)].append(cuda_time(lambda: getattr(w, wl)(c), k))
    for (name, wl), ts in times.items():
        med = statistics.median(ts)
        entry = results[name][wl]
        entry.update(median_ms=med, min_ms=min(ts), max_ms=max(ts), n=len(ts),
                     compile_s=max(0.0, entry["first_call_s"] - med / 1e3))
    for c in (c for c in cfgs if c.qpass_model is not None):
        from qpass import lowering

        sites = list(c.qpass_model._qpass.sites.values())
        results[c.name]["repacked_bytes"] = lowering.repacked_bytes(sites)
        bases = {row.base for row in c.qpass_model._qpass.report.rows if row.base}
        results[c.name]["base_lowering"] = sorted(bases)
        results[c.name]["lowerings"] = [n for n in lowering.LOWERINGS if any(lowering.label(n) in b for b in bases)]
        results[c.name]["adapter_bytes"] = sum(p.numel() * p.element_size() for p in c.qpass_model.parameters()
                                               if p.requires_grad)
    out = {
        "command": "benchmarks/run.py " + " ".join(sys.argv[1:]), "mode": "quick" if args.quick else "full",
        "device": torch.cuda.get_device_name(0), "sizes": sizes, "shapes": shapes, "group_size": 128,
        "lora_rank": args.rank, "dtype": str(DTYPE), "repeats": repeats, "min_sample_ms": min_sample * 1e3,
        "environment": {"torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
                        "platform": platform.platform(), "loadavg_before": os.getloadavg(),
                        "loadavg_after": os.getloadavg()},
        "decode_method": f"1 token into a StaticCache holding {CUDA_PROMPT} prompt positions (same position each "
                         "step); compiled configurations with mode='reduce-overhead' (CUDA graphs)",
        "timing": "CUDA events around back-to-back calls; median of interleaved rounds",
        "results": results, "targets": cuda_targets(results), "wall_seconds": time.perf_counter() - t_start,
    }
    return write_results(out, args, cuda_table)


def write_results(out: dict, args, render) -> dict:
    """`latest.json` (and `latest.png` unless --no-plot) in --out; prints `render(out)`, the results table."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(out, indent=1, default=str))
    if not args.no_plot:
        plot(out, out_dir / "latest.png")
    print(render(out))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (the test runs this)")
    p.add_argument("--repeats", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="each timed sample repeats a call back to back until it lasts about this long (at most 50 "
                        "calls); the sample is the mean per call. Default 60, --quick 0")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--configs", default="", help="comma-separated subset of configurations")
    p.add_argument("--workloads", default="", help="comma-separated subset of decode,prefill,train")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--kernels", action="store_true", help="also time the int4 kernel vs dense GEMMs per shape")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; --device cuda: "
                                                 "benchmarks/results/cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the GPU run (Llama-2-7B-shaped model, CUDA graphs decode; see run_cuda)")
    args = p.parse_args(argv)
    if args.device == "cuda":
        args.out = args.out or str(HERE / "results" / "cuda")
        return run_cuda(args)
    args.out = args.out or str(HERE / "results")
    return run(args)


if __name__ == "__main__":
    main()
