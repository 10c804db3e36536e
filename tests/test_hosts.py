"""A job process's standard error as its host's command passes it on (`commands/hosts.py`): gloo's connection
notices are dropped however two threads interleave them — the three mixes below are what CPU jobs printed — and
everything else comes through in order; C++ log lines are held until the child ends."""

import os
import threading

import pytest

from llama_jax.commands.hosts import _pass_through

NOTICE = b"[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
MIXES = [
    NOTICE,
    b"[Gloo] Rank 1[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
    b" is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n",
    b"[Gloo] Rank [Gloo] Rank 23 is connected to  is connected to 33 peer ranks.  peer ranks. Expected number of "
    b"connected peer ranks is : Expected number of connected peer ranks is : 33\n\n",
]


def passed_on(chunks: list[bytes], capfd) -> tuple[bytes | None, str]:
    read, write = os.pipe()

    def writer():
        for chunk in chunks:
            os.write(write, chunk)
        os.close(write)

    thread = threading.Thread(target=writer)
    thread.start()
    with os.fdopen(read, "rb", buffering=0) as stream:
        fatal = _pass_through(stream)
    thread.join()
    return fatal, capfd.readouterr().err


@pytest.mark.parametrize("mix", MIXES, ids=["one", "two-lines", "characters"])
def test_gloo_notices_are_dropped_however_they_are_mixed(mix, capfd):
    fatal, shown = passed_on([b"loading the model\n", mix, b"6 completions written\n"], capfd)
    assert fatal is None
    assert shown == "loading the model\n6 completions written\n"


def test_a_notice_split_across_reads_is_dropped_whole(capfd):
    """The child may write a notice in two pieces with a pause between them; its end ("1\\n") is not shown."""
    fatal, shown = passed_on([NOTICE[:-3], NOTICE[-3:], b"done\n"], capfd)
    assert shown == "done\n"


def test_log_lines_and_errors_wait_for_the_end_and_the_rest_comes_in_order(capfd):
    log = b"W1206 10:00:00.000000   123 client.cc:45] a warning from C++\n"
    fatal, shown = passed_on([b"first\n", log, b"error: something\n", b"last\n"], capfd)
    assert fatal is None
    assert shown == "first\nlast\n" + log.decode() + "error: something\n"
