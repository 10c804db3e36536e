"""What the command lines share: the model flags and loading a model from them; the generation and engine
flags and the settings they make; `--compile-for` and compiling the engine for a TPU slice or GPUs.

    --checkpoint DIR --dtype D --quantize int8 --mesh data=..,fsdp=..,tensor=..   (infer, evaluate, serve)
    --max-new-tokens --temperature --top-p --top-k --seed --chat --stop-id --max-num-seqs   (infer, evaluate
                                                                                  generate)
    --max-num-seqs --max-model-len --max-queue --prefill-chunk --prefix-cache-tokens   (serve)
    --compile-for TARGET                                                          (train, infer, serve)

A setting has one flag in every command, vLLM's name where it has one (`--max-num-seqs`, `--max-model-len`);
the flags they replace are still read for a release, with a warning. Nothing here imports JAX at module
level: `--help` and a mistyped flag answer before JAX starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from llama_jax.config import DTYPES, QUANTIZE_MODES

CHECKPOINT_HELP = "a model directory (from llama_jax.convert) or a training run directory"
COMPILE_FOR_HELP = (
    "compile for a TPU slice (v5e-8; needs libtpu), slices over DCN (2xv5p-128) or the GPUs of one host "
    "(8xH100; needs the gpu-compile extra) on this host, and report per-chip memory, instead of running"
)


class _RenamedFlag(argparse.Action):
    """A flag's old spelling, kept for a release: it sets the new flag's value and says so on stderr."""

    def __init__(self, option_strings, dest, renamed_to: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.renamed_to = renamed_to

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"warning: {option_string} is now {self.renamed_to}; the old name will go in a later release",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_renamed_flag(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """`old` as a hidden alias of the flag `new` (added before it), e.g. --slots of --max-num-seqs."""
    dest = new.removeprefix("--").replace("-", "_")
    parser.add_argument(
        old, dest=dest, action=_RenamedFlag, renamed_to=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs
    )


def add_compile_for_argument(parser) -> None:
    """--compile-for TARGET (a parser or an argument group)."""
    parser.add_argument("--compile-for", metavar="TARGET", help=COMPILE_FOR_HELP)


def add_max_model_len_argument(parser, old: str | None, help: str) -> None:
    """--max-model-len N: the positions a sequence may use (context length); `old`: its former name here."""
    parser.add_argument("--max-model-len", type=int, metavar="N", help=help)
    if old is not None:
        add_renamed_flag(parser, old, "--max-model-len", type=int, metavar="N")


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """--coordinator, --num-processes, --process-id: joining a multi-host job where JAX cannot find it."""
    group = parser.add_argument_group(
        "joining a multi-host job (automatic on Cloud TPU VMs, SLURM and Open MPI; run the command on every host)"
    )
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same on every process")
    group.add_argument("--num-processes", type=int, metavar="N", help="the processes of the job, one per host")
    group.add_argument(
        "--process-id", type=int, metavar="I", help="this process's index, 0 to N-1 (0 reads inputs, writes outputs)"
    )


def job_process(args: argparse.Namespace, module: str, argv: list[str], program: str) -> int | None:
    """On a host of a multi-host job, run this command's work in a child process (`hosts.py`: a lost host
    then ends it with one line) and return the exit status; None: carry on in this process (one process, or
    already the job's child). `module` runs the command (`python -m`); `program` is its name as typed."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(value is not None for value in explicit):
        if None in explicit:
            raise ValueError("--coordinator, --num-processes and --process-id go together: give all three")
        if not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
    return run_on_this_host(explicit, module, argv, program)


def run_on_this_host(explicit: tuple, module: str, argv: list[str], program: str) -> int | None:
    """`job_process` for a job described by (coordinator, num_processes, process_id) — given, or all None for
    the environment's — (train.py's `distributed.*` keys, checked by its config)."""
    from llama_jax.commands.hosts import is_job_process, keep_stdout_for_python, run_as_job_process

    if is_job_process():
        keep_stdout_for_python()
        return None
    size = _job_size(explicit)
    if size is None:
        return None
    num_processes, process_id = size
    return run_as_job_process(["-m", module, *argv], program, process_id, num_processes)


def _job_size(explicit: tuple) -> tuple[int, int] | None:
    """(processes, this one's index) of the job given or the environment describes; None for one process."""
    _, num_processes, process_id = explicit
    if num_processes is not None:
        return (num_processes, process_id) if num_processes > 1 else None
    try:  # JAX's own detection (Cloud TPU VMs, SLURM, MPI), as `jax.distributed.initialize()` runs it; no device
        from jax._src.clusters import ClusterEnv

        detected = ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 300)
    except Exception:  # another JAX's internals: the job is still joined (in this process) by `join_job`
        return None
    _, num_processes, process_id, _ = detected
    return (num_processes, process_id) if num_processes and num_processes > 1 else None


def join_job(args: argparse.Namespace) -> None:
    """Join the job (`distributed.join`) before anything touches a device; alone, stay one process."""
    from llama_jax.distributed import join

    join(args.coordinator, args.num_processes, args.process_id)


