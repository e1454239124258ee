"""`python -m qpass` — the command-line entry.

    python -m qpass demo-checkpoint OUT_DIR [--method gptq|awq]
    python -m qpass inspect MODEL_DIR [--adapter ADAPTER_DIR] [--target-modules q_proj v_proj ...] [-r 8]
                                      [--compile [--inner inductor|aot_eager|eager]] [--json]

`demo-checkpoint` writes a small real checkpoint: a tiny Llama quantized by gptqmodel itself (GPTQ or AWQ),
config.json with its `quantization_config`, weights and tokenizer (offline).

`inspect` loads a local checkpoint (`transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR)`, on CPU, no
download), prepares it with the adapter directory given, or else a LoRA on every quantized linear layer (or
on `--target-modules`), and prints the rewrite report: which sites, which library and class, which base
computation, and every skipped layer with its reason. `--compile` also compiles the model with the qpass
backend and runs one forward on a dummy batch, so the report shows what the backend rewrote.

Arguments are parsed before torch is imported (`--help` answers at once). stdout holds only the report (or
JSON); progress lines (`HH:MM:SS qpass: ...`) and libraries' messages go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

from .errors import QpassError
from .log import Step, quiet_third_party, show_progress


@contextlib.contextmanager
def _stdout_to(stream, fd=None):
    """Everything written to stdout (by Python, and by C code to fd 1) goes to `stream` meanwhile (fd 1 to `fd`,
    default the stream's own)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(stream.fileno() if fd is None else fd, 1)
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        sys.stdout.flush()
        stream.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _stdout_to_stderr():
    """Libraries' logs (gptqmodel logs to stdout) go to stderr, so stdout holds only the report / JSON."""
    return _stdout_to(sys.stderr, fd=2)  # sys.stderr may have no fd of its own (pytest's capture)


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
    demo = sub.add_parser("demo-checkpoint",
                          help="write a small checkpoint quantized by gptqmodel (offline, ~40 s), for `inspect`")
    demo.add_argument("out_dir", help="where to write it (config.json with quantization_config, weights, tokenizer)")
    demo.add_argument("--method", default="gptq", choices=("gptq", "awq"),
                      help="gptq (4-bit, group 32, act-order; default) or awq (4-bit, group 32, GEMM)")
    return parser


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM  # lazy: torch and transformers load inside a progress Step

    return AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")


def inspect(args) -> int:
    if not os.path.isdir(args.model_dir) or not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        print(f"error: {args.model_dir!r} is not a model directory (no config.json there)", file=sys.stderr)
        return 2
    with _stdout_to_stderr():
        with Step("importing torch and qpass", "imported torch and qpass"):
            import torch

            import qpass

            qpass.prepare  # noqa: B018  (resolves the API: the compile hook is installed)
        with Step(f"loading {args.model_dir} (transformers from_pretrained, CPU)", f"loaded {args.model_dir}"):
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


def demo_checkpoint(args) -> int:
    """gptqmodel's quantizer reports every layer, batch and file it handles (progress bars, tables, the saved
    config) on stdout: that goes to a temporary file, shown only if quantizing fails; qpass's progress lines
    say what is happening meanwhile."""
    with tempfile.TemporaryFile("w+") as quantizer_log:
        try:
            with _stdout_to(quantizer_log):
                with Step("importing torch, transformers and gptqmodel", "imported torch, transformers and gptqmodel"):
                    import gptqmodel  # noqa: F401
                    from transformers.utils import logging as hf_logging

                    from .testing import write_demo_checkpoint

                    hf_logging.disable_progress_bar()  # "Writing model shards" for one small file
                with Step(f"quantizing a tiny Llama with gptqmodel ({args.method}, 4-bit, calibrated on 32 sentences) "
                          f"into {args.out_dir}", f"wrote {args.out_dir}"):
                    write_demo_checkpoint(args.out_dir, args.method)
        except BaseException:
            quantizer_log.seek(0)
            print(f"gptqmodel's output (last 3000 characters):\n{quantizer_log.read()[-3000:]}", file=sys.stderr)
            raise
    print(f"next: python -m qpass inspect {args.out_dir}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)  # before any heavy import: --help and usage errors answer at once
    quiet_third_party()
    show_progress()
    try:
        if args.command == "inspect":
            return inspect(args)
        if args.command == "demo-checkpoint":
            return demo_checkpoint(args)
    except QpassError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
