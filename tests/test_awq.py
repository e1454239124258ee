"""AutoAWQ (`awq.modules.linear.gemm.WQLinear_GEMM`, autoawq installed with --no-deps) under qpass on CPU.

AutoAWQ's own forward cannot run here (triton installed, no CUDA: `invalid argument to exchangeDevice`) and
has no CPU backward, so qpass computes the base from the module's buffers in eager and under compile; the
reference is AutoAWQ's `dequantize_gemm` + matmul, and the adapter math is PEFT's (on the dequantized twin).
"""

import pytest
import torch

from qpass.log import import_autoawq_quietly

peft = pytest.importorskip("peft")
import_autoawq_quietly()  # first: a plain `import awq` issues its notice past every filter (pyproject.toml)
pytest.importorskip("awq")

import qpass
from qpass.quant import QuantInfo, autoawq, match
from qpass.testing import awq_linear_from, tiny_awq_llama

from conftest import input_ids

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_dequant_is_autoawqs_bit_for_bit():
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    for group_size in (32, 64, 128):
        torch.manual_seed(group_size)
        linear = torch.nn.Linear(128, 64)
        q = awq_linear_from(linear, group_size=group_size)
        assert type(q) is WQLinear_GEMM
        info = match(q)
        assert isinstance(info, QuantInfo) and info.library == "autoawq" and info.eager_base == "torch"
        ours = info.layout.dequantize(info, q.qweight, q.qzeros, q.scales)
        theirs = dequantize_gemm(q.qweight, q.qzeros, q.scales, 4, group_size)
        assert ours.dtype == theirs.dtype == torch.float16
        assert torch.equal(ours, theirs)
        step = q.scales.float().max().item()
        assert (ours.float().t() - linear.weight).abs().max() <= 0.51 * step + 1e-3  # a real packing of the weights


def test_library_forward_cannot_serve_on_this_machine():
    """Why eager_base='torch': the measured failure of AutoAWQ's own forward on a CPU-only machine."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    q = awq_linear_from(torch.nn.Linear(64, 64))
    with pytest.raises(Exception) as exc:
        q(torch.randn(2, 64, dtype=torch.float16))
    assert "exchangeDevice" in str(exc.value) or "autoawq-kernels" in str(exc.value) or "CUDA" in str(exc.value)


def test_old_autoawq_raises_import_error_naming_the_version(monkeypatch):
    q = awq_linear_from(torch.nn.Linear(64, 64))
    monkeypatch.setattr(autoawq, "installed_version", lambda: "0.1.8")
    with pytest.raises(ImportError, match=r"autoawq>=0\.2\.0.*found 0\.1\.8"):
        match(q)
    model = torch.nn.Sequential()
    model.add_module("proj", q)
    with pytest.raises(ImportError, match="0.2.0"):
        qpass.prepare(model, qpass.LoraConfig(r=2, target_modules=["proj"]))
    assert not hasattr(model, "_qpass") and "forward" not in q.__dict__  # the model is left as it was
    monkeypatch.setattr(autoawq, "installed_version", lambda: "0.2.0")
    assert isinstance(match(q), QuantInfo)


def _dense_twin(model):
    """The same Llama with every WQLinear_GEMM replaced by an nn.Linear holding AutoAWQ's dequantized weight."""
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import dequantize_gemm

    for name, module in list(model.named_modules()):
        if isinstance(module, WQLinear_GEMM):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(dequantize_gemm(module.qweight, module.qzeros, module.scales, 4, module.group_size).float().t())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    model = peft.get_peft_model(_dense_twin(tiny_awq_llama()), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("awq_lora")
    model.save_pretrained(str(path))
    return path


def test_tiny_autoawq_llama_eager_compiled_and_trains(adapter_dir):
    ids, labels = input_ids(seed=3), input_ids(seed=4)
    reference = peft.PeftModel.from_pretrained(_dense_twin(tiny_awq_llama()), str(adapter_dir), is_trainable=True)
    ref_out = reference(input_ids=ids, labels=labels)
    ref_out.loss.backward()
    ref_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                 for n, p in reference.named_parameters() if p.requires_grad}

    model = qpass.prepare(tiny_awq_llama(), str(adapter_dir))
    rows = [r for r in qpass.report(model).rows if r.adapter]
    assert len(rows) == 7 and all(r.library == "autoawq" and r.base == "torch dequant (eager)" for r in rows)
    with torch.no_grad():
        eager = model(ids).logits
    torch.testing.assert_close(eager, ref_out.logits.detach(), rtol=0, atol=2e-4)

    compiled = torch.compile(model, backend=qpass.backend("inductor"))
    out = compiled(input_ids=ids, labels=labels)
    assert (out.logits - ref_out.logits).abs().max().item() < 2e-3  # inductor: fp16 dequant kept in fp32
    out.loss.backward()
    ours = {n.replace("_orig_mod.", "").replace(".qpass_adapters.default", ""): p.grad
            for n, p in compiled.named_parameters() if p.requires_grad}
    assert set(ours) == set(ref_grads) and len(ours) == 7 * 2  # A and B of 7 layers
    for n, g in ours.items():
        assert (g - ref_grads[n]).norm() <= 1e-2 * ref_grads[n].norm(), n
    assert qpass.report(compiled).summary()["sites_rewritten"] == 7


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_slot_major_base_equals_natural_dequant_and_is_cached_for_the_graph(group_size):
    """4-bit AWQ's base dequantizes with its columns in slot-major order (contiguous loads) and puts the output
    columns back: the same products as AutoAWQ's dequantize_gemm + matmul; the lowering derives the reordered
    scales once and hands them to the graph as a constant."""
    from qpass import lowering
    from qpass.quant import layouts

    torch.manual_seed(group_size)
    q = awq_linear_from(torch.nn.Linear(256, 96), group_size=group_size)
    info = match(q)
    tensors = [getattr(q, n) for n in info.buffers]
    x = torch.randn(3, 5, 256, dtype=torch.float16)
    natural = x.float() @ layouts.awq_dequantize(info, q.qweight, q.qzeros, q.scales).float()
    ours = layouts.awq.torch_forward(info, x.float(), tensors)  # W in the scales' fp16, as AutoAWQ; the matmul in fp32
    torch.testing.assert_close(ours, natural + q.bias.float(), rtol=1e-5, atol=1e-4)
    assert layouts.slot_major(info, q.qzeros.shape[0])
    model = qpass.prepare(torch.nn.Sequential(q), qpass.LoraConfig(r=4, target_modules=["0"]))
    site = next(iter(model._qpass.sites.values()))
    derived = lowering.derived_for(site)
    assert derived is lowering.derived_for(site)  # cached
    assert torch.equal(derived.tensors()[0], layouts.awq_slot_scales(q.scales))
    assert lowering.repacked_bytes([site]) == derived.nbytes() == q.scales.numel() * 2
    # the plain-torch base (on CPU "auto" takes qpass's C++ dequant-cpu instead; CUDA and builds without the
    # kernels take this one)
    compiled = torch.compile(model, backend=qpass.backend("inductor", lowering="torch-dequant"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=2e-2)
    assert qpass.report(model).rows[0].base.startswith("torch-dequant")
