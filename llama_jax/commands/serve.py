"""Serve a model directory over an OpenAI-compatible HTTP API.

    python -m llama_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--max-num-seqs 8] [--api-key-file F]

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)` with the model name the
server prints (default: the directory's name). It listens on 127.0.0.1 unless --host says otherwise; exposed
on another address without an API key it warns, since anyone who can reach it can use it. The key comes from
--api-key-file (or --api-key, which `ps` shows), or else the LLAMA_JAX_API_KEY environment variable.

    python -m llama_jax.serve --checkpoint BASE --lora-modules sql=runs/sql-lora chat=peft/chat-adapter

serves BASE under its own name and each LoRA adapter (a LoRA run of train.py on BASE, or a Hugging Face PEFT
adapter folder) under the name given: a request's `model` picks one, and requests to different adapters decode
together in the same steps. GET /v1/models lists them all.

Prompts longer than --prefill-chunk tokens are prefilled a chunk at a time between decode steps, so running
streams keep producing; whole chunks of prompts are kept in a prefix cache (--prefix-cache-tokens), so
requests that share a system prompt, few-shot examples or a chat history reuse its keys and values. Chat
requests use the checkpoint's chat template, or --chat-template llama2|llama3|FILE.jinja.

Before it reports healthy it compiles every program the engine may run: until then GET /health answers 503
{"status": "starting"}, and the first request after is as fast as any other. GET /metrics serves Prometheus
metrics; each request leaves one access-log line on stderr (its prompt only with --log-prompts).

    python -m llama_jax.serve --checkpoint DIR --max-num-seqs 32 --max-model-len 4096 --mesh tensor=8 \
        --compile-for v5e-8

compiles the engine's programs of that setting for a TPU slice instead (only DIR's config.json is read) and
prints per-chip memory; the last line is JSON.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from llama_jax.commands.cli import ArgumentParser, program_name, run_cli
from llama_jax.commands.common import (
    add_compile_for_argument,
    add_job_arguments,
    add_model_arguments,
    add_server_engine_arguments,
    compile_engine_for,
    engine_settings,
    job_process,
    join_job,
    load_from,
    mesh_from,
    text_model_dir,
)

API_KEY_VARIABLE = "LLAMA_JAX_API_KEY"
PROGRAM = "python -m llama_jax.serve"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog=program_name(PROGRAM),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this host only)")
    parser.add_argument("--port", type=int, default=8000, help="1-65535 (default 8000)")
    add_server_engine_arguments(parser)
    parser.add_argument(
        "--chat-template",
        metavar="NAME_OR_FILE",
        help="llama2, llama3, or a Jinja template file (default: the checkpoint's)",
    )
    parser.add_argument("--api-key-file", metavar="FILE", help="require Authorization: Bearer KEY, KEY read from FILE")
    parser.add_argument(
        "--api-key", metavar="KEY", help=f"the same, KEY given here (visible in ps; {API_KEY_VARIABLE} too)"
    )
    parser.add_argument("--log-prompts", action="store_true", help="write each request's prompt in its access-log line")
    parser.add_argument(
        "--ssl-keyfile", metavar="FILE", help="serve HTTPS with this private key (PEM), and --ssl-certfile"
    )
    parser.add_argument("--ssl-certfile", metavar="FILE", help="the certificate (chain) of --ssl-keyfile (PEM)")
    parser.add_argument(
        "--request-timeout",
        type=float,
        metavar="SECONDS",
        help="end a request still running after this long with a timeout error, freeing its slot (default: none)",
    )
    parser.add_argument("--model-name", metavar="NAME", help="the name clients ask for (default: DIR's name)")
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=DIR",
        help="LoRA adapters served beside the base model, each under NAME: a LoRA run of train.py or a PEFT folder",
    )
    add_compile_for_argument(parser)
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1-65535, got {args.port}")
    if args.api_key is not None and args.api_key_file is not None:
        parser.error("give the API key with --api-key or --api-key-file, not both")
    args.lora_modules = _lora_modules(parser, args.lora_modules)
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        parser.error("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    if args.request_timeout is not None and not args.request_timeout > 0:
        parser.error(f"--request-timeout must be a number of seconds > 0, got {args.request_timeout}")
    return args


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything slow starts: an address it cannot listen on is one error line
    at once, not after minutes of compiling (uvicorn binds only when it starts). Bound, not yet listening: until
    uvicorn serves on it (and listens), a client is refused at once rather than left waiting in a backlog."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def check_tls(args: argparse.Namespace) -> None:
    """The key and certificate load together (ValueError naming them when not), before anything slow."""
    if args.ssl_keyfile is None:
        return
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    except OSError as e:  # ssl.SSLError among them
        reason = getattr(e, "reason", None) or e.strerror or str(e)
        raise ValueError(
            f"cannot use --ssl-certfile {args.ssl_certfile} with --ssl-keyfile {args.ssl_keyfile}: {reason}"
        ) from None


def _lora_modules(parser: argparse.ArgumentParser, given: list[str]) -> dict[str, str]:
    """NAME=DIR pairs of --lora-modules, each name once."""
    modules: dict[str, str] = {}
    for pair in given:
        name, _, path = pair.partition("=")
        if not name or not path:
            parser.error(f"--lora-modules takes NAME=DIR pairs, got {pair!r}")
        if name in modules:
            parser.error(f"--lora-modules names {name!r} twice")
        modules[name] = path
    return modules


def api_key(args: argparse.Namespace) -> str | None:
    """The key clients must send: --api-key, the first line of --api-key-file, or $LLAMA_JAX_API_KEY."""
    if args.api_key_file is not None:
        key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or os.environ.get(API_KEY_VARIABLE) or None


def chat_template(args: argparse.Namespace, model_dir) -> str | None:
    """--chat-template (a name, or the text of a Jinja file), checked; else the checkpoint's."""
    from llama_jax.chat import TEMPLATES, check_template

    if args.chat_template is None:
        return model_dir.chat_template
    template = args.chat_template
    if template not in TEMPLATES:
        template = Path(template).read_text(encoding="utf-8")
    check_template(template)
    return template


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.compile_for is None:
        status = job_process(args, "llama_jax.commands.serve", argv, program_name(PROGRAM))
        if status is not None:
            return status
        join_job(args)
    import uvicorn

    from llama_jax.distributed import is_leader
    from llama_jax.inference.engine import Engine
    from llama_jax.inference.settings import STREAM_STEPS_PER_DISPATCH
    from llama_jax.serve.app import access_log, create_app

    settings = engine_settings(args, steps_per_dispatch=STREAM_STEPS_PER_DISPATCH)
    model_dir = text_model_dir(args.checkpoint, "the server needs one to read text")
    model_dir.tokenizer()  # refused here when it does not fit the model
    max_len = settings.resolve(model_dir.config).max_model_len  # refused here when over the model's
    if args.compile_for is not None:
        return compile_engine_for(
            args.compile_for, model_dir.config, args.mesh, settings, [max_len - 1], args.dtype, args.quantize
        )
    key = api_key(args)
    template = chat_template(args, model_dir)
    check_tls(args)
    sock = listening_socket(args.host, args.port) if is_leader() else None
    if not _loopback(args.host) and key is None:
        print(
            f"warning: listening on {args.host} without an API key: anyone who can reach it can use it", file=sys.stderr
        )
    name = args.model_name or Path(args.checkpoint).resolve().name
    if name in args.lora_modules:
        raise ValueError(f"--lora-modules names an adapter {name!r}, the base model's own name: rename it")
    loaded, adapters = load_from(args, mesh_from(args)), ()
    if args.lora_modules:
        from llama_jax.adapters import with_adapters

        loaded, adapters = with_adapters(loaded, args.lora_modules, base_dir=args.checkpoint)
    engine = Engine(loaded, settings, adapters=adapters)
    if not is_leader():  # another host of the job: its engine follows process 0's, step by step
        engine.start(warm_up=True)
        engine.join()
        return 0
    address = f"{'https' if args.ssl_certfile else 'http'}://{args.host}:{args.port}"
    programs = len(engine.status().programs)
    print(f"compiling {programs} programs before {address}/health reports ready", file=sys.stderr, flush=True)

    def ready() -> None:
        slots = engine.settings.max_num_seqs
        print(f"serving {name} on {address}/v1 ({slots} slots)", file=sys.stderr, flush=True)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    engine.start(warm_up=True, on_ready=ready)
    app = create_app(engine, name, template, key, log_prompts=args.log_prompts, request_timeout=args.request_timeout)
    # A bounded graceful shutdown: an idle TLS client that never answers the close would hold it open.
    config = uvicorn.Config(
        app,
        log_level="warning",
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        timeout_graceful_shutdown=10,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully (as `uvicorn.run` ends quietly)
        pass
    finally:  # on a multi-host job, this ends the other processes' engines too
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


if __name__ == "__main__":  # a multi-host job's process (`hosts.py`)
    cli()
