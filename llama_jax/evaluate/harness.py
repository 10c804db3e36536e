"""lm-evaluation-harness tasks with a llama_jax model: the harness's `LM` interface on our forward pass and
our batch engine (`python -m llama_jax.evaluate harness`).

The harness asks three kinds of question; each is answered in batches, never one request per compile:

* `loglikelihood(context, continuation)`: the harness's own `TemplateLM` tokenizes the pair (BOS, then the
  context; trailing spaces of the context move to the continuation) exactly as its `hf` backend does.
  Requests whose model inputs are the same (the choices of a multiple-choice question whose continuations
  are one token, or share all but their last) share one row; rows are sorted longest first and run
  `batch_size` at a time, padded to a multiple of `PAD_MULTIPLE` tokens (one program per shape, kept), and
  the output projection runs only at each request's continuation positions
  (`loss.continuation_logprobs`): the continuation's summed log-probability and whether every one of its
  tokens is the argmax (`is_greedy`). Continuations longer than `SHORT_CONTINUATION` (rolling windows) are
  scored at every position a chunk of logits at a time (`loss.token_logprobs`).
* `loglikelihood_rolling(text)`: the text's tokens after BOS, in disjoint windows of the model's length,
  each scored with as much preceding context as fits (the harness's own window function), summed. The
  text is encoded without a BOS of its own: the `hf` backend also scores BOS itself after a BOS prefix,
  which is no part of the text.
* `generate_until(context, {until, max_gen_toks, ...})`: all requests go through the continuous-batching
  engine at once, greedy unless `do_sample` with a temperature; a completion is decoded from its token ids
  and cut at the first `until` string, as the `hf` backend does.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from llama_jax.inference.sampling import SamplingParams
from llama_jax.loss import continuation_logprobs, token_logprobs
from llama_jax.sharding import global_array, named_sharding, replicated

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
except ImportError:  # the `eval` extra is not installed: find_tasks says how to get it
    lm_utils, TemplateLM = None, object

# Rows are padded to a multiple of this many tokens (the longest of a batch rounded up): power-of-two buckets
# left up to half of each batch as padding. TPU tiles are 128 wide; a CPU or GPU is fine with 32.
PAD_MULTIPLE = 32
SHORT_CONTINUATION = 64  # longer continuations (rolling windows) take the all-positions path
EXTRA_MISSING = 'lm-evaluation-harness is not installed: pip install -e ".[eval]" (or pip install lm-eval)'
DEFAULT_MAX_GEN_TOKS = 256


class LlamaJaxLM(TemplateLM):
    """The harness's model interface over a loaded llama_jax model (`llama_jax.load`), on its mesh."""

    def __init__(self, loaded, batch_size: int = 16, max_length: int | None = None):
        super().__init__()
        self.loaded, self.batch_size = loaded, batch_size
        self.tokenizer = loaded.tokenizer
        self._max_length = min(max_length or loaded.config.max_seq_len, loaded.config.max_seq_len)
        graphdef, state = nnx.split(loaded.model)
        self._state = state

        # Scores replicated: every process of a multi-host job reads all of them and answers the harness alike.
        @functools.partial(jax.jit, out_shardings=replicated(loaded.mesh))
        def score(state, inputs, targets):
            return token_logprobs(nnx.merge(graphdef, state), inputs, targets)

        @functools.partial(jax.jit, out_shardings=replicated(loaded.mesh))
        def score_continuations(state, inputs, rows, positions, targets):
            return continuation_logprobs(nnx.merge(graphdef, state), inputs, rows, positions, targets)

        self._score = score
        self._score_continuations = score_continuations

    # What TemplateLM needs.
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (logprob, is_greedy)."""
        rows = []
        for _, context_ids, continuation_ids in requests:
            whole = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1) :]
            rows.append((whole, len(continuation_ids)))
        scores = self._score_rows(rows, disable_tqdm)
        for (key, _, _), answer in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from llama_jax.inference.engine import Engine
        from llama_jax.inference.settings import EngineSettings
        from llama_jax.inference.types import make_request

        engine_requests, untils = [], []
        for index, (context, gen_kwargs) in enumerate(request.args for request in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if max_tokens >= self.max_length:
                raise ValueError(
                    f"max_gen_toks {max_tokens} leaves no room for a prompt in {self.max_length} positions"
                )
            sampled = kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0
            sampling = (
                SamplingParams(
                    float(kwargs.get("temperature", 1.0)),
                    int(kwargs.get("top_k") or 0),
                    float(kwargs.get("top_p") or 1.0),
                )
                if sampled
                else SamplingParams(0.0)
            )
            # As the hf backend: the prompt keeps its last tokens, leaving room for max_gen_toks.
            prompt = self.tok_encode(context)[-(self.max_length - max_tokens) :]
            engine_requests.append(
                make_request(
                    prompt,
                    max_tokens,
                    tokenizer=self.tokenizer,
                    sampling=sampling,
                    stream=index,
                    stop_strings=[u for u in until if u],
                )
            )
            untils.append(until)
        engine = Engine(self.loaded, EngineSettings(max_num_seqs=self.batch_size, max_model_len=self.max_length))
        results = engine.generate(engine_requests)
        texts = []
        for request, result, until in zip(requests, results, untils):
            text = self.tok_decode(result.token_ids)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            texts.append(text)
        return texts

    def _score_rows(self, rows: list[tuple[list[int], int]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """rows: (ids, n): score ids[-n:] given everything before them."""
        short = [i for i, (_, n) in enumerate(rows) if n <= SHORT_CONTINUATION]
        long = [i for i, (_, n) in enumerate(rows) if n > SHORT_CONTINUATION]
        answers: list[tuple[float, bool] | None] = [None] * len(rows)
        with jax.set_mesh(self.loaded.mesh):
            for index, answer in zip(short, self._score_short([rows[i] for i in short], disable_tqdm)):
                answers[index] = answer
            for index, answer in zip(long, self._score_whole([rows[i] for i in long], disable_tqdm)):
                answers[index] = answer
        return answers

    def _score_short(self, rows: list[tuple[list[int], int]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Requests with the same model inputs (ids[:-1]) share a row; `batch_size` distinct rows per call,
        longest first, with every request on them; logits only at the continuations' positions."""
        distinct: dict[tuple[int, ...], list[int]] = {}
        for index, (ids, _) in enumerate(rows):
            distinct.setdefault(tuple(ids[:-1]), []).append(index)
        answers: list[tuple[float, bool] | None] = [None] * len(rows)
        pad_id = self.tokenizer.pad_id
        for batch in self._batches(list(distinct), len, disable_tqdm):
            inputs = np.full(self._shape(len(batch), len(batch[0])), pad_id, np.int32)
            requests = [(row, index) for row, key in enumerate(batch) for index in distinct[key]]
            for row, key in enumerate(batch):
                inputs[row, : len(key)] = key
            longest = max(rows[index][1] for _, index in requests)
            n = min(1 << (longest - 1).bit_length(), SHORT_CONTINUATION)  # positions scored per request
            count = 1 << (len(requests) - 1).bit_length()  # a power of two of requests
            request_rows = np.zeros(count, np.int32)
            positions = np.zeros((count, n), np.int32)
            targets = np.full((count, n), pad_id, np.int32)
            for slot, (row, index) in enumerate(requests):
                ids, k = rows[index]
                request_rows[slot] = row
                positions[slot, :k] = np.arange(len(ids) - 1 - k, len(ids) - 1)
                targets[slot, :k] = ids[-k:]
            sharding = named_sharding(self.loaded.mesh, ("batch", "length"), inputs.shape)
            logprobs, greedy = self._score_continuations(
                self._state, global_array(inputs, sharding), request_rows, positions, targets
            )
            logprobs, greedy = np.asarray(logprobs, np.float64), np.asarray(greedy)
            for slot, (_, index) in enumerate(requests):
                k = rows[index][1]
                answers[index] = (float(logprobs[slot, :k].sum()), bool(greedy[slot, :k].all()))
        return answers

    def _batches(self, items: list, length, disable_tqdm: bool):
        """`items` longest first (by `length(item)`, its model input's length), `batch_size` at a time, with a
        progress bar when there are many."""
        from tqdm import tqdm

        order = sorted(items, key=lambda item: -length(item))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return tqdm(batches, unit="batch", file=sys.stderr, disable=disable_tqdm or len(batches) < 8)

    def _shape(self, rows: int, longest: int) -> tuple[int, int]:
        """(rows, length) of a scoring call: the rows rounded up to a power of two (one program per count), never
        more than the batch size, so a task's last, partial batch does not pay for a whole one; the longest
        input rounded up to a multiple of PAD_MULTIPLE, at most the model's length."""
        return (
            min(1 << (rows - 1).bit_length(), self.batch_size),
            min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, self.max_length),
        )

    def _score_whole(self, rows: list[tuple[list[int], int]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Long continuations: every position scored, a chunk of logits at a time; `batch_size` rows per call,
        longest first, padded to a multiple of PAD_MULTIPLE."""
        answers: list[tuple[float, bool] | None] = [None] * len(rows)
        pad_id = self.tokenizer.pad_id
        for batch in self._batches(list(range(len(rows))), lambda i: len(rows[i][0]) - 1, disable_tqdm):
            inputs = np.full(self._shape(len(batch), len(rows[batch[0]][0]) - 1), pad_id, np.int32)
            targets = np.full(inputs.shape, pad_id, np.int32)
            for row, index in enumerate(batch):
                ids = rows[index][0]
                inputs[row, : len(ids) - 1] = ids[:-1]
                targets[row, : len(ids) - 1] = ids[1:]
            sharding = named_sharding(self.loaded.mesh, ("batch", "length"), inputs.shape)
            logprobs, greedy = self._score(self._state, global_array(inputs, sharding), global_array(targets, sharding))
            logprobs, greedy = np.asarray(logprobs, np.float64), np.asarray(greedy)
            for row, index in enumerate(batch):
                ids, n = rows[index]
                span = slice(len(ids) - 1 - n, len(ids) - 1)
                answers[index] = (float(logprobs[row, span].sum()), bool(greedy[row, span].all()))
        return answers


def find_tasks(names: str, include_path: str | None):
    """The harness tasks a comma-separated list names, and the harness's task manager that knows them (with
    the task YAMLs of `include_path`); an unknown name is a ValueError."""
    if lm_utils is None:
        raise ValueError(EXTRA_MISSING)
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path} is not a directory")
    tasks = [name.strip() for name in names.split(",") if name.strip()]
    task_manager = TaskManager(include_path=include_path)
    unknown = [name for name in tasks if name not in task_manager.all_tasks]
    if unknown or not tasks:
        raise ValueError(
            f"unknown harness task {', '.join(unknown) or repr(names)} (`lm-eval ls tasks` lists "
            "them; --include-path adds a folder of task YAMLs)"
        )
    return tasks, task_manager


def evaluate_tasks(
    loaded,
    tasks: list[str],
    task_manager,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    seed: int = 0,
    log_samples: bool = False,
) -> dict[str, Any]:
    """The harness's own results dictionary for `tasks` (from `find_tasks`) with `loaded` as the model."""
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=LlamaJaxLM(loaded, batch_size, max_length),
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )


def metric_values(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: {metric: value}} in the harness's metric names. Its metric keys are "NAME,FILTER" (acc,none);
    the other keys (alias, sample_len) describe the run."""
    return {
        task: {metric: value for metric, value in scores.items() if "," in metric}
        for task, scores in results["results"].items()
    }


def write_results(results: dict[str, Any], path: str | Path) -> None:
    """The harness's full results (with per-sample logs when it kept them) as JSON."""
    from lm_eval.utils import handle_non_serializable

    Path(path).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
