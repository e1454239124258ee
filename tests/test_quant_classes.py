"""Every quantized-linear class qpass reads × every registered adapter kind, against the libraries themselves.

Each case is a real layer packed by its library (gptqmodel's packers, AutoAWQ's `WQLinear_GEMM.from_linear`),
in the layout it holds when loaded (`packed`) or after its first eval forward repacked it in place
(`repacked`: aten int4pack, gptqmodel's AVX-512 "hf int4", int8 per channel).

- base: qpass's plain-torch base equals the library's own dequantize (exactly where the library has one for
  that layout; else the library's kernel applied to the identity matrix) followed by a matmul;
- cross product: an adapter made by PEFT is loaded by qpass onto the layer and compared with two oracles —
  PEFT on an nn.Linear holding the library's dequantized weight (every kind, every class), and PEFT on the
  quantized class itself where PEFT dispatches it (LoRA on gptqmodel GPTQ/AWQ classes, ...); the cells where it
  does not are listed, each with PEFT's error and the reason, in PEFT_CLASS_NA (any other error fails, and so
  does a listed cell that starts to work);
- compiled: LoRA under the qpass backend + inductor, forward and backward, one case per layout.

`python tests/test_quant_classes.py` prints the measured table (library/class × adapter kind).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import qpass
from qpass.quant import QuantInfo, match
from qpass.quant.layout import Layout
from qpass.spec import registered
from qpass.testing import awq_linear_from, gptq_linear_from

IN, OUT = 128, 96  # OUT = 64 + 32: exercises the int4pack tail block; a multiple of 32 for the AVX-512 layout
TABLE: dict = {}  # (case, kind) -> {"oracle": err, ...}, filled by the tests


def _cls(module: str, name: str):
    return getattr(importlib.import_module(f"gptqmodel.nn_modules.qlinear.{module}"), name)


def _no_inductor_side_effects():
    # gptqmodel's fused classes set torch._inductor.config.freezing/max_autotune globally in their first eval
    # forward; keep that from leaking into every later compile of the test session.
    return torch._inductor.config.patch(freezing=False, max_autotune=False)


def _eager(q):
    q.__dict__.pop("dequantize_weight", None)  # gptqmodel wraps it in its own torch.compile at post_init
    return q


def _repack(q):
    """Run the library's own eval forward once (bf16, no grad): the classes that repack do it now."""
    with torch.no_grad(), _no_inductor_side_effects():
        q(torch.zeros(2, IN, dtype=torch.bfloat16))
    return q


def gptq(cls_ref, bits=4, sym=True, desc_act=False, repacked=False):
    def build(linear):
        q = _eager(gptq_linear_from(linear, bits=bits, group_size=32, sym=sym, desc_act=desc_act, cls=_cls(*cls_ref)))
        return _repack(q) if repacked else q

    return build


def awq(cls_ref=None, bits=4, repacked=False):
    def build(linear):
        q = awq_linear_from(linear, bits=bits, group_size=32, cls=_cls(*cls_ref) if cls_ref else None)
        return _repack(q) if repacked else q

    return build


TL, TF, TA = ("torch", "TorchLinear"), ("torch_fused", "TorchFusedLinear"), ("torch_aten_kernel", "TorchAtenLinear")
TX, TI = ("torch_cpu_avx512", "TorchCpuAvx512Linear"), ("torch_int8", "TorchInt8Linear")
AT, AF = ("torch_awq", "AwqTorchLinear"), ("torch_fused_awq", "TorchFusedAwqLinear")
AA, AX = ("torch_aten_kernel_awq", "TorchAtenAwqLinear"), ("torch_cpu_avx512_awq", "TorchCpuAvx512AwqLinear")

