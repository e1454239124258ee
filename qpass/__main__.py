"""`python -m qpass` — the command-line entry.

    python -m qpass inspect MODEL_DIR [--adapter ADAPTER_DIR] [--target-modules q_proj v_proj ...] [-r 8]
                                      [--compile [--inner inductor|aot_eager|eager]] [--json]

`inspect` loads a local checkpoint (`transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR)`, on CPU, no
download), prepares it with the adapter directory given, or else a LoRA on every quantized linear layer (or
on `--target-modules`), and prints the rewrite report: which sites, which library and class, which base
computation, and every skipped layer with its reason. `--compile` also compiles the model with the qpass
backend and runs one forward on a dummy batch, so the report shows what the backend rewrote.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


@contextlib.contextmanager
def _stdout_to_stderr():
    """Libraries' logs (gptqmodel logs to stdout) go to stderr, so stdout holds only the report / JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qpass", description="qpass: adapters on GPTQ/AWQ models via torch.compile")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="load a local checkpoint, prepare it, print the rewrite report")
    inspect.add_argument("model_dir", help="a local model directory (config.json with a quantization_config)")
    inspect.add_argument("--adapter", help="a PEFT adapter directory (adapter_config.json + weights)")
    inspect.add_argument("--target-modules", nargs="+", default=None,
                         help="module names for the default LoRA (default: all-linear); ignored with --adapter")
    inspect.add_argument("-r", "--rank", type=int, default=8, help="rank of the default LoRA (default 8)")
    inspect.add_argument("--compile", action="store_true",
                         help="also torch.compile with the qpass backend and run one forward on a dummy batch")
    inspect.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"),
                         help="with --compile: the backend qpass hands the rewritten graph to (default inductor)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")


def inspect(args) -> int:
    if not os.path.isdir(args.model_dir) or not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        print(f"error: {args.model_dir!r} is not a model directory (no config.json there)", file=sys.stderr)
        return 2
    with _stdout_to_stderr():
        import torch

        import qpass

    with _stdout_to_stderr():
        model = _load(args.model_dir)
        if args.adapter:
            adapter = args.adapter
        else:
            targets = args.target_modules or "all-linear"
            adapter = qpass.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets)
        model = qpass.prepare(model, adapter)
        if args.compile:
            compiled = torch.compile(model, backend=qpass.backend(args.inner))
            with torch.no_grad():
                compiled(input_ids=torch.zeros(1, 4, dtype=torch.long))
    report = qpass.report(model)
    print(report.to_json(indent=2) if args.json else report)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from qpass.errors import QpassError

    try:
        if args.command == "inspect":
            return inspect(args)
    except QpassError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
