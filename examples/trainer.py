"""Fine-tune LoRA on a GPTQ model with the HF Trainer and its own torch.compile: qpass needs only `prepare`.

`TrainingArguments(torch_compile=True)` makes Trainer (through accelerate) call `torch.compile(model)` with
the default inductor backend; qpass's pass rewrites every quantized layer inside that compile. Trainer's
defaults stay: `remove_unused_columns=True` drops the dataset's extra column, because the model keeps its own
`forward` signature. No model hub; CPU is enough.

    .venv/bin/python examples/trainer.py
"""

if __name__ == "__main__":  # run as a script: progress lines on stderr, third-party start-up noise off
    from qpass.log import quiet_third_party, show_progress

    quiet_third_party()  # before torch, transformers and gptqmodel are imported
    show_progress()

import datasets
import torch
import transformers

import qpass
from qpass.testing import tiny_gptq_llama


def dataset(n: int = 32, seq: int = 32, vocab: int = 256) -> datasets.Dataset:
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "text": ["..."] * n})


def main(output_dir: str = "out/trainer-example", steps: int = 10, **model_kwargs):
    model = tiny_gptq_llama(**model_kwargs)
    qpass.prepare(model, qpass.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    args = transformers.TrainingArguments(
        output_dir=output_dir, torch_compile=True, max_steps=steps, per_device_train_batch_size=4,
        learning_rate=5e-3, logging_steps=max(1, steps // 5), report_to="none", save_strategy="no",
    )
    transformers.Trainer(model=model, args=args, train_dataset=dataset()).train()
    print(qpass.report(model))
    qpass.save_adapter(model, f"{output_dir}/adapter")
    print(f"adapter saved in PEFT format to {output_dir}/adapter/")
    return model


if __name__ == "__main__":
    main()
