"""Real checkpoints: a tiny Llama quantized by gptqmodel itself (GPTQ act-order and AWQ), saved, loaded back
with `transformers.AutoModelForCausalLM.from_pretrained(dir)`, then `qpass.compile(model, adapter_dir)` end to
end — logits against PEFT on the same checkpoint, and training steps.

gptqmodel picks the layer class at load time (on an AVX-512 CPU: TorchCpuAvx512Linear / TorchCpuAvx512AwqLinear,
inference-only kernels that refuse `train()`); qpass computes those sites' base itself, so they train.
"""

import pytest
import torch

peft = pytest.importorskip("peft")

import qpass
from qpass.quant import QuantInfo, match

from ckpt_build import session_checkpoints
from conftest import LOGIT_TOL

pytestmark = pytest.mark.slow
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return session_checkpoints(tmp_path_factory)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")


def ids_for(path, n=4, seed=0):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    text = ["the quick brown fox 3 jumps over the lazy dog", "adapters train while the base stays frozen",
            "quantized models run on small machines", "the lazy dog number 5 jumps"][:n]
    return tok(text, return_tensors="pt", padding="max_length", max_length=10, truncation=True)["input_ids"]


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    """A PEFT LoRA adapter (non-zero B) per checkpoint, made by PEFT on the loaded checkpoint."""
    out = {}
    for method, path in checkpoints.items():
        model = peft.get_peft_model(load(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
        out[method] = tmp_path_factory.mktemp(f"adapter_{method}")
        model.save_pretrained(str(out[method]))
    return out


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_checkpoint_compiles_matches_peft_and_trains(checkpoints, adapters, method):
    path, adapter = checkpoints[method], adapters[method]
    ids = ids_for(path)
    base = load(path)
    infos = [match(m) for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in ALL]
    assert len(infos) == 14 and all(isinstance(i, QuantInfo) for i in infos), infos
    assert {i.method for i in infos} == {method}
    if method == "gptq":
        assert all(i.desc_act for i in infos)

    reference = peft.PeftModel.from_pretrained(load(path), str(adapter)).eval()
    with torch.no_grad():
        ref = reference(ids).logits.float()
        plain = load(path).eval()(ids).logits.float()
    tol = LOGIT_TOL[torch.bfloat16]
    assert (ref - plain).abs().max() > 10 * tol, "the adapter must change the logits"

    # one compile (train mode): the first step's logits are compared with PEFT's, then it trains on
    compiled = qpass.compile(base, str(adapter))
    compiled.train()
    buffers = {n: b.clone() for n, b in compiled.named_buffers() if n.endswith("qweight")}
    params = [p for p in compiled.parameters() if p.requires_grad]
    assert len(params) == 28
    opt = torch.optim.SGD(params, lr=0.5)
    losses = []
    for step in range(3):
        opt.zero_grad()
        result = compiled(input_ids=ids, labels=ids)
        if step == 0:
            err = (result.logits.detach().float() - ref).abs().max().item()
            assert err <= tol, f"{method}: max |Δlogit| vs PEFT {err:.3g} > {tol}"
        result.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        losses.append(result.loss.item())
    assert losses[-1] < losses[0], losses
    summary = qpass.report(compiled).summary()
    assert summary["sites_rewritten"] == 14, qpass.report(compiled)
    for n, b in compiled.named_buffers():
        if n in buffers:
            assert torch.equal(b, buffers[n]), n


def test_checkpoint_layer_classes_are_reported(checkpoints):
    """Whatever class gptqmodel selected for this CPU, qpass names it in the report with its base computation."""
    model = qpass.prepare(load(checkpoints["awq"]), peft.LoraConfig(r=2, target_modules=ALL))
    rows = [r for r in qpass.report(model).rows if r.adapter]
    assert len(rows) == 14
    assert all(r.library == "gptqmodel" and r.method == "awq" and r.bits == 4 and r.group_size == 32 for r in rows)
    assert all(r.base in ("torch dequant (eager)", "library kernel (eager)") for r in rows)
