"""Greedy `generate()` on a GPTQ model with LoRA, compiled by qpass, two ways:

1. `qpass.compile(model, cfg)` compiles the model in place; `model.generate(...)` runs compiled with the
   default dynamic cache (three graphs: prefill, first decode step, then the cache length made dynamic).
2. HF's own compile: `cache_implementation="static"` with a `CompileConfig` (inductor, mode
   "reduce-overhead": CUDA graphs on a GPU) on a model qpass only prepared; one graph for every decode step.
   On CPU, HF compiles only when asked to (`_compile_all_devices`). HF runs the prefill uncompiled, so its
   first calls also compile gptqmodel's own dequantize (the library's eager path), once per layer and shape.

No model hub; CPU is enough.

    .venv/bin/python examples/generate.py
"""

if __name__ == "__main__":  # run as a script: progress lines on stderr, third-party start-up noise off
    from qpass.log import quiet_third_party, show_progress

    quiet_third_party()  # before torch, transformers and gptqmodel are imported
    show_progress()

import time

import torch
import transformers

import qpass
from qpass.testing import tiny_gptq_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config() -> qpass.LoraConfig:
    # init_lora_weights=False: random A and B, standing in for a trained adapter (B is zero at PEFT's init)
    return qpass.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)


def _generate(model, ids, **kwargs):
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, pad_token_id=0, **kwargs)
    return out, time.perf_counter() - start


def build(**model_kwargs):
    """The base model and the adapter's config; the adapter's random init is seeded, so every call attaches
    the same adapter (qpass draws it at prepare)."""
    torch.manual_seed(0)
    return tiny_gptq_llama(**model_kwargs), config()


def main(new_tokens: int = 20, **model_kwargs) -> dict:
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))

    model = qpass.compile(*build(**model_kwargs)).eval()
    for call in ("first (compiles)", "second"):
        dynamic, seconds = _generate(model, ids, max_new_tokens=new_tokens)
        print(f"qpass.compile + generate, {call}: {seconds * 1e3:.0f} ms, {qpass.report(model).stats.graphs} graph(s)")

    static_model = qpass.prepare(*build(**model_kwargs)).eval()
    compile_config = transformers.CompileConfig()
    compile_config._compile_all_devices = True  # HF's switch to auto-compile on CPU too
    for call in ("first (compiles)", "second"):
        static, seconds = _generate(static_model, ids, max_new_tokens=new_tokens, cache_implementation="static",
                                    compile_config=compile_config)
        print(f"static cache + CompileConfig, {call}: {seconds * 1e3:.0f} ms, "
              f"{qpass.report(static_model).stats.graphs} graph(s)")
    print("tokens:", dynamic[0, ids.shape[1]:].tolist(), "(static cache: same)" if torch.equal(dynamic, static) else "")
    print(qpass.report(model))
    return {"ids": ids, "dynamic": dynamic, "static": static, "model": model, "static_model": static_model}


if __name__ == "__main__":
    main()
