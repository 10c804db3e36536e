"""GRPO's rewards (`objective=grpo`): what scores each sampled completion, called as TRL's GRPOTrainer calls them.

    python train.py objective=grpo data=prompts.jsonl reward=rewards/math.py:score,regex:^<think> reward_weights=1,0.5

Each record of `data` is `{"prompt": ..., **fields}`. A reward is a Python function with TRL's signature,

    def score(prompts, completions, answer, **kwargs) -> list[float]:
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

called once per batch with keywords: `prompts`, `completions` (strings, one per completion: a prompt repeats for
each of its completions), `completion_ids` (token ids) and one list per record field other than "prompt"
(`answer=[...]`, a value per completion). A function with `**kwargs` gets them all, one without only those it
names (`def score(completions, answer)`): a reward function written for TRL runs here unchanged.

`reward=` is a comma-separated list of entries:

    FILE.py:FUNCTION     FUNCTION from the Python file FILE.py, imported by path (its folder need not be a package)
    exact_match:FIELD    1.0 when the stripped completion equals str(record[FIELD]) stripped, else 0.0
    contains:FIELD       1.0 when str(record[FIELD]) occurs in the completion
    regex:PATTERN        1.0 when re.search(PATTERN, completion) finds a match; flags inline: (?s), (?i), (?m).
                         PATTERN may not contain a comma, as the list is comma-separated
    number_match:FIELD   1.0 when the completion's last number equals record[FIELD] as a number, GSM8K style:
                         "The answer is 1,234." matches 1234 or "1,234"; signs and decimals count ("3-4" is 3, -4)

The built-ins are the usual verifiable checks (a final answer, a format), there so that the common case needs no
file. Several rewards are summed with weights, `reward_weights=1,0.5` (default 1.0 each). A function may return
None for a completion it does not apply to: as in TRL (nansum across functions) that term is left out of the sum,
but a completion that no function scores is an error.

Nothing is silent: a function that raises, returns something that is not a list of numbers, the wrong number of
values, or NaN/inf stops the run with a one-line RewardError naming it (`reward math.py:score returned 3 values for
4 completions`); a bad entry or weight is a one-line ValueError when parsed and loaded, before the run trains.

    specs = parse_reward_specs("math.py:score,number_match:answer")
    rewards = load_rewards(specs, parse_reward_weights("1,0.5", len(specs)))
    result = rewards(prompts, completions, completion_ids, {"answer": answers})
    result.total         # float32 (n,): the weighted sum, each completion's GRPO reward
    result.per_function  # {"score": ..., "number_match:answer": ...}: float32 (n,) each, NaN where None; metrics
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import importlib.util
import inspect
import itertools
import math
import numbers
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

BUILTINS = ("exact_match", "contains", "regex", "number_match")
BUILTIN_FORMS = "a built-in (exact_match:FIELD, contains:FIELD, regex:PATTERN, number_match:FIELD)"
CALL_KEYWORDS = ("prompts", "completions", "completion_ids")  # every call's keywords besides the record fields
RESERVED_FIELDS = frozenset({"prompt", *CALL_KEYWORDS})  # no record field may be named so
COMMA_NOTE = "a regex: PATTERN may not contain a comma, as reward= is a comma-separated list"
FLOAT32_MAX = float(np.finfo(np.float32).max)
# A number as written in a completion: an optional sign, then digits with commas only between groups of three
# (1,234,567; "1,2345" is 1 and 2345) or plain digits, an optional decimal part; or a bare decimal (.5).
NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")
_module_numbers = itertools.count()  # each imported reward file gets its own module name


class RewardError(ValueError):
    """A reward function misbehaved on a batch: it raised, or did not return one finite number (or None) per
    completion. The message is one line that starts `reward SPEC`, naming the function."""


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One entry of `reward=`: a built-in (`builtin` set, `argument` its FIELD or PATTERN) or a function in a
    Python file (`path` set, absolute; `argument` the function's name). `text` is the entry as written."""

    text: str
    argument: str
    builtin: str | None = None
    path: Path | None = None


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """One batch's rewards: `total` the weighted sum per completion, `per_function` each function's own values
    (NaN where it returned None), both float32 (n,)."""

    total: np.ndarray
    per_function: dict[str, np.ndarray]


