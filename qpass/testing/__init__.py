"""Test fixtures: small quantized models built locally, with no model hub, for the examples, tests and
benchmarks (`qpass.testing.toy`), and the small real checkpoint of `python -m qpass demo-checkpoint`.

    from qpass.testing import tiny_gptq_llama
    model = tiny_gptq_llama()   # a 1-decoder-layer Llama whose 7 projections are gptqmodel TorchLinear layers
"""

from .toy import (
    DEMO_SENTENCES,
    LLAMA_PROJECTIONS,
    awq_linear_from,
    awq_rtn,
    build_llama,
    demo_tokenizer,
    gptq_linear_from,
    kv_cache,
    quantize_awq,
    quantize_gptq,
    rtn_quantize,
    tiny_awq_llama,
    tiny_gptq_llama,
    write_demo_checkpoint,
)

__all__ = [
    "DEMO_SENTENCES", "LLAMA_PROJECTIONS", "awq_linear_from", "awq_rtn", "build_llama", "demo_tokenizer",
    "gptq_linear_from", "kv_cache", "quantize_awq", "quantize_gptq", "rtn_quantize", "tiny_awq_llama", "tiny_gptq_llama",
    "write_demo_checkpoint",
]