CASES = {
    "gptqmodel/TorchLinear 4b sym": gptq(TL),
    "gptqmodel/TorchLinear 3b asym act-order": gptq(TL, bits=3, sym=False, desc_act=True),
    "gptqmodel/TorchLinear 2b asym": gptq(TL, bits=2, sym=False),
    "gptqmodel/TorchLinear 8b sym act-order": gptq(TL, bits=8, desc_act=True),
    "gptqmodel/TorchFusedLinear 4b asym act-order": gptq(TF, sym=False, desc_act=True),
    "gptqmodel/TorchFusedLinear 4b sym act-order repacked": gptq(TF, desc_act=True, repacked=True),
    "gptqmodel/TorchAtenLinear 4b asym act-order": gptq(TA, sym=False, desc_act=True),
    "gptqmodel/TorchAtenLinear 4b asym act-order repacked": gptq(TA, sym=False, desc_act=True, repacked=True),
    "gptqmodel/TorchCpuAvx512Linear 4b asym": gptq(TX, sym=False),
    "gptqmodel/TorchCpuAvx512Linear 4b sym act-order repacked": gptq(TX, desc_act=True, repacked=True),
    "gptqmodel/TorchInt8Linear 8b asym act-order": gptq(TI, bits=8, sym=False, desc_act=True),
    "autoawq/WQLinear_GEMM 4b": awq(),
    "gptqmodel/AwqTorchLinear 4b": awq(AT),
    "gptqmodel/AwqTorchLinear 3b": awq(AT, bits=3),
    "gptqmodel/AwqTorchLinear 2b": awq(AT, bits=2),
    "gptqmodel/AwqTorchLinear 8b": awq(AT, bits=8),
    "gptqmodel/TorchFusedAwqLinear 4b": awq(AF),
    "gptqmodel/TorchFusedAwqLinear 4b repacked": awq(AF, repacked=True),
    "gptqmodel/TorchAtenAwqLinear 4b repacked": awq(AA, repacked=True),
    "gptqmodel/TorchCpuAvx512AwqLinear 4b": awq(AX),
    "gptqmodel/TorchCpuAvx512AwqLinear 4b repacked": awq(AX, repacked=True),
}
# One compiled (inductor) case per layout qpass reads.
COMPILED = [
    "gptqmodel/TorchLinear 3b asym act-order",
    "gptqmodel/TorchAtenLinear 4b asym act-order repacked",
    "gptqmodel/TorchCpuAvx512Linear 4b sym act-order repacked",
    "gptqmodel/TorchInt8Linear 8b asym act-order",
    "autoawq/WQLinear_GEMM 4b",
    "gptqmodel/AwqTorchLinear 3b",
]


def make_layer(case: str):
    """The case's real library layer, or a skip when the library itself refuses the class on this CPU
    (gptqmodel's TorchCpuAvx512* classes need AVX512-BF16 and raise at construction elsewhere)."""
    torch.manual_seed(sum(map(ord, case)))
    linear = nn.Linear(IN, OUT, bias=True)
    try:
        return CASES[case](linear)
    except RuntimeError as exc:
        if "kernel requires" in str(exc):
            pytest.skip(f"{case}: gptqmodel refuses this class on this CPU: {exc}")
        raise


def library_weight(q) -> torch.Tensor:
    """(IN, OUT) float32 weight as the library itself dequantizes it (its own code; never qpass's)."""
    return library_weight_native(q).float()


def library_weight_native(q) -> torch.Tensor:
    """The same in the dtype the library returns it."""
    name = type(q).__name__
    if name == "WQLinear_GEMM":
        from awq.utils.packing_utils import dequantize_gemm

        return dequantize_gemm(q.qweight, q.qzeros, q.scales, q.w_bit, q.group_size)
    if name in ("AwqTorchLinear", "TorchFusedAwqLinear", "TorchAtenAwqLinear") and q.qweight.dtype == torch.int32:
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        return dequantize_gemm(q.qweight, q.qzeros, q.scales, q.bits, q.group_size)
    if getattr(q, "qweight", None) is not None and q.qweight.dtype == torch.uint8 and name in ("TorchFusedLinear", "TorchAtenLinear",
                                                                             "TorchFusedAwqLinear", "TorchAtenAwqLinear"):
        # no dequantize for the int4pack layout: the library's kernel applied to the identity
        eye = torch.eye(IN, dtype=torch.bfloat16)
        with torch.no_grad(), _no_inductor_side_effects():
            out = q(eye).float()
        return out - (q.bias.float() if q.bias is not None else 0)
    return q.dequantize_weight()


