"""A user-defined adapter kind in one file: IA³-style learned scaling of each layer's input features.

    y = base(x * l),   l: (1, in_features), initialised to ones (so the model starts unchanged)

This is IA³'s feed-forward form (PEFT scales the *input* of feed-forward layers). The spec says what the
adapter owns (`ia3_l`), where it attaches (the input, before the quantized base), what it computes and its
dtype policy; qpass applies it to every targeted GPTQ/AWQ layer and compiles it into the graph. Nothing
else in qpass changes. `qpass.register_config` files the config under its `peft_type`, so an adapter saved
with `qpass.save_adapter` loads back from its directory (`qpass.prepare(model, path)`, `qpass.load_adapter`).

    python examples/custom_pattern.py [--inner inductor|aot_eager|eager]
"""

if __name__ == "__main__":  # run as a script: progress lines on stderr, third-party start-up noise off
    from qpass.log import quiet_third_party, show_progress

    quiet_third_party()  # before torch, transformers and gptqmodel are imported
    show_progress()

import argparse
import tempfile
from dataclasses import dataclass

import torch

import qpass
from qpass.testing import tiny_gptq_llama


@qpass.register_config  # adapter_config.json's "peft_type" -> this class, for loading a saved adapter
@dataclass
class InputScaleConfig(qpass.AdapterConfig):
    peft_type = "QPASS_INPUT_SCALE"  # a ClassVar (no annotation): the name qpass files it under
    init_scale: float = 1.0


SPEC = qpass.register(
    qpass.AdapterSpec(
        name="input-scale",
        config=InputScaleConfig,
        attach="input",
        dtype_policy="adapter",
        params=lambda site, cfg: {"ia3_l": qpass.Param((1, site.in_features), lambda t: t.fill_(cfg.init_scale))},
        compute=lambda x, p: x * p["ia3_l"],
        rank=lambda cfg: 0,
        description="IA³-style learned input scaling",
    )
)


def main(inner="inductor"):
    model = tiny_gptq_llama()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    compiled = qpass.compile(model, InputScaleConfig(target_modules=["gate_proj", "up_proj", "down_proj"]), inner=inner)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ia3_l"):
                p.mul_(1.5)  # pretend it was trained
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    print(qpass.report(compiled))
    # save the adapter in PEFT's format, load it back onto a fresh model from its directory: the same logits
    with tempfile.TemporaryDirectory(prefix="qpass-input-scale-") as path:
        qpass.save_adapter(model, path)
        reloaded = qpass.prepare(tiny_gptq_llama(), path)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # both eager: the same math, bit for bit
        want = compiled(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert torch.equal(got, want), f"the reloaded adapter differs by {(got - want).abs().max().item():.3g}"
    print(f"saved and reloaded the {qpass.active_adapters(reloaded)[0]!r} adapter: the same logits")
    return compiled, loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    main(parser.parse_args().inner)
