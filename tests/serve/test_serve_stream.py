"""Streamed answer text: incremental detokenising and stop strings (vlp.serve.stream), without a model."""

from __future__ import annotations

import pytest

from vlp.serve.stream import AnswerText, StopCutter, TextStream


def feed_all(stops, pieces):
    c = StopCutter(stops)
    out = [c.feed(p) for p in pieces]
    return out, c.flush(), c.stopped


def test_no_stops_passes_text_through():
    assert feed_all([], ["a", "bc", ""]) == (["a", "bc", ""], "", False)


def test_stop_string_cuts_and_ends():
    assert feed_all(["STOP"], ["Hello ", "wor", "ldSTOPmore", "x"]) == (["Hello ", "wor", "ld", ""], "", True)


def test_stop_split_over_pieces_is_held_back_then_cut():
    out, rest, stopped = feed_all(["</s>"], ["ab<", "/", "s>", "tail"])
    assert out == ["ab", "", "", ""] and stopped and rest == ""


def test_held_text_is_released_when_it_is_not_a_stop():
    out, rest, stopped = feed_all(["\n\n"], ["a\n", "b", "c\n"])
    assert out == ["a", "\nb", "c"] and rest == "\n" and not stopped
    assert "".join(out) + rest == "a\nbc\n"


def test_earliest_of_several_stops_wins():
    assert feed_all(["xyz", "b"], ["axyb"]) == (["axy"], "", True)
    assert feed_all(["bc", "abcd"], ["a", "bcd"]) == (["", ""], "", True)  # "a" held: it may start "abcd"


@pytest.mark.parametrize("text", ["hello world. and more", "no stop here", ".", "ab..cd"])
@pytest.mark.parametrize("split", [1, 2, 5])
def test_any_split_gives_the_text_cut_at_the_first_stop(text, split):
    pieces = [text[i:i + split] for i in range(0, len(text), split)]
    out, rest, stopped = feed_all([". "], pieces)
    want = text.split(". ")[0]
    assert "".join(out) + rest == want and stopped == (". " in text)


def test_text_stream_decodes_the_whole_answer_and_holds_incomplete_characters():
    # a toy tokenizer: ids are bytes; an incomplete UTF-8 sequence decodes to U+FFFD, as real tokenizers do
    dec = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    t = TextStream(dec)
    pieces = [t.add(b) for b in "hé!".encode()]
    assert pieces == ["h", "", "é", "!"] and t.finish() == ""
    t = TextStream(dec)
    assert [t.add(b) for b in b"a\xc3"] == ["a", ""] and t.finish() == "\ufffd"  # cut mid-character: shown at the end


def test_answer_text_finish_reasons():
    dec = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    a = AnswerText(dec, [], max_tokens=3)
    ds = [a.token(ord(c)) for c in "abc"] + [a.end()]
    assert "".join(d.text for d in ds) == "abc" and ds[-1].finish == "length" and ds[-1].completion_tokens == 3
    a = AnswerText(dec, [], max_tokens=5)  # EOS before max_tokens
    ds = [a.token(ord(c)) for c in "ab"] + [a.end()]
    assert ds[-1].finish == "stop" and ds[-1].completion_tokens == 2
    a = AnswerText(dec, ["c"], max_tokens=3)  # a stop string on the last allowed token is still "stop"
    ds = [a.token(ord(c)) for c in "abc"]
    assert "".join(d.text for d in ds) == "ab" and ds[-1].finish == "stop" and ds[-1].completion_tokens == 3
    a = AnswerText(dec, ["zz"], max_tokens=9)  # held text is released at the end
    ds = [a.token(ord(c)) for c in "az"] + [a.end()]
    assert [d.text for d in ds] == ["a", "", "z"] and ds[-1].finish == "stop"