class Net(nn.Module):
    """The smallest model around one layer: PEFT and qpass both target `proj`."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj
        self.anchor = nn.Parameter(torch.zeros(()))  # PEFT reads the device from the first parameter; unused

    def forward(self, x):
        return self.proj(x)


def dense_twin(q) -> nn.Linear:
    linear = nn.Linear(IN, OUT, bias=q.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(library_weight(q).t())
        if q.bias is not None:
            linear.bias.copy_(q.bias.float())
    return linear


# ---- adapter kinds: a PEFT config per registered spec ----------------------------------------------------

# kind -> (PEFT config, the host layer PEFT implements that kind on). PEFT's QA-LoRA pools the input only
# on its GPTQ wrapper (on nn.Linear it is plain LoRA), so QA-LoRA's host is a gptqmodel TorchLinear.
PEFT_CONFIGS = {
    "lora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]), "dense"),
    "qalora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_qalora=True,
                                       qalora_group_size=16), "gptqmodel/TorchLinear 4b sym"),
    "adalora": (lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["proj"]), "dense"),
    "oft": (lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=["proj"]), "dense"),
}
KINDS = sorted(registered())


def host(kind):
    name = PEFT_CONFIGS[kind][1]
    if name == "dense":
        torch.manual_seed(0)
        return nn.Linear(IN, OUT)
    return make_layer(name)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """kind -> a PEFT adapter directory with non-zero values everywhere (made by PEFT on the kind's host)."""
    dirs = {}
    for kind in KINDS:
        if kind not in PEFT_CONFIGS:
            continue
        model = peft.get_peft_model(Net(host(kind)), PEFT_CONFIGS[kind][0]())
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.02 if kind == "oft" else 0.1))
        dirs[kind] = tmp_path_factory.mktemp(kind)
        model.save_pretrained(str(dirs[kind]))
    return dirs


def peft_on(module, path):
    return peft.PeftModel.from_pretrained(Net(module), str(path)).eval()


def oracle(q, kind, path, x):
    """PEFT's adapter math on the library's own dequantized base. Output-attached kinds: the library base
    (dense twin) + the delta PEFT computes on its host; OFT (input-attached): PEFT's OFT on the dense twin."""
    with torch.no_grad():
        if PEFT_CONFIGS[kind][1] == "dense":
            return peft_on(dense_twin(q), path)(x).float()
        delta = peft_on(host(kind), path)(x).float() - host(kind)(x).float()
        return dense_twin(q)(x).float() + delta


def _x(seed=0, dtype=torch.float32):
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def tolerance(case, scale, eager=False):
    """Max abs error allowed against the fp32 dense twin. 1e-4 relative where both sides round the same way;
    2e-3 under inductor, which keeps the fp16 dequantize of the weight in fp32 registers (one fp16 rounding
    fewer than the library's dequantize); 1e-2 where the reference is coarser (see the cross-product test)."""
    if "repacked" in case or (eager and "AwqTorchLinear" in case):
        rel = 1e-2
    else:
        rel = 1e-4 if eager else 2e-3
    return rel * max(scale, 1)


# ---- cells without the second oracle (PEFT on the class itself) ------------------------------------------


class WrongOutput(Exception):
    """Marker for an n/a cell where PEFT runs but on a library forward known to be wrong."""


