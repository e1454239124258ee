"""Quantize a tiny Llama with gptqmodel itself (GPTQ or AWQ) into a local checkpoint, offline.

    python tests/ckpt_build.py gptq|awq OUT_DIR

Run as a subprocess by the checkpoint tests: gptqmodel's quantizer sets process-global state (thread
pools, inductor options) that must not leak into the tests. The tokenizer is a WordLevel one trained on
the calibration sentences; nothing is downloaded.
"""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gptqmodel 7.7 asks for 2 "model_loader:cpu" workers but defaults the cpu pool to (cores+1)//2, which is 1
# on a 2-core machine: `ValueError: Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1`
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402

SENTENCES = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7 % 13}" for i in range(48)] + [
    "quantized models run on small machines",
    "adapters train while the base stays frozen",
]


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>")


def main(method: str, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT, METHOD

    tokenizer = build_tokenizer()
    base = out + "-fp"
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    if method == "gptq":
        qcfg = QuantizeConfig(bits=4, group_size=32, desc_act=True, sym=True)
    elif method == "awq":
        qcfg = QuantizeConfig(bits=4, group_size=32, method=METHOD.AWQ, format=FORMAT.GEMM, sym=False, desc_act=False)
    else:
        raise SystemExit(f"unknown method {method!r}; use gptq or awq")
    calibration = []
    for s in SENTENCES[:32]:
        ids = tokenizer(s)["input_ids"]
        calibration.append({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})
    model = GPTQModel.load(base, qcfg, device="cpu")
    model.quantize(calibration, batch_size=1)
    model.save(out)
    tokenizer.save_pretrained(out)


def session_checkpoints(tmp_path_factory, methods=("gptq", "awq")) -> dict:
    """method -> checkpoint dir, built once per pytest session (shared by every test module that asks)."""
    import subprocess
    from pathlib import Path

    root = Path(tmp_path_factory.getbasetemp()) / "qpass-checkpoints"
    root.mkdir(exist_ok=True)
    todo = [m for m in methods if not (root / m / "config.json").is_file()]
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", TOKENIZERS_PARALLELISM="false")
    procs = {m: subprocess.Popen([sys.executable, __file__, m, str(root / m)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for m in todo}
    for m, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"quantizing the {m} checkpoint with gptqmodel failed:\n{err[-3000:]}")
    return {m: root / m for m in methods}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