def add_model_arguments(parser: argparse.ArgumentParser, *, checkpoint_required: bool = True) -> None:
    """--checkpoint, --dtype, --quantize, --mesh."""
    parser.add_argument("--checkpoint", metavar="DIR", required=checkpoint_required, help=CHECKPOINT_HELP)
    parser.add_argument("--dtype", choices=DTYPES, help="parameter and compute dtype (default: the checkpoint's)")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default="none",
        help="int8: projection weights stored int8 with per-channel scales (half of bf16's bytes)",
    )
    parser.add_argument(
        "--mesh",
        default="",
        metavar="data=..,tensor=..",
        help="device mesh, e.g. data=2,tensor=4 (default: data-parallel over all devices)",
    )


def mesh_from(args: argparse.Namespace):
    """The device mesh --mesh describes (checked before anything is loaded)."""
    from llama_jax.sharding import make_mesh

    return make_mesh(inference_mesh_config(args.mesh))


def inference_mesh_config(spec: str):
    """--mesh of a command that generates or scores: context parallelism is training's alone."""
    from llama_jax.sharding import MeshConfig

    config = MeshConfig.parse(spec)
    if config.context != 1:
        raise ValueError("--mesh context=N splits training sequences (train.py); generating and scoring use context=1")
    return config


def load_from(args: argparse.Namespace, mesh, checkpoint: str | Path | None = None):
    """The model of --checkpoint (or `checkpoint`) on `mesh`, in --dtype, quantized as --quantize says."""
    from llama_jax.loading import load

    return load(checkpoint or args.checkpoint, mesh=mesh, dtype=args.dtype, quantize=args.quantize)


def text_model_dir(path: str | Path, purpose: str):
    """The model directory at `path`, refused in one line when it has no tokenizer: `purpose` says why the
    command needs one ("infer.py reads text prompts")."""
    from llama_jax.model_dir import read_model_dir

    model_dir = read_model_dir(path)
    if model_dir.tokenizer_path is None:
        raise ValueError(f"{path} has no tokenizer file; {purpose}")
    return model_dir


def add_generation_arguments(parser: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    """The generation settings' flags and --max-num-seqs (formerly --batch-size here): infer.py's defaults
    sample, `evaluate generate`'s are greedy and shorter."""
    _add_max_num_seqs(parser, "--batch-size")
    for flag, kind, default, metavar, text in (
        ("--max-new-tokens", int, max_new_tokens, "N", f"most tokens generated per prompt (default {max_new_tokens})"),
        ("--temperature", float, temperature, "T", f"0 is greedy (default {temperature:g})"),
        ("--top-p", float, 0.9, "P", "nucleus mass in (0, 1]; 1 turns it off (default 0.9)"),
        ("--top-k", int, 0, "K", "keep the K most likely tokens; 0 turns it off (default)"),
        ("--seed", int, 0, "S", "a prompt's samples depend only on the seed and its position in the input"),
    ):
        parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)
    parser.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user message in the checkpoint's chat template"
    )
    parser.add_argument(
        "--stop-id",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="an extra token id that ends a completion (the tokenizer's EOS always does)",
    )


def _add_max_num_seqs(parser: argparse.ArgumentParser, old: str) -> None:
    """--max-num-seqs and the page pool it shares: --kv-cache-tokens, --block-size, --kv-cache-dtype."""
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=8,
        metavar="N",
        help="sequences decoded together (decode slots), each refilled when its request ends "
        "(default 8; results never depend on it)",
    )
    add_renamed_flag(parser, old, "--max-num-seqs", type=int, metavar="N")
    parser.add_argument(
        "--kv-cache-tokens",
        type=int,
        metavar="N",
        help="positions the KV cache's page pool holds for all sequences together (default: max-num-seqs × "
        "the context, which never runs out; fewer serve more sequences in the same memory, preempting the newest "
        "when it runs out)",
    )
    parser.add_argument(
        "--block-size", type=int, metavar="N", help="positions per page of the KV cache, a power of two (default 128)"
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "int8"),
        default="auto",
        help="auto: the model's dtype; int8: half of bf16's bytes, a scale per position and head",
    )


def add_server_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """A server's engine: --max-num-seqs (formerly --slots), --max-model-len (formerly --max-len), --max-queue,
    --prefill-chunk and --prefix-cache-tokens."""
    _add_max_num_seqs(parser, "--slots")
    add_max_model_len_argument(parser, "--max-len", "prompt + completion positions per sequence (default: the model's)")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting for a slot before new ones get 429 (default 64)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="N",
        help="prompt tokens prefilled per step and per cached prefix chunk, a power of two (default 256)",
    )
    parser.add_argument(
        "--prefix-cache-tokens",
        type=int,
        metavar="N",
        help="prompt tokens the prefix cache may keep in the page pool (default: as many as running sequences "
        "leave free; 0: none)",
    )