def _peft_class_na() -> dict:
    """(case, kind) -> (what PEFT raises, a fragment of its message, why the cell has no PEFT-on-the-class oracle).

    Every other cell must run PEFT on the class and match; an exception anywhere else fails the test, and a cell
    listed here that stops failing this way fails it too (the list stays honest). Measured with PEFT 0.21.2 and
    gptqmodel 7.7 on a CPU without AVX512-BF16; the TorchCpuAvx512* rows are skipped there (gptqmodel refuses to
    build them), and are listed by the same rules as their families: GPTQ TorchCpuAvx512Linear is a
    TorchAtenLinear (PEFT wraps it with GPTQLoraLinear), TorchCpuAvx512AwqLinear a gptqmodel AWQ class."""
    na = {}
    for case in CASES:
        na[case, "adalora"] = (
            ValueError, "is not supported",
            "PEFT's AdaLoRA has no wrapper for it here: GPTQ only as SVDQuantLinear in a model with a GPTQConfig "
            "(tests/test_adalora.py), none for AWQ")
        if "TorchInt8Linear" in case:
            for kind in ("lora", "qalora"):
                na[case, kind] = (AttributeError, "has no attribute 'qweight'",
                                  "PEFT's GPTQ dispatch copies `qweight`, which TorchInt8Linear (int8 per channel) lacks")
            na[case, "oft"] = (StopIteration, "", "PEFT's OFT takes the device from `qweight` or a parameter; "
                                                  "TorchInt8Linear holds neither")
        if case.startswith("autoawq/"):
            for kind in ("lora", "qalora"):
                na[case, kind] = (ValueError, "is not supported", "PEFT 0.21 wraps only gptqmodel's AWQ classes, "
                                                                  "not AutoAWQ's WQLinear_GEMM")
            na[case, "oft"] = (TypeError, "is not supported", "PEFT 0.21's OFT wraps only gptqmodel's AWQ classes, "
                                                              "not AutoAWQ's WQLinear_GEMM")
        elif "Awq" in case:
            na[case, "qalora"] = (RuntimeError, "size mismatch",
                                  "PEFT implements QA-LoRA in its GPTQ wrapper only; its AwqLoraLinear is plain LoRA, "
                                  "whose lora_A (r × in) the QA-LoRA file's (r × in/group) does not fit")
        if "TorchFusedLinear 4b asym" in case:
            for kind in ("lora", "oft", "qalora"):
                na[case, kind] = (WrongOutput, "", "the library's own forward repacks and drops its zero points "
                                                   "(PEFT runs it and is off)")
    return na


PEFT_CLASS_NA = _peft_class_na()


