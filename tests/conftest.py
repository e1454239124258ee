"""Shared fixtures: tiny Llamas whose projections are real gptqmodel layers packed from real weights."""

import inspect
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import qpass
from qpass.testing import build_llama, tiny_gptq_llama

# Tolerances per dtype for logits of the tiny model (|logit| ~ 1): bf16/fp16 differences come from
# operation order (inductor fuses; PEFT runs op by op), fp32 from summation order only.
LOGIT_TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Decoder layers of qpass.testing's tiny Llamas (the tests build them with the default). One layer holds every
# kind of site (q/k/v and gate/up siblings, o, down); a compile's cost grows with the layers, and compiles are
# most of the suite's time. SITES: the quantized projections of such a model.
LAYERS = inspect.signature(build_llama).parameters["num_hidden_layers"].default
SITES = 7 * LAYERS


def make_model(dtype=torch.float32, **kw):
    return tiny_gptq_llama(dtype=dtype, **kw)


def input_ids(batch=2, seq=12, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def randomize_adapters(model, seed=0, std=0.1, match="lora_"):
    """Give every adapter tensor whose name holds `match` non-zero values (LoRA's B and OFT's R start at zero,
    which would hide bugs); "qpass_adapters" selects every qpass adapter tensor of any kind."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if match in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def bases(model):
    """The report's `base` column (the lowerings) of a prepared model or its compiled wrapper."""
    return [r.base for r in qpass.report(model).rows if r.base]


def mm_counting_backend(counts: list):
    """aot_eager that records how many aten.mm/addmm each forward graph calls."""
    from torch._dynamo.backends.common import aot_autograd

    def fw(gm, example_inputs):
        mms = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        counts.append(sum(n.op == "call_function" and n.target in mms for n in gm.graph.nodes))
        return gm.forward

    return aot_autograd(fw_compiler=fw)


def eager_and_counted(model, ids):
    """One forward without gradients, eager and compiled through `mm_counting_backend`: (eager logits, compiled
    logits, the GEMMs of each forward graph)."""
    counts = []
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend=qpass.backend(mm_counting_backend(counts)))(ids).logits
    return ref, out, counts


def eager_and_compiled(model, ids, inner="inductor"):
    """One forward without gradients through eager qpass and through torch.compile with qpass's backend:
    (eager logits, compiled logits, both as float32; the compiled model's `bases`; the compiled model)."""
    compiled = torch.compile(model, backend=qpass.backend(inner))
    with torch.no_grad():
        ref = model(ids).logits.float()
        out = compiled(ids).logits.float()
    return ref, out, bases(compiled), compiled


def adapter_grads(call, model, ids):
    """The trainable tensors' gradients after one backward of mean(logits²) through `call` (the model or its
    compiled wrapper); the model's gradients are zeroed again."""
    params = [p for p in model.parameters() if p.requires_grad]
    call(ids).logits.float().square().mean().backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad()
    return grads
