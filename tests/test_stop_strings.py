"""Stop strings cut the stream exactly, whatever the piece boundaries."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.core.stop_strings import StopStringFilter


def feed(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    stop_filter = StopStringFilter(stops)
    emitted = []
    for piece in pieces:
        emitted.append(stop_filter.push(piece))
        if stop_filter.stopped:
            return emitted, True
    return [*emitted, stop_filter.flush()], False


def test_text_that_may_start_a_stop_string_is_held_back():
    stop_filter = StopStringFilter(["</answer>"])
    assert stop_filter.push("The result </") == "The result "
    assert stop_filter.push("ans") == ""
    assert stop_filter.push("wer> more") == ""
    assert stop_filter.stopped


def test_a_false_start_is_released():
    stop_filter = StopStringFilter(["STOP"])
    assert stop_filter.push("ST") == ""
    assert stop_filter.push("ART") == "START"
    assert stop_filter.push("S") == ""
    assert stop_filter.flush() == "S"


def test_the_earliest_of_several_stop_strings_wins():
    emitted, stopped = feed(["world", "lo w"], ["hel", "lo wor", "ld"])
    assert stopped and "".join(emitted) == "hel"


def test_empty_stop_strings_are_ignored():
    emitted, stopped = feed([""], ["abc"])
    assert not stopped and "".join(emitted) == "abc"


@given(
    text=st.text(alphabet="ab你x", max_size=30),
    stop=st.text(alphabet="ab你", min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_output_is_the_text_before_the_first_stop_string(text, stop, cuts):
    bounds = sorted({0, len(text), *(min(cut, len(text)) for cut in cuts)})
    pieces = [text[a:b] for a, b in pairwise(bounds)]

    emitted, stopped = feed([stop], pieces)

    assert stopped == (stop in text)
    assert "".join(emitted) == (text[: text.index(stop)] if stop in text else text)


def test_every_proper_start_of_a_stop_string_is_held_back():
    stop = "abcdef"
    for length in range(1, len(stop)):  # each start, from one character to all but the last
        stop_filter = StopStringFilter([stop])
        assert stop_filter.push("xy" + stop[:length]) == "xy", length
        assert stop_filter.push(stop[length:] + " tail") == ""
        assert stop_filter.stopped


def test_nothing_is_left_to_flush_after_a_stop_and_pushing_more_is_a_bug():
    stop_filter = StopStringFilter(["END"])
    assert stop_filter.push("done END and more") == "done "
    assert stop_filter.flush() == ""
    with pytest.raises(RuntimeError, match=r"^push after the stop string was found$"):
        stop_filter.push("more")
    flushed = StopStringFilter(["END"])
    assert flushed.push("almost EN") == "almost "
    assert flushed.flush() == "EN"
    assert flushed.flush() == ""  # flushed once: nothing held back any more
