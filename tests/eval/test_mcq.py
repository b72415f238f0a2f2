"""vlp eval --task mcq on made clips and Video-MME / MVBench question rows: option formats (list, dict, MVBench
candidates, Video-MME's per-video layout), the choice = the highest length-normalised log-likelihood (checked by
scoring the options directly), chance, per-type rows, unanswerable and unparseable listings."""

from __future__ import annotations

import json

import pytest

from media_makers import encode, frames_of
from vlp.cli import main
from vlp.eval.mcq import answer_letter, flatten, mcq_row, parse_options


def test_options_answers_and_layouts():
    assert parse_options(["A. red", "B) blue", "(C) green"]) == (["A", "B", "C"], ["red", "blue", "green"])
    assert parse_options({"A": "red", "B": "blue"}) == (["A", "B"], ["red", "blue"])
    assert parse_options(["left", "right"]) == (["A", "B"], ["left", "right"])  # MVBench candidates: lettered
    assert parse_options(["A. x", "A. y"]) == (["A", "B"], ["A. x", "A. y"])  # repeated letters: by position
    assert parse_options("A. red") == ([], [])
    letters, texts = ["A", "B"], ["left", "right"]
    assert [answer_letter(a, letters, texts) for a in ("B", "(b)", "B.", "right", "Right", "B. right", "C", "up")] \
        == ["B", "B", "B", "B", "B", "B", None, None]
    nested = [{"video_id": "001", "videoID": "abc", "duration": "short",
               "questions": [{"question_id": "001-1", "task_type": "Counting", "question": "How many?",
                              "options": ["A. 1", "B. 2"], "answer": "B"}]}]
    row = mcq_row(0, flatten(nested)[0])
    assert (row.qid, row.video, row.answer, row.groups) == ("001-1", "abc", "B",
                                                            ["all", "task_type=Counting", "duration=short"])
    assert mcq_row(1, {"video": "v.mp4", "question": "q", "candidates": ["x"], "answer": "x"}).problem == \
        "options/candidates is not a list or dict of 2 or more"
    assert mcq_row(2, "just text").problem == "the row is not a JSON object"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    d = tmp_path_factory.mktemp("mcq")
    media = d / "media"
    media.mkdir()
    (media / "abc.mp4").write_bytes(encode(frames_of(6)))
    (media / "clip.webm").write_bytes(encode(frames_of(6, direction="up"), fmt="webm", codec="libvpx"))
    rows = [
        {"video_id": "001", "videoID": "abc", "duration": "short", "task_type": "Counting", "question_id": "001-1",
         "question": "What color is the shape?", "options": ["A. red", "B. blue", "C. green", "D. yellow"],
         "answer": "A"},  # Video-MME
        {"video": "clip.webm", "question": "Which way does it move?", "candidates": ["left", "up", "down"],
         "answer": "up"},  # MVBench
        {"video": "clip.webm", "question": "Is it moving?", "options": {"A": "yes", "B": "no"}, "answer": "A",
         "task_type": "Counting"},
        {"video_id": "002", "videoID": "gone", "duration": "short", "question_id": "002-1",
         "question": "What is it?", "options": ["A. x", "B. y"], "answer": "B"},  # no such video
        {"video": "clip.webm", "question": "Which?", "candidates": ["a", "b"], "answer": "c"},  # answer not an option
    ]
    (d / "questions.json").write_text(json.dumps(rows))
    return d


def test_mcq_picks_the_highest_mean_log_likelihood(export, bench, tmp_path, capsys):
    from vlp.chat import ChatSession
    from vlp.eval.mcq import MCQ, option_scores
    from vlp.eval.synthetic import score_answers

    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["eval", "--task", "mcq", "--model", str(export), "--questions", str(bench / "questions.json"),
               "--media-root", str(bench / "media"), "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    rep = json.loads((out / "results.json").read_text())
    rows = {r["group"]: r for r in rep["rows"]}
    assert list(rows) == ["all", "task_type=Counting", "duration=short"]
    assert {k: rows["all"][k] for k in ("n", "scored", "unanswerable", "unparseable")} == \
        {"n": 5, "scored": 3, "unanswerable": 1, "unparseable": 1}
    assert rows["all"]["chance"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 2) / 3)
    assert rows["task_type=Counting"]["chance"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert rows["duration=short"] == {**rows["duration=short"], "n": 2, "scored": 1, "unanswerable": 1}
    assert [u["id"] for u in rep["unanswerable"]] == ["002-1"] and "gone" in rep["unanswerable"][0]["reason"]
    assert rep["unparseable"][0]["id"] == "#4" and "'c' is not one of the options" in rep["unparseable"][0]["reason"]
    assert (out / "results.md").read_text() in text
    recs = json.loads((out / "predictions.json").read_text())
    assert [(r["answer"], r["options"]) for r in recs] == [
        ("A", ["A. red", "B. blue", "C. green", "D. yellow"]), ("B", ["A. left", "B. up", "C. down"]),
        ("A", ["A. yes", "B. no"])]
    assert rows["all"]["correct"] == sum(r["choice"] == r["answer"] for r in recs)
    s = ChatSession(str(export))  # score the first question's options directly
    item = s.encode(str(bench / "media" / "abc.mp4"))
    q = MCQ("001-1", "abc", "What color is the shape?", ["A", "B", "C", "D"], ["red", "blue", "green", "yellow"])
    placed, _ = s.place(q.prompt(), [item])
    sums = score_answers(s.model, s.tok, s.template, placed, q.answers(), [item.feats], "frames", [item.num_frames])
    assert sums == pytest.approx(recs[0]["sum_logprob"], abs=1e-4)
    assert option_scores(s, q.prompt(), item, q.answers())[1] == recs[0]["tokens"]
    mean = [x / n for x, n in zip(sums, recs[0]["tokens"])]  # length-normalised: mean log-prob per answer token
    assert recs[0]["mean_logprob"] == pytest.approx(mean, abs=1e-4)
    assert recs[0]["choice"] == "ABCD"[max(range(4), key=mean.__getitem__)]
    assert len(set(recs[0]["tokens"])) > 1  # options of different lengths: the normalisation matters here
