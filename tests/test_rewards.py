"""GRPO's rewards (`llama_jax/train/rewards.py`): the built-ins on hand-made completions, user files called the way
TRL's GRPOTrainer calls them (every field as a keyword list, completion_ids, only the keywords a function names
when it has no **kwargs), weights and None in the sum, and every error as one line that names the function."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from llama_jax.train.rewards import (
    RewardError,
    last_number,
    load_rewards,
    parse_reward_specs,
    parse_reward_weights,
)

PROMPTS = ["What is 2+2?", "What is 2+2?", "Spell cat.", "Spell cat."]
IDS = [[5, 6], [7], [8, 9, 10], []]


def rewards_for(text: str, weights: str = ""):
    specs = parse_reward_specs(text)
    return load_rewards(specs, parse_reward_weights(weights, len(specs)))


def score(text: str, completions: list[str], weights: str = "", **fields):
    """Each completion's total reward under `text`'s rewards, with one prompt and ids per completion."""
    count = len(completions)
    return rewards_for(text, weights)(PROMPTS[:count], completions, IDS[:count], fields)


def write(folder, name: str, source: str) -> str:
    """Writes a reward file into `folder` (no __init__.py: not a package) and returns its path."""
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def one_line_error(error_type, call, *args, **kwargs) -> str:
    with pytest.raises(error_type) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --- the built-ins ----------------------------------------------------------------------------------------


def test_exact_match_compares_the_stripped_completion_with_the_field_as_a_string():
    result = score("exact_match:answer", [" 4\n", "four", "cat", "4"], answer=["4 ", "4", "cat", 4])
    np.testing.assert_array_equal(result.total, [1.0, 0.0, 1.0, 1.0])
    assert result.total.dtype == np.float32
    assert list(result.per_function) == ["exact_match:answer"]


def test_contains_finds_the_field_anywhere_in_the_completion():
    result = score("contains:answer", ["so it is 4.", "five", "c-a-t: cat", "CAT"], answer=[4, "4", "cat", "cat"])
    np.testing.assert_array_equal(result.total, [1.0, 0.0, 1.0, 0.0])


def test_regex_searches_the_completion_with_inline_flags():
    completions = ["<think>hm</think> 4", "4", "<THINK>", "x <think>"]
    np.testing.assert_array_equal(score("regex:^<think>", completions).total, [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(score("regex:(?i)<think>", completions).total, [1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(score("regex: \\d$", completions).total, [1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("The answer is 1,234.", "1234", 1.0),
        ("The answer is 1234", "1,234", 1.0),
        ("So 3 + 4 = 7", 7, 1.0),
        ("First 7, then 8", "7", 0.0),  # the last number counts
        ("It drops to -12 degrees", "-12", 1.0),
        ("It drops to 12 degrees", "-12", 0.0),
        ("Each costs $3.50.", "3.5", 1.0),
        ("Each costs 3.5", 3.50, 1.0),
        ("about .5 of it", "0.5", 1.0),
        ("1,234,567 grains", 1234567, 1.0),
        ("I cannot tell.", "0", 0.0),  # no number at all
        ("", "0", 0.0),
    ],
)
def test_number_match_compares_the_last_number_gsm8k_style(completion, answer, expected):
    assert score("number_match:answer", [completion], answer=[answer]).total.tolist() == [expected]


def test_last_number_reads_signs_decimals_and_thousands_commas():
    assert last_number("The answer is 1,234.") == 1234.0
    assert last_number("from -3 to +2.25") == 2.25
    assert last_number("x = -0.75") == -0.75
    assert last_number("lists 1,2,3") == 3.0  # commas not between groups of three separate numbers
    assert last_number("1,2345") == 2345.0
    assert last_number("no digits here") is None


# --- user files, called as TRL calls them -----------------------------------------------------------------


def test_a_trl_style_function_gets_every_field_and_the_completion_ids(tmp_path):
    path = write(
        tmp_path,
        "math_reward.py",
        """
        import dataclasses
        seen = []

        @dataclasses.dataclass  # needs its module in sys.modules
        class Call:
            keywords: dict

        def correct(prompts, completions, answer, **kwargs):
            seen.append(Call(dict(prompts=prompts, completions=completions, answer=answer, **kwargs)))
            return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]
        """,
    )
    rewards = rewards_for(f"{path}:correct")
    assert rewards.names == ("correct",)
    result = rewards(
        PROMPTS, ["4", "5", "cat", "dog"], IDS, {"answer": ["4", "4", "cat", "cat"], "level": [1, 1, 2, 2]}
    )
    np.testing.assert_array_equal(result.total, [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(result.per_function["correct"], [1.0, 0.0, 1.0, 0.0])
    (call,) = rewards.functions[0].function.__globals__["seen"]
    assert call.keywords == {
        "prompts": PROMPTS,
        "completions": ["4", "5", "cat", "dog"],
        "answer": ["4", "4", "cat", "cat"],
        "level": [1, 1, 2, 2],
        "completion_ids": IDS,
    }


def test_a_function_without_kwargs_gets_only_the_keywords_it_names(tmp_path):
    path = write(
        tmp_path,
        "strict.py",
        """
        def length(completions, answer, scale=1.0):  # extra keywords would be a TypeError
            return [scale * len(c) for c in completions]

        def needs_solution(completions, solution):
            return [0.0] * len(completions)
        """,
    )
    result = score(f"{path}:length", ["ab", "abc"], answer=["x", "y"], level=[1, 2])
    np.testing.assert_array_equal(result.total, [2.0, 3.0])
    message = one_line_error(RewardError, score, f"{path}:needs_solution", ["ab"], answer=["x"])
    assert message.startswith(f"reward {path}:needs_solution takes solution")
    assert "their fields: answer" in message


def test_weights_sum_the_functions_and_none_is_left_out(tmp_path):
    path = write(
        tmp_path,
        "fmt.py",
        """
        def short(completions, **kwargs):
            return [None if c == "cat" else float(len(c) < 3) for c in completions]
        """,
    )
    result = score(
        f"exact_match:answer,{path}:short", ["4", "four", "cat", "no"], "1,0.5", answer=["4", "4", "cat", "x"]
    )
    np.testing.assert_array_equal(result.per_function["exact_match:answer"], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(result.per_function["short"], [1.0, 0.0, np.nan, 1.0])
    np.testing.assert_array_equal(result.total, [1.5, 0.0, 1.0, 0.5])
    np.testing.assert_array_equal(score(f"exact_match:answer,{path}:short", ["4"], answer=["4"]).total, [2.0])


def test_one_file_is_imported_once_and_equal_names_are_told_apart(tmp_path):
    first = write(
        tmp_path,
        "a.py",
        """
        imports = []
        imports.append(1)

        def score(completions, **kwargs):
            return [1] * len(completions)

        def other(completions, **kwargs):
            return [2] * len(completions)
        """,
    )
    (tmp_path / "b").mkdir()
    second = write(tmp_path / "b", "a.py", "def score(completions, **kw):\n    return [3] * len(completions)\n")
    rewards = rewards_for(f"{first}:score,{first}:other,{second}:score")
    assert rewards.names == (f"{first}:score", "other", f"{second}:score")
    assert rewards.functions[0].function.__globals__ is rewards.functions[1].function.__globals__
    assert rewards.functions[0].function.__globals__["imports"] == [1]
    np.testing.assert_array_equal(rewards(["p"], ["c"], [[1]], {}).total, [6.0])
    assert "twice" in one_line_error(ValueError, rewards_for, f"{first}:score,{first}:score")


# --- errors: one line each, naming the function -----------------------------------------------------------

BAD_FUNCTIONS = """
def raises(completions, **kwargs):
    return [1 / 0 for c in completions]