def parse_reward_specs(text: str) -> tuple[RewardSpec, ...]:
    """`reward=`'s comma-separated entries, checked now (a file exists and ends in .py, a built-in is known, a
    pattern compiles) so that a typo fails before the run loads a model, in one line."""
    entries = [entry.strip() for entry in text.split(",")]
    if not any(entries):
        raise ValueError(f"reward= names no reward function: give FILE.py:FUNCTION or {BUILTIN_FORMS}")
    return tuple(
        _parse_spec(entry, after_regex=index > 0 and entries[index - 1].startswith("regex:"))
        for index, entry in enumerate(entries)
    )


def _parse_spec(entry: str, after_regex: bool) -> RewardSpec:
    """One entry. `after_regex`: the entry before it is a regex, so a stray piece is likelier a pattern's comma."""
    comma_note = f"; {COMMA_NOTE}" if after_regex else ""
    if not entry:
        raise ValueError(f"reward= has an empty entry{comma_note}")
    head, colon, argument = entry.partition(":")
    if head in BUILTINS:
        if not argument.strip():
            raise ValueError(f"reward= entry '{entry}' names no {'PATTERN' if head == 'regex' else 'FIELD'}")
        if head == "regex":
            try:
                re.compile(argument)
            except re.error as error:
                raise ValueError(
                    f"reward= entry '{entry}': the pattern does not compile ({error}); {COMMA_NOTE}"
                ) from None
            return RewardSpec(entry, argument, builtin=head)
        return RewardSpec(entry, argument.strip(), builtin=head)
    path_text, _, function = entry.rpartition(":")
    if not colon or not path_text.endswith(".py"):
        if not colon or ("/" not in head and "." not in head):
            hint = "".join(f" (did you mean {close}?)" for close in difflib.get_close_matches(head, BUILTINS, n=1))
            raise ValueError(
                f"reward= entry '{entry}' is neither FILE.py:FUNCTION nor {BUILTIN_FORMS}{hint}{comma_note}"
            )
        raise ValueError(f"reward= entry '{entry}': '{path_text}' is not a .py file (give FILE.py:FUNCTION)")
    if not function.isidentifier():
        raise ValueError(f"reward= entry '{entry}': '{function}' is not a function name (give FILE.py:FUNCTION)")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ValueError(f"reward= entry '{entry}': there is no file {path_text} (from {Path.cwd()})")
    return RewardSpec(entry, function, path=path.resolve())


def parse_reward_weights(text: str, count: int) -> tuple[float, ...]:
    """`reward_weights=`: one finite float per reward function, comma-separated; empty means 1.0 for each."""
    if not text.strip():
        return (1.0,) * count
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != count:
        raise ValueError(
            f"reward_weights={text} has {len(parts)} weights for {count} reward functions: give one per reward= entry"
        )
    for part in parts:
        try:
            if not math.isfinite(float(part)):
                raise ValueError
        except ValueError:
            raise ValueError(f"reward_weights={text}: '{part}' is not a finite number") from None
    return tuple(float(part) for part in parts)


@dataclasses.dataclass(frozen=True)
class _LoadedReward:
    """A reward function ready to call: the keywords it takes (None: any) and those it requires."""

    label: str  # the entry as written, for messages
    function: Callable[..., Any]
    keywords: frozenset[str] | None
    required: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Rewards:
    """The run's reward functions and weights: call it on a batch for each completion's weighted reward."""

    functions: tuple[_LoadedReward, ...]
    names: tuple[str, ...]  # one per function, for metrics: a built-in's entry, or FUNCTION's name
    weights: tuple[float, ...]

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        fields: Mapping[str, Sequence[Any]],
    ) -> RewardResult:
        """Scores n completions: `prompts` and each field's list hold one value per completion (a prompt repeated
        for each of its completions), `completion_ids` each completion's token ids."""
        count = len(completions)
        reserved = sorted(RESERVED_FIELDS & set(fields))
        if reserved:
            raise ValueError(f"rewards: no record field may be named {reserved[0]}: reward functions take that keyword")
        for what, values in [("prompts", prompts), ("completion_ids", completion_ids), *fields.items()]:
            if len(values) != count:
                raise ValueError(f"rewards: {what} has {len(values)} values for {count} completions")
        keywords = {
            "prompts": list(prompts),
            "completions": list(completions),
            "completion_ids": [[int(token) for token in ids] for ids in completion_ids],
            **{name: list(values) for name, values in fields.items()},
        }
        scores = np.stack([_scores(reward, keywords, count) for reward in self.functions])  # (functions, n)
        unscored = np.flatnonzero(np.isnan(scores).all(axis=0))
        if unscored.size:
            labels = ", ".join(reward.label for reward in self.functions)
            raise RewardError(
                f"reward {labels} returned None for completion {unscored[0]} ({unscored.size} of {count} in all): "
                "a completion needs a reward from at least one function"
            )
        total = np.nansum(scores * np.asarray(self.weights)[:, None], axis=0)
        if not np.all(np.abs(total) <= FLOAT32_MAX):
            raise RewardError(f"reward total overflows float32 with reward_weights {self.weights}")
        per_function = {name: row.astype(np.float32) for name, row in zip(self.names, scores)}
        return RewardResult(total.astype(np.float32), per_function)


