"""`python -m llama_jax.convert {llama2c,hf,meta,to-hf} ...`: see `llama_jax.convert`."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

from llama_jax import convert
from llama_jax.chat import CHAT_TEMPLATE_CHOICES
from llama_jax.commands.cli import ArgumentParser, program_name, run_cli
from llama_jax.commands.common import add_max_model_len_argument
from llama_jax.config import DTYPES


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=program_name("python -m llama_jax.convert"),
        description=convert.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{llama2c,hf,meta,to-hf,merge-lora}")

    def command(name: str, help_text: str, source: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("source", metavar=source)
        sub.add_argument("--out", required=True, help="new output directory (must not exist or be empty)")
        sub.add_argument("--dtype", choices=DTYPES, help="store the weights in this dtype (default: the source's)")
        return sub

    llama2c = command("llama2c", "import a llama2.c model file (v0, v1 or v2)", "MODEL.bin")
    llama2c.add_argument("--tokenizer", required=True, help="its llama2.c tokenizer.bin")
    llama2c.add_argument(
        "--chat-template",
        choices=[c for c in CHAT_TEMPLATE_CHOICES if c != "auto"],
        default="none",
        help="the chat template to record (llama2.c records none; default none)",
    )
    hf_help = "import a Hugging Face Llama directory, or a repo id (owner/name) already in the local Hugging Face cache"
    for name, help_text, source in (
        ("hf", hf_help, "HF_DIR_OR_REPO"),
        ("meta", "import a Meta checkpoint directory", "META_DIR"),
    ):
        sub = command(name, help_text, source)
        sub.add_argument("--tokenizer", help="tokenizer file (default: tokenizer.model found with the weights)")
        sub.add_argument(
            "--chat-template",
            choices=CHAT_TEMPLATE_CHOICES,
            default="auto",
            help="chat template to record (default: detected from the tokenizer and its config)",
        )
        if name == "meta":
            add_max_model_len_argument(sub, "--max-seq-len", "context length (params.json does not record it)")
            sub.add_argument(
                "--rope-scaling-factor",
                type=float,
                help="Llama 3.1 RoPE factor when use_scaled_rope (default: 32 if tied, else 8)",
            )
    to_hf = command(
        "to-hf",
        "export a model directory to the Hugging Face layout (a LoRA run: its adapters, as a PEFT adapter directory)",
        "DIR",
    )
    to_hf.add_argument("--max-shard-size", default="5GB", help="split the safetensors above this size")
    to_hf.add_argument(
        "--base-hf",
        metavar="HF_DIR",
        help="a LoRA run: the transformers export of its base (to-hf BASE --out HF_DIR), named in adapter_config.json "
        "(default: the Hugging Face repository the base was converted from, when known)",
    )
    command("merge-lora", "merge a LoRA run's adapters into its base model: a plain model directory", "RUN_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = _convert(args)
    except OSError as error:
        # The output is checked to be new when a conversion starts and renamed into place when it ends: a
        # directory that is full by then was written meanwhile, by a second conversion given the same --out.
        raced = error.errno in (errno.ENOTEMPTY, errno.EEXIST) and error.filename == str(Path(args.out).absolute())
        if not raced:
            raise
        raise ValueError(
            f"another conversion is writing {args.out} and got there first: this one's output is discarded; "
            "use the other's, or convert again with another --out"
        ) from None
    print(f"wrote {out}")
    return 0


def _convert(args: argparse.Namespace) -> Path:
    """Run the subcommand; the output directory it wrote."""
    if args.command == "llama2c":
        out = convert.convert_llama2c(args.source, args.tokenizer, args.out, args.dtype, args.chat_template)
    elif args.command == "hf":
        out = convert.convert_hf(args.source, args.out, args.tokenizer, args.chat_template, args.dtype)
    elif args.command == "meta":
        out = convert.convert_meta(
            args.source,
            args.out,
            args.tokenizer,
            args.chat_template,
            args.dtype,
            args.max_model_len,
            args.rope_scaling_factor,
        )
    elif args.command == "merge-lora":
        out = convert.merge_lora(args.source, args.out, args.dtype)
    else:
        out = convert.export_hf(args.source, args.out, args.dtype, args.max_shard_size, args.base_hf)
    return out


def cli() -> None:
    run_cli(main)