# ---- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_base_matches_library(case):
    q = make_layer(case)
    info = match(q)
    assert isinstance(info, QuantInfo), info
    ref_native = library_weight_native(q)
    ref_w = ref_native.float()
    tensors = [getattr(q, n) for n in info.buffers]
    if type(info.layout).dequantize is not Layout.dequantize:
        ours = info.layout.dequantize(info, *[t for n, t in zip(info.buffers, tensors) if n not in ("bias", "ret_idx")])
        if "ret_idx" in info.buffers:  # the kernel's permuted input order -> the model's
            restored = torch.empty_like(ours)
            restored[q.ret_idx.long()] = ours
            ours = restored
        # bit-exact against the library's dequantize; one bf16 rounding against a kernel on the identity
        kernel_ref = "repacked" in case and "Avx512" not in case
        tol = 2 ** -7 * ref_w.abs().max().item() if kernel_ref else 0.0
        err = (ours.to(ref_native.dtype).float() - ref_w).abs().max().item()
        assert err <= tol, f"{case}: dequantize differs from the library's by {err:.3g}"
    x = _x()
    out = info.layout.torch_forward(info, x, tensors).float()
    ref = x @ ref_w + (q.bias.float() if q.bias is not None else 0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-2 * ref.abs().max().item())
    # the weights really are the RTN quantisation of a random layer (the packing is real, not all zeros)
    assert ref_w.abs().max() > 0.05 and ref_w.std() > 0.01


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_adapter_kind_on_class(case, kind, adapter_dirs):
    if kind not in adapter_dirs:
        pytest.skip(f"no PEFT config known for adapter kind {kind!r}: add one to PEFT_CONFIGS")
    q = make_layer(case)
    x = _x(1)
    cell = TABLE.setdefault((case, kind), {})

    expected = oracle(q, kind, adapter_dirs[kind], x)
    with torch.no_grad():
        base_only = dense_twin(q)(x).float()
    assert (expected - base_only).abs().max() > 1e-2, "the adapter must change the output"

    model = qpass.prepare(Net(make_layer(case)), str(adapter_dirs[kind])).eval()
    with torch.no_grad():
        ours = model(x).float()
    scale = expected.abs().max().item()
    err = (ours - expected).abs().max().item()
    cell["peft math on library dequant"] = err
    # fp32 activations: qpass dequantizes in the scales' dtype and multiplies in fp32, like the twin. Looser:
    # a repacked layout, whose library reference weight is itself rounded (kernel on the identity: bf16; AVX-512
    # dequantize: fp16) where qpass's is exact; and AwqTorchLinear, whose own forward (qpass's eager base for
    # it, as PEFT's) computes in fp16 for fp32 activations
    tol = tolerance(case, scale, eager=True)
    assert err <= tol, f"{case} × {kind}: {err:.3g} from PEFT on the dequantized twin"

    # PEFT on the quantized class itself, where PEFT dispatches it (base = the library's kernel, its dtype);
    # a repacked layer's kernel takes bf16 activations only: compare both sides on bf16 input then
    xc = x.to(torch.bfloat16) if "repacked" in case else x
    # the library kernel runs in fp16/bf16 where qpass (fp32 activations) runs fp32: that rounding only
    tol_class = (4e-2 if xc.dtype == torch.bfloat16 else 2e-2) * max(scale, 1)
    na = PEFT_CLASS_NA.get((case, kind))
    try:
        with torch.no_grad(), _no_inductor_side_effects():
            theirs = peft_on(make_layer(case), adapter_dirs[kind])(xc).float()
    except Exception as exc:
        if na is None or not isinstance(exc, na[0]) or na[1] not in str(exc):
            raise  # not a cell known to be n/a, or it fails otherwise than the known way: a failure
        cell["peft(class)"] = f"n/a: {na[2]}"
        return
    if na is not None and na[0] is not WrongOutput:
        pytest.fail(f"{case} × {kind}: listed in PEFT_CLASS_NA ({na[0].__name__}: {na[2]}) but PEFT now runs it: "
                    "remove it from the list so that the cell is compared")
    with torch.no_grad():
        ours_c = model(xc).float()
    err_class = (ours_c - theirs).abs().max().item()
    if na is not None:  # PEFT runs, on a library forward known to be wrong: it must still be wrong to stay n/a
        assert err_class > tol_class, (f"{case} × {kind}: listed in PEFT_CLASS_NA ({na[2]}) but PEFT on the class "
                                       f"now agrees ({err_class:.3g}): remove it from the list")
        cell["peft(class)"] = f"n/a: {na[2]}"
        return
    cell["peft(class)" + (" bf16" if xc.dtype == torch.bfloat16 else "")] = err_class
    assert err_class <= tol_class, f"{case} × {kind}: {err_class:.3g} from PEFT on {type(q).__name__}"


