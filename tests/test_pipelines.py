"""qpass inside the torch.compile pipelines users already run, through the real clients.

- plain `torch.compile` (the default backend) under every mode, with `options=`, `dynamic=`, `fullgraph=`,
  and `nn.Module.compile()`: the sites are rewritten (report rows `rewritten`, 0 graph breaks) and the
  logits equal eager qpass's; a training step's gradients equal eager's;
- the `qpass` backend with `mode=` / `options=`; `qpass.compile` compiles in place and returns the model;
- HF `Trainer(TrainingArguments(torch_compile=True))` with default arguments, and a `Trainer` given
  `qpass.compile(model, cfg)`: the adapters train through the rewrite, the base is untouched;
- HF `generate()` (greedy) on the compiled model gives PEFT's tokens, and compiles nothing more on a second
  call: the dynamic cache on the in-place compiled model, and the static cache with HF's `CompileConfig`.
"""

import runpy
from pathlib import Path

import pytest
import torch
import transformers

import qpass

from adapter_parity import ALL, N_SITES, eager_dequant, make_model
from conftest import SITES, LOGIT_TOL, adapter_grads, input_ids, randomize_adapters
from qpass.testing import tiny_gptq_llama

CFG = dict(r=4, lora_alpha=8, target_modules=ALL)
TOL = LOGIT_TOL[torch.float32]


def _prepared(seed=0):
    model = qpass.prepare(make_model(), qpass.LoraConfig(**CFG))
    randomize_adapters(model, seed=seed)
    return model.eval()


def _assert_rewritten(model, backend="inductor"):
    report = qpass.report(model)
    assert [r.status for r in report.rows] == ["rewritten"] * N_SITES, [r.status for r in report.rows]
    assert report.stats.graph_breaks == 0 and report.stats.graphs >= 1
    assert report.stats.backend.startswith(backend), report.stats.backend


# ("max-autotune-no-cudagraphs" is "max-autotune" on a CPU: cudagraphs are CUDA's)
@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_plain_torch_compile_rewrites_under_every_mode(mode):
    model = _prepared()
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, mode=mode)(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)
    _assert_rewritten(model)  # on CPU, reduce-overhead compiles without CUDA graphs: plain "inductor"


def _compile_options(model):
    return torch.compile(model, options={"epilogue_fusion": False})


def _compile_dynamic(model):
    return torch.compile(model, dynamic=True)


def _compile_fullgraph(model):
    return torch.compile(model, fullgraph=True)


def _module_compile(model):
    model.compile()
    return model


@pytest.mark.parametrize("how", [_compile_options, _compile_dynamic, _compile_fullgraph, _module_compile])
def test_torch_compile_arguments_keep_the_rewrite(how):
    model = _prepared()
    shapes = (12, 7) if how is _compile_dynamic else (12,)  # dynamic=True: one graph for both lengths
    with torch.no_grad():
        refs = [model(input_ids(seq=s)).logits for s in shapes]
        compiled = how(model)
        outs = [compiled(input_ids(seq=s)).logits for s in shapes]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=0, atol=TOL)
    _assert_rewritten(model)
    assert qpass.report(model).stats.graphs == 1


def test_default_backend_training_step_matches_eager():
    """A training graph compiled by plain torch.compile takes the differentiable lowering: adapter gradients
    equal eager qpass's (the decode/int4 kernels have no backward of their own for the adapters)."""
    model = _prepared().train()
    ids = input_ids()
    ref = adapter_grads(model, model, ids)
    got = adapter_grads(torch.compile(model), model, ids)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    _assert_rewritten(model)


@pytest.mark.parametrize("kwargs", [dict(mode="reduce-overhead"), dict(options={"epilogue_fusion": False})],
                         ids=["mode", "options"])
def test_qpass_backend_accepts_mode_and_options(kwargs):
    model = _prepared()
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="qpass", **kwargs)(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)
    _assert_rewritten(model, backend="qpass+inductor")
    with pytest.raises(ValueError, match="mode= and options= are inductor's"):
        qpass.backend("aot_eager", mode="reduce-overhead")


def test_qpass_compile_compiles_in_place_with_a_mode():
    ids = input_ids()
    with torch.no_grad():
        ref = _prepared()(ids).logits
    model = make_model()
    compiled = qpass.compile(model, qpass.LoraConfig(**CFG), mode="max-autotune-no-cudagraphs")
    assert compiled is model and type(model).__name__ == "LlamaForCausalLM"
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())
    randomize_adapters(model)  # the same values as _prepared()'s
    report = qpass.report(model)
    assert report.stats.graphs == 0 and "first call" in str(report)
    with torch.no_grad():
        out = model.eval()(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL)
    _assert_rewritten(model, backend="qpass+inductor:max-autotune-no-cudagraphs")


# ---- HF Trainer ------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _lora_b_all_trained(model):
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    return len(b) == N_SITES and all(p.abs().sum() > 0 for p in b)  # B starts at zero: every B must move


def _base_untouched(model):
    fresh = tiny_gptq_llama().state_dict()
    ours = {k: v for k, v in model.state_dict().items() if "qpass_adapters" not in k}
    return ours.keys() == fresh.keys() and all(torch.equal(ours[k], fresh[k]) for k in fresh)


@pytest.mark.slow
def test_trainer_example_torch_compile_true(tmp_path):
    """examples/trainer.py: TrainingArguments(torch_compile=True), default arguments otherwise: Trainer
    (accelerate) compiles the prepared model itself, and the rewrite happens inside that compile."""
    main = runpy.run_path(str(EXAMPLES / "trainer.py"), run_name="trainer_example")["main"]
    model = main(str(tmp_path), steps=3)
    assert _lora_b_all_trained(model) and _base_untouched(model)
    _assert_rewritten(model)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_trainer_given_qpass_compiled_model_keeps_its_columns(tmp_path):
    """`Trainer(model=qpass.compile(m, cfg))` with default arguments: the model's own forward signature, so
    remove_unused_columns keeps input_ids/labels (and drops the text column)."""
    dataset = runpy.run_path(str(EXAMPLES / "trainer.py"), run_name="trainer_example")["dataset"]
    model = qpass.compile(make_model(), qpass.LoraConfig(**CFG))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=5e-2, report_to="none", save_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=dataset(n=8)).train()
    assert _lora_b_all_trained(model) and _base_untouched(model)
    _assert_rewritten(model, backend="qpass+inductor")


# ---- HF generate --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_example_gives_peft_tokens(tmp_path):
    """examples/generate.py: greedy generate() on the qpass-compiled model (dynamic cache) and with HF's own
    compile (static cache, CompileConfig defaults) gives PEFT's tokens; a second generate compiles nothing
    (dynamic cache: prefill, first decode, then the cache length dynamic; static cache: one graph)."""
    import peft

    example = runpy.run_path(str(EXAMPLES / "generate.py"), run_name="generate_example")
    out = example["main"](new_tokens=20)
    model, static_model = out["model"], out["static_model"]
    qpass.save_adapter(model, tmp_path / "adapter")
    base, _ = example["build"]()
    ref = peft.PeftModel.from_pretrained(eager_dequant(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        tokens = ref.generate(out["ids"], max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert tokens.shape[1] == 28 and torch.equal(out["dynamic"], tokens) and torch.equal(out["static"], tokens)
    assert qpass.report(model).stats.graphs <= 3 and qpass.report(static_model).stats.graphs == 1
    assert qpass.report(model).stats.recompiles <= 2  # both generate() calls: no recompile per token
    _assert_rewritten(model, backend="qpass+inductor")
    _assert_rewritten(static_model)