def engine_settings(args: argparse.Namespace, **fixed):
    """The engine's settings from its flags (those a command has), checked once here: their errors name the
    setting (max_num_seqs for --max-num-seqs). `fixed`: settings the command chooses itself."""
    from llama_jax.inference.settings import EngineSettings

    flags = (
        "max_num_seqs",
        "max_model_len",
        "kv_cache_tokens",
        "block_size",
        "kv_cache_dtype",
        "max_queue",
        "prefill_chunk",
        "prefix_cache_tokens",
    )
    given = {name: getattr(args, name) for name in flags if getattr(args, name, None) is not None}
    return EngineSettings(**(given | fixed))


def generation_settings(args: argparse.Namespace):
    """The settings, checked once here (their errors name the setting: top_p for --top-p)."""
    from llama_jax.inference.sampling import SamplingParams
    from llama_jax.inference.settings import GenerationSettings

    return GenerationSettings(
        args.max_new_tokens,
        SamplingParams(args.temperature, args.top_k, args.top_p),
        args.seed,
        args.chat,
        tuple(args.stop_id),
    )


@dataclasses.dataclass(frozen=True)
class GenerationJob:
    """What infer.py and `evaluate generate` know before they load any weights: every setting checked, the
    model directory read, the prompts encoded (each checked to leave room for max_new_tokens)."""

    settings: Any  # GenerationSettings
    engine: Any  # EngineSettings
    mesh: Any
    model_dir: Any  # model_dir.ModelDir
    prompt_ids: list[list[int]]


def generation_job(args: argparse.Namespace, prompts: list[str], purpose: str) -> GenerationJob:
    """The job of `prompts` with the generation, engine and model flags; `purpose` says why the model
    directory needs a tokenizer."""
    from llama_jax.inference.prompts import PromptEncoder, chat_template_for

    settings, engine, mesh = generation_settings(args), engine_settings(args), mesh_from(args)
    model_dir = text_model_dir(args.checkpoint, purpose)
    settings.check_model(model_dir.config)
    template = chat_template_for(model_dir.chat_template, settings.chat)
    encoder = PromptEncoder(model_dir.tokenizer(), template, model_dir.config.max_seq_len, settings.max_new_tokens)
    return GenerationJob(settings, engine, mesh, model_dir, [encoder.encode(p, i) for i, p in enumerate(prompts)])


def run_settings(args: argparse.Namespace, model_dir, settings) -> dict:
    """What the records of an output depend on: a rerun must match it to add to them (an int8 KV cache's
    rounding can change a token). Not the sequences decoded together, the pages or the mesh: a prompt's tokens
    do not depend on them."""
    sampling = settings.sampling
    return {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "params": str(model_dir.params_path.resolve()),
        "dtype": args.dtype,
        "quantize": args.quantize,
        "chat": settings.chat,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "seed": settings.seed,
        "stop_ids": sorted(settings.stop_ids),
        # only when int8: the files of earlier runs, whose KV cache was in the model's dtype, still resume
        **({"kv_cache_dtype": "int8"} if args.kv_cache_dtype == "int8" else {}),
        # only when constrained (infer.py's structured outputs), for the same reason
        **({"constraint": dataclasses.asdict(settings.constraint)} if settings.constraint is not None else {}),
    }


def compile_engine_for(
    target_name: str, model, mesh: str, settings, prompt_lens: list[int], dtype: str | None, quantize: str = "none"
) -> int:
    """infer.py and serve --compile-for: the engine's programs for `settings` (EngineSettings) compiled for a
    TPU slice (of any number of hosts) or GPUs, the prefill of each of `prompt_lens`, the weights in `dtype`
    (int8 projections with `quantize`); prints the table and, last, the JSON report. Exit status 1 when they do
    not fit."""
    import json

    from llama_jax.aot import report_json, report_table
    from llama_jax.hardware import compile_target
    from llama_jax.inference.compile import compile_inference

    target = compile_target(target_name)
    dtype = dtype or "bfloat16"
    model = model.replace(dtype=dtype, param_dtype=dtype, quantize=quantize)
    reports, kv_cache = compile_inference(model, target, inference_mesh_config(mesh), settings, prompt_lens)
    print(report_table(target, reports))
    print(
        f"KV cache: {kv_cache['pages']:,} pages of {kv_cache['block_size']} positions ({kv_cache['tokens']:,}), "
        f"{kv_cache['dtype']}, {kv_cache['gib_per_chip']} GiB a chip: {kv_cache['sequences']} sequences of "
        f"{kv_cache['max_model_len']:,} positions at once (fixed slots of the model's {model.max_seq_len:,}-position "
        f"context: {kv_cache['fixed_slots_of_the_context']})"
    )
    summary = report_json(target, reports) | {"kv_cache": kv_cache}
    print(json.dumps(summary), flush=True)
    if not summary["fits"]:
        print(
            f"error: this setting does not fit in the memory of one chip of {target.name}: fewer sequences "
            "(--max-num-seqs), a shorter context, or shard more (--mesh tensor=N)",
            file=sys.stderr,
        )
        return 1
    return 0
