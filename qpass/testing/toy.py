"""Small quantized models built locally, with no model hub: for the quickstart, tests and benchmarks.

`build_llama` makes a tiny Llama from a transformers config; `quantize_gptq` replaces its decoder
projections with real gptqmodel layers whose packed weights come from a round-to-nearest (RTN)
quantisation of the original weights, packed by gptqmodel's own `pack_block`.

The quantization libraries and transformers are imported by the functions that use them: AutoAWQ is optional,
and gptqmodel reads its environment (GPTQMODEL_CPU_WORKERS, set by `write_demo_checkpoint`) when imported.
"""

from __future__ import annotations

import functools
import os
import tempfile

import torch
from torch import nn

from ..log import import_autoawq_quietly
from ..quant import normal_storage

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_llama(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 1,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised `LlamaForCausalLM` (untied embeddings) built from a config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor):
    """Round-to-nearest scales and zero points per (output row, group), GPTQ convention.

    Returns `scales` and `zeros` of shape (out_features, n_groups) as gptqmodel's `pack_block` expects.
    """
    out_features, in_features = weight.shape
    n_groups = int(g_idx.max()) + 1
    maxq = 2**bits - 1
    w = weight.detach().float()
    scales = torch.empty(out_features, n_groups)
    zeros = torch.empty(out_features, n_groups)
    for g in range(n_groups):
        cols = w[:, g_idx == g]
        lo = cols.amin(dim=1).clamp(max=0)
        hi = cols.amax(dim=1).clamp(min=0)
        if sym:
            amax = torch.maximum(lo.abs(), hi)
            scale = (2 * amax / maxq).clamp(min=1e-6)
            zero = torch.full_like(scale, (maxq + 1) // 2)
        else:
            scale = ((hi - lo) / maxq).clamp(min=1e-6)
            zero = torch.round(-lo / scale).clamp(0, maxq)
        # pack_block stores fp16 scales; quantise against exactly those.
        scales[:, g] = scale.half().float()
        zeros[:, g] = zero
    return scales, zeros


def gptq_linear_from(
    linear: nn.Linear,
    *,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = True,
    desc_act: bool = False,
    seed: int = 0,
    cls=None,
):
    """A gptqmodel quantized linear layer (default `TorchLinear`) packed from `linear`'s weights."""
    if cls is None:
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear as cls
    in_features, out_features = linear.in_features, linear.out_features
    if desc_act:
        # act-order: groups are assigned to a permutation of the input features, so g_idx is not monotone.
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(in_features, generator=gen)
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_features) // group_size).to(torch.int32)
    else:
        g_idx = (torch.arange(in_features) // group_size).to(torch.int32)
    scales, zeros = rtn_quantize(linear.weight, bits, group_size, sym, g_idx)
    q = cls(
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        in_features=in_features,
        out_features=out_features,
        bias=linear.bias is not None,
    )
    cpu_linear = nn.Linear(in_features, out_features, bias=linear.bias is not None)
    with torch.no_grad():
        cpu_linear.weight.copy_(linear.weight.float())
        if linear.bias is not None:
            cpu_linear.bias.copy_(linear.bias.float())
    try:
        q.pack_block(cpu_linear, scales, zeros, g_idx)
    except NotImplementedError:  # load-only classes (TorchInt8Linear): load TorchLinear's packed tensors
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear

        packer = gptq_linear_from(linear, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, seed=seed,
                                  cls=TorchLinear)
        q.load_state_dict({k: v.clone() for k, v in packer.state_dict().items() if k in q.state_dict()})
    normal_storage(q)  # pack_block runs under inference_mode
    q.post_init()
    q.eval()
    return q


def quantize_gptq(
    model: nn.Module,
    *,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = True,
    desc_act: bool = False,
    targets=LLAMA_PROJECTIONS,
    cls=None,
):
    """Replace every decoder projection named in `targets` by a packed gptqmodel layer, in place."""
    for i, (name, module) in enumerate(list(model.named_modules())):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(
            parent,
            child,
            gptq_linear_from(module, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, seed=i, cls=cls),
        )
    return model


def tiny_gptq_llama(*, bits: int = 4, group_size: int = 32, sym: bool = True, desc_act: bool = False, seed: int = 0, **llama):
    """A tiny Llama whose 7 projections per layer are gptqmodel `TorchLinear` layers."""
    model = build_llama(seed=seed, **llama)
    return quantize_gptq(model, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)


# ---- AWQ (AutoAWQ's WQLinear_GEMM, gptqmodel's AWQ classes) -------------------------------------------


def awq_rtn(weight: torch.Tensor, bits: int, group_size: int):
    """Asymmetric round-to-nearest per (group of inputs, output), AWQ convention: W ≈ (q - z) * s.

    Returns `scales`, `zeros` of shape (n_groups, out_features) and the weight clamped to the representable
    range (the AWQ packers round without clamping, so a code must not fall outside [0, 2**bits - 1]).
    """
    out_features, in_features = weight.shape
    maxq = 2**bits - 1
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    lo = w.amin(dim=2).clamp(max=0)
    hi = w.amax(dim=2).clamp(min=0)
    scales = ((hi - lo) / maxq).clamp(min=1e-5).half().float()  # stored as fp16: quantise against those
    zeros = torch.round(-lo / scales).clamp(0, maxq)
    clamped = torch.maximum(torch.minimum(w, ((maxq - zeros) * scales).unsqueeze(2)), (-zeros * scales).unsqueeze(2))
    return scales.t().contiguous(), zeros.t().contiguous(), clamped.reshape(out_features, in_features)


def awq_linear_from(linear: nn.Linear, *, bits: int = 4, group_size: int = 32, cls=None):
    """An AWQ layer packed from `linear` by the library's own packer: AutoAWQ's `WQLinear_GEMM.from_linear`
    (default), or a gptqmodel AWQ class (`cls=AwqTorchLinear`, `TorchFusedAwqLinear`, ...) via its `pack`."""
    scales, zeros, clamped = awq_rtn(linear.weight, bits, group_size)
    cpu_linear = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        cpu_linear.weight.copy_(clamped)
        if linear.bias is not None:
            cpu_linear.bias.copy_(linear.bias.float())
    if cls is None:
        import_autoawq_quietly()  # without its import-time farewell notice (see there)
        from awq.modules.linear.gemm import WQLinear_GEMM

        q = WQLinear_GEMM.from_linear(cpu_linear, bits, group_size, init_only=False, scales=scales, zeros=zeros)
    else:
        from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

        def make(c):
            return c(bits=bits, group_size=group_size, sym=False, desc_act=False, in_features=linear.in_features,
                     out_features=linear.out_features, bias=linear.bias is not None, register_buffers=True)

        packer = make(cls if hasattr(cls, "pack") else AwqTorchLinear)
        packer.pack(cpu_linear, scales.t().contiguous(), zeros.t().contiguous())
        q = packer
        if not isinstance(q, cls):  # kernel-only classes load packed tensors, as from a checkpoint
            q = make(cls)
            q.load_state_dict({k: v.clone() for k, v in packer.state_dict().items()})
        normal_storage(q)
        q.post_init()
    q.eval()
    return q


def quantize_awq(model: nn.Module, *, bits: int = 4, group_size: int = 32, targets=LLAMA_PROJECTIONS, cls=None):
    """Replace every decoder projection named in `targets` by a packed AWQ layer, in place."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, awq_linear_from(module, bits=bits, group_size=group_size, cls=cls))
    return model


def tiny_awq_llama(*, bits: int = 4, group_size: int = 32, seed: int = 0, cls=None, **llama):
    """A tiny Llama whose 7 projections per layer are AWQ layers (AutoAWQ WQLinear_GEMM by default)."""
    model = build_llama(seed=seed, **llama)
    return quantize_awq(model, bits=bits, group_size=group_size, cls=cls)


# ---- a real checkpoint on disk, quantized by gptqmodel itself (`python -m qpass demo-checkpoint`) ----------

DEMO_SENTENCES = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7 % 13}" for i in range(48)] + [
    "quantized models run on small machines",
    "adapters train while the base stays frozen",
]


def demo_tokenizer():
    """A WordLevel tokenizer trained on `DEMO_SENTENCES` (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DEMO_SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


def write_demo_checkpoint(out, method: str = "gptq") -> None:
    """Quantize a tiny Llama (hidden 128, 2 layers) with gptqmodel itself into `out`: GPTQ (4-bit, group 32,
    act-order) or AWQ (4-bit, group 32, GEMM format), calibrated on `DEMO_SENTENCES`; config.json with its
    `quantization_config`, the weights and the tokenizer, loadable by `AutoModelForCausalLM.from_pretrained(out)`.
    Offline; about 40 s on 2 cores.

    gptqmodel's quantizer sets process-global state (thread pools, inductor options): run it in a process of
    its own (`python -m qpass demo-checkpoint OUT_DIR`, or tests/ckpt_build.py), not inside one that trains.
    gptqmodel 7.7 asks for 2 CPU workers, which a 2-core machine only has with GPTQMODEL_CPU_WORKERS=2 (set here
    unless set already)."""
    if method not in ("gptq", "awq"):
        raise ValueError(f"unknown method {method!r}; use gptq or awq")
    # `ValueError: Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1` otherwise
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = demo_tokenizer()
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    if method == "gptq":
        qcfg = QuantizeConfig(bits=4, group_size=32, desc_act=True, sym=True, act_group_aware=False)  # desc_act's
    else:
        qcfg = QuantizeConfig(bits=4, group_size=32, method=METHOD.AWQ, format=FORMAT.GEMM, sym=False, desc_act=False)
    calibration = []
    for s in DEMO_SENTENCES[:32]:
        ids = tokenizer(s)["input_ids"]
        calibration.append({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})
    with tempfile.TemporaryDirectory(prefix="qpass-demo-fp-") as base:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(base)
        tokenizer.save_pretrained(base)
        model = GPTQModel.load(base, qcfg, device="cpu")
        model.quantize(calibration, batch_size=1)
        model.save(str(out))
    tokenizer.save_pretrained(str(out))


def kv_cache(cache) -> dict:
    """The keyword argument that passes a KV cache to a transformers model's forward: `cache` where the installed
    transformers has it (5.25 deprecates `past_key_values` for it), else `past_key_values`."""
    return {_kv_cache_keyword(): cache}


@functools.cache
def _kv_cache_keyword() -> str:  # looked up once: the benchmark's timed decode steps call kv_cache
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
