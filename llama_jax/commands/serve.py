"""Serve a model directory over an OpenAI-compatible HTTP API.

    python -m llama_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--slots 8] [--api-key KEY]

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)` with the model name the
server prints (default: the directory's name). It listens on 127.0.0.1 unless --host says otherwise; exposed
on another address without --api-key it warns, since anyone who can reach it can use it.

Before it reports healthy it compiles every program the engine may run (the prefill of each prompt bucket,
the decode loop): until then GET /health answers 503 {"status": "starting"}, and the first request after is
as fast as any other.

    python -m llama_jax.serve --checkpoint DIR --slots 32 --max-len 4096 --mesh tensor=8 --compile-for v5e-8

compiles the engine's programs of that setting for a TPU slice instead (only DIR's config.json is read; the
prefill of the longest prompt and the decode loop) and prints per-chip memory; the last line is JSON.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from llama_jax.commands.cli import ArgumentParser, run_cli
from llama_jax.commands.common import (
    add_model_arguments,
    compile_engine_for,
    load_from,
    mesh_from,
    text_model_dir,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m llama_jax.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this host only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument(
        "--max-len",
        type=int,
        metavar="N",
        help="prompt + completion positions per slot (default: the model's max_seq_len)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting for a slot before new ones get 429 (default 64)",
    )
    parser.add_argument("--api-key", metavar="KEY", help="require Authorization: Bearer KEY on /v1/")
    parser.add_argument("--model-name", metavar="NAME", help="the name clients ask for (default: DIR's name)")
    parser.add_argument("--compile-for", metavar="SLICE", help="compile for a TPU slice instead of serving")
    args = parser.parse_args(argv)
    for name in ("slots", "max_queue", "port"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from llama_jax.inference.api import STREAM_STEPS_PER_DISPATCH
    from llama_jax.inference.engine import Engine
    from llama_jax.serve.app import create_app

    model_dir = text_model_dir(args.checkpoint, "the server needs one to read text")
    model_dir.tokenizer()  # refused here when it does not fit the model
    max_seq_len = model_dir.config.max_seq_len
    if args.max_len is not None and not 2 <= args.max_len <= max_seq_len:
        raise ValueError(f"--max-len must be between 2 and the model's max_seq_len {max_seq_len}")
    if args.compile_for is not None:
        max_len = args.max_len or max_seq_len
        return compile_engine_for(
            args.compile_for, model_dir.config, args.mesh, args.slots, [max_len - 1], 1, args.dtype
        )
    if not _loopback(args.host) and args.api_key is None:
        print(
            f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr
        )
    loaded = load_from(args, mesh_from(args))
    engine = Engine(
        loaded,
        slots=args.slots,
        cache_len=args.max_len,
        max_queue=args.max_queue,
        steps_per_dispatch=STREAM_STEPS_PER_DISPATCH,
    )
    name = args.model_name or Path(args.checkpoint).resolve().name
    address = f"http://{args.host}:{args.port}"
    programs = len(engine.backend.programs())
    print(f"compiling {programs} programs before {address}/health reports ready", file=sys.stderr, flush=True)

    def ready() -> None:
        print(f"serving {name} on {address}/v1 ({args.slots} slots)", file=sys.stderr, flush=True)

    engine.start(warm_up=True, on_ready=ready)
    uvicorn.run(
        create_app(engine, name, loaded.chat_template, args.api_key),
        host=args.host,
        port=args.port,
        log_level="warning",
    )
    engine.stop()
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cli() -> None:
    run_cli(main)
