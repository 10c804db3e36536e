"""Where training reports go: a progress bar on stderr, TensorBoard event files, JSON lines, a loss curve.

    RUN_DIR/metrics.jsonl    one object per log point: {"step", "loss", "tokens_per_s", "mfu", ...}
    RUN_DIR/tensorboard/     event files for `tensorboard --logdir RUN_DIR` (the `tensorboard` extra)
    RUN_DIR/loss.png         train and eval loss over the whole run, drawn when the run stops

Only the first process of a multi-host job writes anything. Stdout stays free for the final JSON line.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import matplotlib
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar
from tqdm import tqdm

from llama_jax.errors import errors_naming

matplotlib.use("Agg")  # files only: training runs on machines without a display
from matplotlib import pyplot  # noqa: E402

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "loss.png"


class TrainLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        steps: int,
        start_step: int,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops_total: float | None,
    ):
        self.enabled, self.run_dir = enabled, run_dir
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self._last_time, self._last_step = time.perf_counter(), start_step
        self._bar = tqdm(
            total=steps,
            initial=start_step,
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not enabled,
            desc="train",
            unit="step",
        )
        if enabled:
            self._events = EventFile(run_dir / TENSORBOARD_DIR)
            with errors_naming(run_dir / METRICS_FILE):
                _drop_partial_last_line(run_dir / METRICS_FILE)
                self._jsonl = open(run_dir / METRICS_FILE, "a", encoding="utf-8")

    def restart_clock(self, step: int) -> None:
        """Start timing afresh (after compilation, evaluation or a checkpoint, which are not training)."""
        self._last_time, self._last_step = time.perf_counter(), step

    def advance(self) -> None:
        self._bar.update(1)

    def train(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Log the metrics of `step` (a host dict) with throughput since the last call; returns them."""
        now = time.perf_counter()
        elapsed, steps = now - self._last_time, step - self._last_step
        self._last_time, self._last_step = now, step
        record = dict(metrics)
        if record.get("tokens") == 0:  # no target in the batch (every response cut off): no loss to report
            record["loss"] = record["z_loss"] = None
        if steps > 0 and elapsed > 0:
            record["tokens_per_s"] = steps * self.tokens_per_step / elapsed
            if self.peak_flops_total:
                record["mfu"] = record["tokens_per_s"] * self.flops_per_token / self.peak_flops_total
        postfix = {"loss": "n/a" if record["loss"] is None else f"{record['loss']:.3f}"}
        if "reward" in record:  # GRPO: the mean reward of the step's completions
            postfix["reward"] = f"{record['reward']:.3f}"
        if "tokens_per_s" in record:
            postfix["tok/s"] = f"{record['tokens_per_s']:,.0f}"
        if "mfu" in record:
            postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
        self._bar.set_postfix(postfix, refresh=False)
        self._write(step, record, "train")
        return record

    def eval(self, step: int, loss: float | None, metrics: dict[str, float] | None = None) -> None:
        """An evaluation: the next-token loss (and its perplexity), a DPO loss with its `metrics`, or GRPO's
        held-out rewards (no loss)."""
        if loss is None:
            self._write(step, {"loss": None, **metrics}, "eval")
            shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
            self.message(f"step {step}: held-out (greedy) {shown}")
            return
        perplexity = math.exp(min(loss, 700.0))
        others = metrics if metrics else {"perplexity": perplexity}
        self._write(step, {"loss": loss, **others}, "eval")
        if self.enabled:
            shown = ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in others.items())
            self._bar.write(
                f"step {step}: eval loss {loss:.4f}, " + (shown if metrics else f"perplexity {perplexity:.2f}"),
                file=sys.stderr,
            )

    def message(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text, file=sys.stderr)

    def _write(self, step: int, record: dict[str, float], split: str) -> None:
        if not self.enabled:
            return
        self._events.scalars(step, {f"{split}/{name}": value for name, value in record.items() if value is not None})
        with errors_naming(self.run_dir / METRICS_FILE):
            self._jsonl.write(json.dumps({"step": step, "split": split, **record}) + "\n")
            self._jsonl.flush()

    def close(self, plot: bool = True) -> None:
        """Close the files; draw the loss curve unless `plot` is False (the run failed: the files are closed
        without anything new written, whose own error would hide the run's)."""
        self._bar.close()
        if self.enabled:
            self._events.close()
            self._jsonl.close()
            if plot:
                with errors_naming(self.run_dir / LOSS_PLOT):
                    plot_losses(self.run_dir)


class EventFile:
    """A TensorBoard event file in `directory`, written and flushed in the caller's thread by tensorboardX's
    own record writer. Not its SummaryWriter: that writes from a worker thread and flushes again at exit, so
    an error (a full disk) surfaced late, naming no file, and was printed again as tracebacks after the
    command's error line. Here it is raised where the step is logged, naming the directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        with errors_naming(directory):
            directory.mkdir(exist_ok=True)
            self._writer = EventsWriter(str(directory / "events"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with errors_naming(self.directory):
            for name, value in values.items():
                self._writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(name, value)))
            self._writer.flush()

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError:  # only when the last flush failed, already reported where it happened
            pass


def plot_losses(run_dir: Path) -> None:
    """RUN_DIR/loss.png from metrics.jsonl: every run of the directory, resumed ones included. A GRPO run's
    plot shows its rewards (the training completions' mean, the held-out prompts' greedy and sampled ones) instead
    of losses."""
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    figure, axes = pyplot.subplots(figsize=(7, 4))
    rewarded = any("reward" in r for r in records)
    curves = [("train", "loss", "train loss", "-"), ("eval", "loss", "eval loss", "o-")]
    if rewarded:
        curves = [
            ("train", "reward", "training completions' reward", "-"),
            ("eval", "reward", "held-out reward (greedy)", "o-"),
            ("eval", "sampled/reward", "held-out reward (sampled)", "s--"),
        ]
    for split, name, label, style in curves:
        points = sorted(
            {r["step"]: r.get(name) for r in records if r["split"] == split and r.get(name) is not None}.items()
        )
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=4)
    axes.set_xlabel("step")
    axes.set_ylabel("mean reward" if rewarded else "next-token loss (nats)")
    axes.set_title(run_dir.name)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(run_dir / LOSS_PLOT, dpi=100)
    pyplot.close(figure)


def _drop_partial_last_line(path: Path) -> None:
    """A process killed mid-write leaves half a line; cut it so that a resumed run appends whole ones."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, 2)
        tail_start = max(0, size - (1 << 16))
        f.seek(tail_start)
        tail = f.read()
        if tail.endswith(b"\n") or not tail:
            return
        cut = tail.rfind(b"\n")
        f.truncate(tail_start + cut + 1 if cut >= 0 else tail_start)
