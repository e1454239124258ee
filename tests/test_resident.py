"""base_layout="int4pack" (qpass/resident.py): 4-bit weights held once, in the CPU int4 kernel's layout.

Each case builds the same tiny bf16 model twice (same seed): one prepared as usual (library layout; the
reference), one with base_layout="int4pack", the same adapter values in both. The converted model must
compute what the library layout computes (eager exactly: same arithmetic s * (q - z), one rounding), decode
through the int4 kernel on its own buffers (no repacked copy), train with the same gradients, expose the
library's tensors in state_dict(), and give the library layout back bit-exactly on unprepare/merge."""

import pytest
import torch

import qpass
from qpass import lowering, resident
from qpass.errors import QpassError
from qpass.testing import tiny_awq_llama

from conftest import LOGIT_TOL, SITES, input_ids, make_model, randomize_adapters
from test_errors import expect_error

CFG = dict(r=4, lora_alpha=8, target_modules="all-linear")
MODELS = {
    "gptq-sym": lambda: make_model(torch.bfloat16).to(torch.bfloat16),
    "gptq-asym-act-order": lambda: make_model(torch.bfloat16, sym=False, desc_act=True).to(torch.bfloat16),
    "awq-autoawq": lambda: tiny_awq_llama(dtype=torch.bfloat16).to(torch.bfloat16),
}


def _pair(kind):
    """(reference prepared in the library layout, converted model, the converted model's original state)."""
    ref = qpass.prepare(MODELS[kind](), qpass.LoraConfig(**CFG))
    randomize_adapters(ref)
    model = MODELS[kind]()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    qpass.prepare(model, qpass.LoraConfig(**CFG), base_layout="int4pack")
    adapters = {k: v for k, v in ref.state_dict().items() if "qpass_adapters" in k}
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    assert not unexpected and all("qpass_adapters" not in k for k in missing)
    return ref, model, original


# asymmetric act-order GPTQ and AWQ: symmetric GPTQ is the same unpack with one zero code (unprepare below has it)
@pytest.mark.parametrize("kind", ["gptq-asym-act-order", "awq-autoawq"])
def test_int4pack_layout_computes_the_library_layout_and_holds_weights_once(kind):
    ref, model, original = _pair(kind)
    sites = list(model._qpass.sites.values())
    assert all(resident.is_resident(s) for s in sites)
    for s in sites:  # the codes take the bytes the library's qweight took: 4 bits per weight, once
        assert s.module.qweight.dtype == torch.uint8
        assert s.module.qweight.nbytes == original[f"{s.path}.qweight"].nbytes
    prompt, step = input_ids(batch=1, seq=9), input_ids(batch=1, seq=1)
    with torch.no_grad():
        for ids in (prompt, step):  # eager: the same arithmetic as the library's dequantize
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
        compiled, ref_compiled = (torch.compile(m, backend=qpass.backend("aot_eager")) for m in (model, ref))
        for ids in (prompt, step):
            torch.testing.assert_close(compiled(ids).logits.float(), ref_compiled(ids).logits.float(),
                                       rtol=0, atol=LOGIT_TOL[torch.bfloat16])
    bases = [r.base for r in qpass.report(model).rows]
    assert all(b.startswith("int4pack layout (resident): ") and "int4pack-cpu bf16" in b for b in bases), bases
    assert not any("torch-dequant" in b for b in bases), bases  # the 9-token prompt took the kernel too
    assert lowering.repacked_bytes(sites) == 0  # the decode kernel read the modules' own buffers
    state = model.state_dict()  # the library's tensors: a checkpoint saved now is a normal one
    for k, v in original.items():
        assert torch.equal(state[k], v), k
    assert not [k for k in state if k not in original and "qpass_adapters" not in k]


@pytest.mark.parametrize("kind", ["gptq-asym-act-order", "awq-autoawq"])
def test_int4pack_layout_trains_with_the_library_layouts_gradients(kind):
    ref, model, _ = _pair(kind)
    ids = input_ids(batch=2, seq=6)
    grads = []
    for m in (ref, model):
        m.train()
        torch.compile(m, backend=qpass.backend("aot_eager"))(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * SITES
    # Same weights bit for bit (tests/test_kernels.py). GPTQ: the same bf16 GEMMs, gradients equal (observed 0).
    # AWQ: the library layout's plain-torch base multiplies with the weight's columns in slot-major order
    # (layouts.awq.torch_forward), a different GEMM shape and so a different bf16 accumulation order than the
    # converted layout's GEMM in natural order: bf16 rounding differences, observed 1.2% of the largest entry.
    atol = 1e-6 if kind.startswith("gptq") else 3e-2
    for name, g in grads[0].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-3, atol=atol * g.abs().max().item())


@pytest.mark.parametrize("kind", list(MODELS))
def test_unprepare_gives_the_library_layout_back_bit_exactly(kind):
    _, model, original = _pair(kind)
    ids = input_ids(batch=1, seq=5)
    qpass.unprepare(model)
    state = model.state_dict()
    assert state.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(state[k], v), k
    names = [n.rsplit(".", 1)[-1] for n, _ in model.named_buffers()]
    assert not set(names) & {"scales_and_zeros", "qpass_zero_codes", "ret_idx"}
    if kind.startswith("gptq"):  # (autoawq's own forward needs CUDA: qpass computes that base itself)
        with torch.no_grad():  # the library's own forward runs again on what it was given back
            torch.testing.assert_close(model(ids).logits, MODELS[kind]()(ids).logits, rtol=0, atol=0)


def test_merge_from_int4pack_layout_equals_merge_from_library_layout():
    ref, model, _ = _pair("gptq-asym-act-order")
    ids = input_ids(batch=1, seq=5)
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(QpassError, match="max_adapter_loss|max_rel_error"):
        qpass.merge(model)  # 4-bit, small adapter: refused ...
    assert all(resident.is_resident(s) for s in model._qpass.sites.values())  # ... and left as it was
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    merged = [qpass.merge(m, max_rel_error=1.0, max_adapter_loss=1.0) for m in (ref, model)]
    a, b = (m.state_dict() for m in merged)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_int4pack_layout_refuses_what_it_cannot_hold_and_leaves_the_model_untouched():
    model = make_model(torch.bfloat16)  # scales stay float16: the kernel's bf16 scales would round them
    expect_error(model, qpass.LoraConfig(**CFG), QpassError, r"base_layout='int4pack'.*scales are torch.float16.*bfloat16",
                 base_layout="int4pack")
    expect_error(model, qpass.LoraConfig(**CFG), QpassError, r"base_layout must be one of \('library', 'int4pack'\); got 'int8'",
                 base_layout="int8")