def load_rewards(specs: Sequence[RewardSpec], weights: Sequence[float]) -> Rewards:
    """The reward functions of `specs` (from parse_reward_specs), each file imported once; a file that fails to
    import, or lacks the function, is a one-line ValueError naming both."""
    if len(weights) != len(specs):
        raise ValueError(f"rewards: {len(weights)} weights for {len(specs)} reward functions")
    modules: dict[Path | None, ModuleType] = {}
    loaded = []
    for spec in specs:
        if spec.builtin is not None:
            loaded.append(_LoadedReward(spec.text, _builtin_reward(spec), None, frozenset()))
            continue
        if spec.path not in modules:
            modules[spec.path] = _import_file(spec)
        loaded.append(_user_reward(spec, modules[spec.path]))
    return Rewards(tuple(loaded), _metric_names(specs), tuple(weights))


def _metric_names(specs: Sequence[RewardSpec]) -> tuple[str, ...]:
    """A built-in's entry, or FUNCTION's name (the whole entry where two files define functions of the same name,
    so that no function's metrics hide another's)."""
    names = [spec.text if spec.builtin is not None else spec.argument for spec in specs]
    counts = collections.Counter(names)
    unique = tuple(spec.text if counts[name] > 1 else name for spec, name in zip(specs, names))
    repeated = [name for name, seen in collections.Counter(unique).items() if seen > 1]
    if repeated:
        raise ValueError(f"reward= names {repeated[0]} twice")
    return unique


def _import_file(spec: RewardSpec) -> ModuleType:
    """Imports the file by path under a module name of its own (registered in sys.modules, as an import would,
    so that dataclasses and pickling inside it work); any error in it becomes one line naming the entry."""
    stem = re.sub(r"\W", "_", spec.path.stem)
    module_name = f"llama_jax_reward_{next(_module_numbers)}_{stem}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, spec.path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError("Python cannot load it as a module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(module_name, None)
        raise ValueError(f"reward {spec.text}: importing {spec.path} failed: {_one_line(error)}") from error
    return module


def _user_reward(spec: RewardSpec, module: ModuleType) -> _LoadedReward:
    """FUNCTION from the imported file, with the keywords its signature takes."""
    if not hasattr(module, spec.argument):
        defined = ", ".join(sorted(name for name, value in vars(module).items() if inspect.isfunction(value)))
        raise ValueError(
            f"reward {spec.text}: the file defines no {spec.argument} (its functions: {defined or 'none'})"
        )
    function = getattr(module, spec.argument)
    if not callable(function):
        raise ValueError(f"reward {spec.text}: '{spec.argument}' is a {type(function).__name__}, not a function")
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a callable whose signature Python cannot read: give it every keyword
        return _LoadedReward(spec.text, function, None, frozenset())
    if any(p.kind is p.POSITIONAL_ONLY and p.default is p.empty for p in parameters):
        raise ValueError(f"reward {spec.text} has positional-only parameters: rewards are called with keywords, as TRL")
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    keywords = None if any(p.kind is p.VAR_KEYWORD for p in parameters) else frozenset(p.name for p in named)
    return _LoadedReward(spec.text, function, keywords, frozenset(p.name for p in named if p.default is p.empty))


def _scores(reward: _LoadedReward, keywords: Mapping[str, list], count: int) -> np.ndarray:
    """Calls one function with the keywords it takes (each list copied, so one function's changes reach no other)
    and checks what it returns: float64 (n,), NaN where it returned None."""
    missing = sorted(reward.required - keywords.keys())
    if missing:
        raise RewardError(f"reward {reward.label} takes {missing[0]}, {_not_a_field(missing[0], keywords)}")
    passed = {
        name: list(values) for name, values in keywords.items() if reward.keywords is None or name in reward.keywords
    }
    try:
        returned = reward.function(**passed)
    except RewardError:
        raise
    except Exception as error:
        raise RewardError(f"reward {reward.label} raised {_one_line(error)}") from error
    return _checked_values(reward.label, returned, count)