@pytest.mark.parametrize("case", COMPILED)
def test_lora_compiled_forward_and_backward(case, adapter_dirs):
    q = make_layer(case)
    x = _x(2)
    ref_model = peft.PeftModel.from_pretrained(Net(dense_twin(q)), str(adapter_dirs["lora"]), is_trainable=True)
    xr = x.clone().requires_grad_()
    ref_out = ref_model(xr)
    ref_out.square().sum().backward()

    model = qpass.prepare(Net(q), str(adapter_dirs["lora"]))
    compiled = torch.compile(model, backend=qpass.backend("inductor"), fullgraph=True)
    xo = x.clone().requires_grad_()
    out = compiled(xo)
    out.square().sum().backward()
    assert qpass.report(compiled).summary()["sites_rewritten"] == 1
    torch.testing.assert_close(out, ref_out, rtol=0, atol=tolerance(case, ref_out.abs().max().item()))
    torch.testing.assert_close(xo.grad, xr.grad, rtol=0, atol=tolerance(case, xr.grad.abs().max().item()))
    ref_grads = {n.split("proj.")[-1].replace(".default", ""): p.grad for n, p in ref_model.named_parameters() if p.requires_grad}
    ours = {n.split("default.")[-1]: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(ours) == set(ref_grads) == {"lora_A.weight", "lora_B.weight"}
    for n in ours:
        torch.testing.assert_close(ours[n], ref_grads[n], rtol=0, atol=tolerance(case, ref_grads[n].abs().max().item()))
    TABLE.setdefault((case, "lora"), {})["compiled (inductor) fwd"] = (out - ref_out).abs().max().item()


def test_awq_gemm_cuda_class_cannot_be_built_on_cpu():
    """gptqmodel's AwqGEMMLinear is CUDA-only: its constructor refuses a CPU-only machine, so no CPU model holds
    one (the matcher still reads its AWQ buffers, with the base computed by qpass, if one is met on CUDA)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the class is buildable here")
    with pytest.raises(Exception, match="CUDA"):
        make = _cls("gemm_awq", "AwqGEMMLinear")
        make(bits=4, group_size=32, sym=False, desc_act=False, in_features=IN, out_features=OUT, bias=True, register_buffers=True)


def test_fused_asym_repack_is_skipped_with_reason():
    """TorchFusedLinear's CPU repack zeroes asymmetric zero points (the library's own output is then wrong);
    qpass reports such a site as skipped instead of reproducing it."""
    q = make_layer("gptqmodel/TorchFusedLinear 4b asym act-order")
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    ref = x.float() @ library_weight(q) + q.bias.float()
    with torch.no_grad(), _no_inductor_side_effects():
        lib = q(x).float()
    assert (lib - ref).abs().max() > 0.05  # the library lost the zero points
    found = match(q)
    assert not isinstance(found, QuantInfo) and "zero points" in found.reason


def test_prepared_repacking_class_keeps_its_layout_through_train_and_eval():
    """A prepared TorchAtenLinear never runs its repacking forward nor its train() hooks: the layout matched at
    prepare time is the one the compiled graph reads."""
    q = make_layer("gptqmodel/TorchAtenLinear 4b asym act-order")
    model = qpass.prepare(Net(q), peft.LoraConfig(r=2, target_modules=["proj"]))
    before = q.qweight.clone()
    model.train()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, IN, dtype=torch.bfloat16))
    assert q.qweight.dtype == torch.int32 and torch.equal(q.qweight, before)


def test_inference_only_class_trains_under_qpass():
    """An inference-only class that refuses train() (gptqmodel's CPU AVX-512 kernel) can be trained under qpass."""
    layer = make_layer("gptqmodel/TorchCpuAvx512Linear 4b asym")
    with pytest.raises(NotImplementedError):
        layer.train()  # gptqmodel: "an inference-only CPU kernel"
    model = qpass.prepare(Net(layer), peft.LoraConfig(r=2, target_modules=["proj"]))
    model.train()
    model(torch.randn(2, IN)).sum().backward()
    assert model.proj.qpass_adapters["default"].lora_B.weight.grad.abs().sum() > 0
    qpass.unprepare(model)  # the library's own train() is back
    assert "train" not in layer.__dict__
    with pytest.raises(NotImplementedError):
        layer.train()


if __name__ == "__main__":  # run the cross product and print the measured table
    import sys

    code = pytest.main([__file__, "-q", "-p", "no:cacheprovider", "-k", "kind_on_class or compiled", "--tb=line"]
                       + sys.argv[1:])
    table = sys.modules["test_quant_classes"].TABLE
    cols = sorted({k for _, k in table})
    print("| library / class | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for case in CASES:
        cells = []
        for kind in cols:
            c = table.get((case, kind), {})
            parts = [f"{k}: {v:.1e}" if isinstance(v, float) else f"{k}: {v}" for k, v in c.items()]
            cells.append("<br>".join(parts) or "-")
        print(f"| {case} | " + " | ".join(cells) + " |")
    sys.exit(code)