def multiline(completions, **kwargs):
    raise RuntimeError("first line\\nsecond line")

def short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)

def scalar(completions, **kwargs):
    return 1.0

def text(completions, **kwargs):
    return "1.0"

def strings(completions, **kwargs):
    return ["1"] * len(completions)

def nan(completions, **kwargs):
    return [0.0, float("nan"), 0.0, 0.0]

def inf(completions, **kwargs):
    return [0.0, 0.0, float("-inf"), 0.0]

def huge(completions, **kwargs):
    return [1e39] * len(completions)

def matrix(completions, **kwargs):
    import numpy
    return numpy.zeros((len(completions), 1))

def nothing(completions, **kwargs):
    return [None] * len(completions)
"""


@pytest.mark.parametrize(
    "function, expected",
    [
        ("raises", "raised ZeroDivisionError: division by zero"),
        ("multiline", "raised RuntimeError: first line second line"),
        ("short", "returned 3 values for 4 completions"),
        ("scalar", "returned a float, not a list of numbers"),
        ("text", "returned a str, not a list of numbers"),
        ("strings", "returned '1' for completion 0, not a number or None"),
        ("nan", "returned nan for completion 1"),
        ("inf", "returned -inf for completion 2"),
        ("huge", "returned 1e+39 for completion 0, beyond float32"),
        ("matrix", "returned an array of shape (4, 1), not a list of numbers"),
        (
            "nothing",
            "returned None for completion 0 (4 of 4 in all): a completion needs a reward from at least one function",
        ),
    ],
)
def test_a_misbehaving_function_is_one_line_naming_it(tmp_path, monkeypatch, function, expected):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "math.py", BAD_FUNCTIONS)
    message = one_line_error(RewardError, score, f"math.py:{function}", ["1", "2", "3", "4"])
    assert message == f"reward math.py:{function} {expected}"


def test_builtins_need_their_field_and_a_value_in_every_record():
    message = one_line_error(RewardError, score, "exact_match:answer", ["4"], solution=["4"])
    assert message == "reward exact_match:answer compares with answer, which is not a field of the records " + (
        "(their fields: solution)"
    )
    assert "has no answer" in one_line_error(RewardError, score, "contains:answer", ["4", "5"], answer=["4", None])
    assert "empty answer" in one_line_error(RewardError, score, "contains:answer", ["4"], answer=[""])
    message = one_line_error(RewardError, score, "number_match:answer", ["4"], answer=["#### 4"])
    assert message == "reward number_match:answer: the answer of completion 0 is '#### 4', not a number"


def test_a_batch_of_mismatched_lengths_or_a_reserved_field_is_refused():
    rewards = rewards_for("regex:x")
    assert "answer has 1 values for 2" in one_line_error(
        ValueError, rewards, PROMPTS[:2], ["x", "y"], IDS[:2], {"answer": [1]}
    )
    assert "prompts has 4 values" in one_line_error(ValueError, rewards, PROMPTS, ["x", "y"], IDS[:2], {})
    assert "completions" in one_line_error(ValueError, rewards, PROMPTS[:1], ["x"], IDS[:1], {"completions": ["x"]})


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "names no reward function"),
        ("exact_match:answer,,contains:answer", "has an empty entry"),
        ("exactmatch:answer", "is neither FILE.py:FUNCTION nor a built-in (exact_match:FIELD"),
        ("exactmatch:answer", "(did you mean exact_match?)"),
        ("answer", "is neither FILE.py:FUNCTION"),
        ("exact_match:", "names no FIELD"),
        ("regex:", "names no PATTERN"),
        ("regex:(unclosed", "the pattern does not compile (missing ), unterminated subpattern"),
        ("regex:(a|b,c)", "may not contain a comma"),
        ("regex:a{1,3}", "may not contain a comma"),
        ("rewards/score.txt:f", "'rewards/score.txt' is not a .py file"),
        ("missing.py:score", "there is no file missing.py"),
    ],
)
def test_a_bad_reward_entry_is_one_line(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in one_line_error(ValueError, parse_reward_specs, text)


def test_a_file_that_fails_to_import_or_lacks_the_function_names_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "broken.py", "import not_a_module_anywhere\n")
    write(tmp_path, "syntax.py", "def f(:\n")
    write(tmp_path, "ok.py", "threshold = 3\ndef score(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    message = one_line_error(ValueError, rewards_for, "broken.py:score")
    assert message.startswith("reward broken.py:score: importing ") and message.endswith(
        "failed: ModuleNotFoundError: No module named 'not_a_module_anywhere'"
    )
    assert "SyntaxError" in one_line_error(ValueError, rewards_for, "syntax.py:f")
    message = one_line_error(ValueError, rewards_for, "ok.py:scores")
    assert message == "reward ok.py:scores: the file defines no scores (its functions: score)"
    message = one_line_error(ValueError, rewards_for, "ok.py:threshold")
    assert message == "reward ok.py:threshold: 'threshold' is a int, not a function"


@pytest.mark.parametrize(
    "text, count, expected",
    [
        ("1,0.5", 1, "has 2 weights for 1 reward functions"),
        ("1", 2, "has 1 weights for 2 reward functions"),
        ("1,x", 2, "'x' is not a finite number"),
        ("1,inf", 2, "'inf' is not a finite number"),
        ("nan", 1, "'nan' is not a finite number"),
        ("1,", 2, "'' is not a finite number"),
    ],
)
def test_bad_reward_weights_are_one_line(text, count, expected):
    assert expected in one_line_error(ValueError, parse_reward_weights, text, count)


def test_reward_weights_default_to_one_each():
    assert parse_reward_weights("", 3) == (1.0, 1.0, 1.0)
    assert parse_reward_weights(" 2, -0.5 ", 2) == (2.0, -0.5)