def _checked_values(label: str, returned: Any, count: int) -> np.ndarray:
    """`returned` as float64 (n,) if it is one real number or None per completion, each finite within float32."""
    if isinstance(returned, (str, bytes)) or not isinstance(returned, (Sequence, np.ndarray)):
        raise RewardError(f"reward {label} returned a {type(returned).__name__}, not a list of numbers")
    if isinstance(returned, np.ndarray) and returned.ndim != 1:
        raise RewardError(f"reward {label} returned an array of shape {returned.shape}, not a list of numbers")
    if len(returned) != count:
        raise RewardError(f"reward {label} returned {len(returned)} values for {count} completions")
    values = np.full(count, np.nan)
    for index, value in enumerate(returned):
        if value is None:
            continue
        if not isinstance(value, (numbers.Real, np.bool_)):
            raise RewardError(
                f"reward {label} returned {_short_repr(value)} for completion {index}, not a number or None"
            )
        number = float(value)
        if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
            beyond = "" if not math.isfinite(number) else ", beyond float32"
            raise RewardError(f"reward {label} returned {number} for completion {index}{beyond}")
        values[index] = number
    return values


def _builtin_reward(spec: RewardSpec) -> Callable[..., list[float]]:
    """A built-in as a TRL-style function of the completions and the record fields."""
    if spec.builtin == "regex":
        pattern = re.compile(spec.argument)

        def regex(completions: list[str], **_: Any) -> list[float]:
            return [1.0 if pattern.search(completion) else 0.0 for completion in completions]

        return regex

    def builtin(completions: list[str], **fields: Any) -> list[float]:
        values = _field_values(spec, fields)
        return [_field_check(spec, index, c, value) for index, (c, value) in enumerate(zip(completions, values))]

    return builtin


def _field_values(spec: RewardSpec, fields: Mapping[str, list]) -> list:
    """The FIELD a built-in compares with, one value per completion; a missing field or value is an error."""
    if spec.argument not in fields:
        raise RewardError(f"reward {spec.text} compares with {spec.argument}, {_not_a_field(spec.argument, fields)}")
    values = fields[spec.argument]
    missing = [index for index, value in enumerate(values) if value is None]
    if missing:
        raise RewardError(f"reward {spec.text}: the record of completion {missing[0]} has no {spec.argument}")
    return values


def _field_check(spec: RewardSpec, index: int, completion: str, value: Any) -> float:
    """exact_match, contains or number_match: one completion against its record's FIELD value."""
    if spec.builtin == "exact_match":
        return float(completion.strip() == str(value).strip())
    if spec.builtin == "contains":
        if str(value) == "":  # would match every completion
            raise RewardError(f"reward {spec.text}: the record of completion {index} has an empty {spec.argument}")
        return float(str(value) in completion)
    return float(last_number(completion) == _field_number(spec, index, value))


def last_number(text: str) -> float | None:
    """The last number written in `text` ("The answer is -1,234.5." → -1234.5), or None when it has none."""
    numbers_found = NUMBER.findall(text)
    return float(numbers_found[-1].replace(",", "")) if numbers_found else None


def _field_number(spec: RewardSpec, index: int, value: Any) -> float:
    """A field's value as a number: a number, or a string that is one (thousands commas allowed). Numbers are read
    from their text too, so a float32 0.1 is the 0.1 a completion writes, not 0.10000000149."""
    try:
        number = float(str(value).strip().replace(",", ""))
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise RewardError(
            f"reward {spec.text}: the {spec.argument} of completion {index} is {_short_repr(value)}, not a number"
        )
    return number


def _not_a_field(name: str, keywords: Mapping[str, Any]) -> str:
    """Says that `name` is no field of the records, and which fields they have."""
    fields = sorted(set(keywords) - set(CALL_KEYWORDS))
    return f"which is not a field of the records (their fields: {', '.join(fields) or 'none besides prompt'})"


def _one_line(error: BaseException) -> str:
    """`Type: message` with the message's whitespace, newlines included, collapsed to single spaces."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
