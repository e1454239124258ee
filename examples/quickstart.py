"""qpass quickstart: a small GPTQ-quantized Llama built locally, LoRA attached and compiled by qpass,
the rewrite report, a forward pass, and a few training steps. No model hub; CPU is enough.

    .venv/bin/python examples/quickstart.py
"""

if __name__ == "__main__":  # run as a script: progress lines on stderr, third-party start-up noise off
    from qpass.log import Step, quiet_third_party, show_progress

    quiet_third_party()  # before torch, transformers and gptqmodel are imported
    show_progress()
    _importing = Step("importing torch", "imported torch").start()

import time

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import qpass
from qpass.log import Step, logger
from qpass.testing import tiny_gptq_llama

if __name__ == "__main__":
    _importing.end()


def main():
    torch.manual_seed(0)
    # A Llama (hidden 256, 1 decoder layer) whose 7 projections are gptqmodel TorchLinear layers,
    # 4-bit, group 64, packed by gptqmodel from round-to-nearest quantised weights.
    with Step("building a small GPTQ Llama (gptqmodel TorchLinear layers, 4-bit)", "built the model"):
        model = tiny_gptq_llama(
            hidden_size=256, intermediate_size=512, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=1024, bits=4, group_size=64,
        )
    config = qpass.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    compiled = qpass.compile(model, config)  # prepare (adapters attached in place) + torch.compile

    ids = torch.randint(0, 1024, (4, 64))
    with torch.no_grad():
        start = time.perf_counter()
        logits = compiled(ids).logits
        print(f"forward (first call compiles): {time.perf_counter() - start:.1f} s, logits {tuple(logits.shape)}")

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    with logging_redirect_tqdm(loggers=[logger]):  # progress lines print above the bar
        for _ in tqdm(range(8), desc="train steps (the first compiles the training graph)", unit="step"):
            loss = compiled(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    print(f"trained {len(losses)} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    print()
    print(qpass.report(compiled))
    qpass.save_adapter(compiled, "out/quickstart-adapter")
    print("\nadapter saved in PEFT format to out/quickstart-adapter/")


if __name__ == "__main__":
    main()
