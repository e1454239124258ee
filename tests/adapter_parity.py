"""Helpers shared by the QA-LoRA / AdaLoRA / OFT parity tests: PEFT (the oracle) on real gptqmodel layers."""

import torch
import transformers

import qpass

from conftest import LOGIT_TOL, SITES, input_ids, make_model as _make_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_SITES = SITES


def eager_dequant(model):
    """gptqmodel wraps each TorchLinear's `dequantize_weight` in its own torch.compile(inductor) at post_init;
    with dynamo reset around every test that recompiles per test and shape (~5 s per eager forward here).
    Drop that per-instance wrapper so the library runs its own method eagerly: the same math, op by op.
    Applied to the PEFT oracle and to qpass alike; qpass's compiled path lowers the base itself anyway."""
    for module in model.modules():
        module.__dict__.pop("dequantize_weight", None)
    return model


def make_model(dtype=torch.float32, **llama):
    return eager_dequant(_make_model(dtype, **llama))


def randomize(model, keys, seed=0, std=0.1, skip=()):
    """Non-zero values for every adapter tensor whose name contains one of `keys` (zero inits would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if any(k in name for k in keys) and not any(s in name for s in skip) and p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_close(a, b, dtype=torch.float32, tol=None):
    tol = LOGIT_TOL[dtype] if tol is None else tol
    err = max_err(a, b)
    assert err <= tol, f"max |Δlogit| {err:.3g} > {tol} ({dtype})"
    return err


def key(name):
    """PEFT: ...q_proj.lora_A.default.weight / ...lora_E.default ; qpass: ...q_proj.qpass_adapters.default.lora_A.weight"""
    return (name.replace("_orig_mod.", "").replace("base_model.model.", "").replace(".qpass_adapters.default", "")
            .replace(".default", ""))


def trainable(model):
    return {key(n): p for n, p in model.named_parameters() if p.requires_grad}


def sgd_updates(model, ids, labels, lr=0.5, steps=1, extra_loss=None, train=False):
    """`steps` SGD steps; returns {param: after - before} for every trainable tensor (fp32)."""
    model.train(train)
    params = trainable(model)
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.SGD(list(params.values()), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: (p.detach() - before[k]).float() for k, p in params.items()}


def max_rel(ours, ref):
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))[:4]
    assert all(u.norm() > 0 for u in ref.values()), "every adapter tensor must move"
    return max(((ours[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)


def gptq_model_peft_dispatches(dtype=torch.float32):
    """The tiny Llama as PEFT's AdaLoRA needs it to pick its GPTQ class `SVDQuantLinear`: model.config carries a
    GPTQConfig and the layers are the class gptqmodel selects for training on CPU (`TorchAtenLinear`), pinned to
    its dequantize+matmul path. Same packed weights as `make_model` (its TorchLinear): identical base outputs."""
    from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear
    from qpass.testing import build_llama, quantize_gptq

    model = quantize_gptq(build_llama(dtype=dtype), cls=TorchAtenLinear)
    for module in model.modules():
        if isinstance(module, TorchAtenLinear):
            module.linear_mode = "train"
    eager_dequant(model)
    model.quantization_method = "gptq"
    model.config.quantization_config = transformers.GPTQConfig(bits=4, group_size=32, desc_act=False, sym=True)
    return model


def precision_casts(mode):
    """For inductor: `emulate_precision_casts`, so fused kernels round the dequantized weight to the fp16 of
    gptqmodel's `scales * (q - z)` as eager does. Without it inductor keeps that product in fp32 (more precise
    than the library): ~2e-4 on these logits from the base alone, growing with activation size (2.7e-3 with
    AdaLoRA's std-0.25 adapter) — an effect of the base lowering, not of the adapter math under test."""
    import contextlib

    if mode != "inductor":
        return contextlib.nullcontext()
    return torch._inductor.config.patch(emulate_precision_casts=True)


def save_peft_dirs(tmp_path_factory, prefix, names, build):
    """name -> a directory holding PEFT's own save of `build(name)` (the adapters the parity tests load)."""
    out = {}
    for name in names:
        path = tmp_path_factory.mktemp(f"{prefix}_{name}")
        build(name).save_pretrained(str(path))
        out[name] = path
    return out


def check_logits_match_peft(reference, path, dtype, mode, *, min_effect=10):
    """qpass loads the PEFT directory `path`; its logits (eager, or compiled with backend `mode`) match the
    PEFT model `reference` within LOGIT_TOL; the adapter must change the logits by `min_effect` x the tolerance.
    Returns the prepared model, for checks on its slots."""
    ids = input_ids()
    with torch.no_grad():
        ref = reference.eval()(ids).logits
        assert max_err(ref, make_model(dtype)(ids).logits) > min_effect * LOGIT_TOL[dtype], "the adapter must change the logits"
    model = qpass.prepare(make_model(dtype), str(path))
    with torch.no_grad():
        if mode == "eager":
            assert_close(model(ids).logits, ref, dtype)
            return model
        compiled = torch.compile(model, backend=qpass.backend(mode))
        with precision_casts(mode):
            assert_close(compiled(ids).logits, ref, dtype)
    assert qpass.report(compiled).summary()["sites_rewritten"] == N_SITES
    return model
