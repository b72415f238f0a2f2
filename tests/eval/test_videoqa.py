"""vlp eval --task videoqa on made clips and question files in the ActivityNet-QA and MSRVTT-QA formats: the
predictions file (Video-ChatGPT's fields), counts, unanswerable/unparseable listings, per-type rows, the exact-match
rule, and answers equal to vlp chat's (same decoding, no state between questions)."""

from __future__ import annotations

import json

import pytest

from media_makers import encode, frames_of
from vlp.cli import main
from vlp.eval.videoqa import exact_match, normalize_answer


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """media/: v_abc.mp4 (ActivityNet's v_ prefix), video7.webm (MSRVTT's name), bad.mp4 (not a video); the
    question files of both formats."""
    d = tmp_path_factory.mktemp("videoqa")
    media = d / "media"
    media.mkdir()
    (media / "v_abc.mp4").write_bytes(encode(frames_of(6)))
    (media / "video7.webm").write_bytes(encode(frames_of(6, color="blue"), fmt="webm", codec="libvpx"))
    (media / "bad.mp4").write_bytes(b"not a video at all")
    q = [{"video_name": "abc", "question": "what color is the shape", "question_id": "q1"},
         {"video_name": "abc", "question": "what shape is shown", "question_id": "q2"},
         {"video_name": "gone", "question": "what is it", "question_id": "q3"},
         {"video_name": "bad", "question": "what is it", "question_id": "q4"},
         {"video_name": "bad", "question": "and now", "question_id": "q6"},  # the same bad video again
         {"video_name": "abc", "question": "is it moving", "question_id": "q5"}]
    a = [{"answer": "red", "type": 4, "question_id": "q1"}, {"answer": "circle", "type": 5, "question_id": "q2"},
         {"answer": "x", "type": 8, "question_id": "q3"}, {"answer": "y", "type": 8, "question_id": "q4"},
         {"answer": "z", "type": 8, "question_id": "q6"}]
    (d / "test_q.json").write_text(json.dumps(q))  # q5 has no answer: unparseable
    (d / "test_a.json").write_text(json.dumps(a))
    (d / "test_qa.json").write_text(json.dumps([
        {"video_id": 7, "question": "what color is it?", "answer": "blue", "id": 0},
        {"video": "video7", "question": "what moves?", "answer": "a circle", "id": 1},
        {"video_id": 7, "question": "not asked (max-samples)", "answer": "z", "id": 2}]))
    return d


def test_normaliser_and_exact_match_rule():
    assert normalize_answer("  The RED, ball!  ") == "red ball"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("Red.", "red") and exact_match("the red ball", "Red ball")
    assert exact_match("The shape is red.", "red")  # a whole word of a short prediction (3 words)
    assert exact_match("a man is playing guitar", "playing guitar")  # a multi-word answer as a whole-word run
    assert not exact_match("reddish", "red")  # not a whole word
    assert not exact_match("it is not red but blue", "red")  # 6 words: too long to count containment
    assert not exact_match("guitar playing", "playing guitar")  # words out of order
    assert not exact_match("", "red") and not exact_match("...", "red") and not exact_match("red", "")


def run(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stdout + stderr) of ``vlp`` with ``argv``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.out + out.err


def test_activitynet_format_through_the_cli(export, bench, tmp_path, capsys):
    """Two files joined by question_id, v_ prefix, a missing and an undecodable video listed as unanswerable, a
    question without an answer unparseable, per-type rows named from ActivityNet's type numbers."""
    from vlp.chat import ChatSession

    out = tmp_path / "out"
    rc, _, text = run(capsys, "eval", "--task", "videoqa", "--model", export, "--questions", bench / "test_q.json",
                   "--answers", bench / "test_a.json", "--media-root", bench / "media", "--out", out,
                   "--max-new-tokens", 3, "--batch-size", 1)  # 1: a window of 4 questions, q5 in the second
    assert rc == 0, text
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["id"] for p in preds] == ["q1", "q2"]
    assert all(set(p) == {"video_name", "Q", "A", "pred", "id"} for p in preds)
    assert preds[0]["video_name"] == "abc" and preds[0]["Q"] == "what color is the shape" and preds[0]["A"] == "red"
    rep = json.loads((out / "results.json").read_text())
    assert rep["qa_format"] == "activitynet"
    rows = {r["group"]: r for r in rep["rows"]}
    assert list(rows) == ["all", "type=color", "type=object", "type=other"]
    assert {k: rows["all"][k] for k in ("n", "scored", "unanswerable", "unparseable")} == \
        {"n": 6, "scored": 2, "unanswerable": 3, "unparseable": 1}
    assert rows["type=other"]["n"] == 3 and rows["type=other"]["unanswerable"] == 3
    assert rows["all"]["correct"] == sum(exact_match(p["pred"], p["A"]) for p in preds)
    assert [u["id"] for u in rep["unanswerable"]] == ["q3", "q4", "q6"]
    assert "gone" in rep["unanswerable"][0]["reason"] and "bad.mp4" in rep["unanswerable"][1]["reason"]
    assert rep["unparseable"] == [{"id": "q5", "reason": "no answer for question_id q5 in --answers"}]
    md = (out / "results.md").read_text()
    assert "| all | 6 | 2 |" in md and md in text  # the CLI prints the table it wrote
    s = ChatSession(str(export))  # the same answer vlp chat's session gives, and no conversation state left over
    s.load_media(str(bench / "media" / "video7.webm"))
    "".join(s.ask("what moves?", max_new_tokens=2))
    conv = list(s.conv)
    assert s.answer("what color is the shape", [s.encode(str(bench / "media" / "v_abc.mp4"))], 3) == preds[0]["pred"]
    assert s.conv == conv and s.items[0].path.endswith("video7.webm")
    # batched (grouped by length): the answers one at a time gives, in order, whatever the batch size
    abc, v7 = s.encode(str(bench / "media" / "v_abc.mp4")), s.encode(str(bench / "media" / "video7.webm"))
    asks = [("what color is the shape", [abc]), ("what moves?", [v7]), ("say something long about nothing", []),
            ("<video> then <video>: same colour?", [abc, v7]), ("what shape is shown", [abc])]
    single = [s.answer(q, items, 6) for q, items in asks]
    assert s.answer_many(asks, 6, batch_size=2) == single == s.answer_many(asks, 6, batch_size=16)
    assert len(set(single)) > 1


def test_msrvtt_format_auto_detected_with_max_samples(export, bench, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, text = run(capsys, "eval", "--task", "videoqa", "--model", export, "--questions",
                           bench / "test_qa.json", "--media-root", bench / "media", "--out", out,
                           "--max-new-tokens", 2, "--max-samples", 2, "--json")
    assert rc == 0, text
    rep = json.loads(stdout)
    assert rep["qa_format"] == "msrvtt" and [r["group"] for r in rep["rows"]] == ["all"]
    assert rep["rows"][0]["n"] == 2 and rep["rows"][0]["scored"] == 2 and not rep["unanswerable"]
    preds = json.loads((out / "predictions.json").read_text())
    assert [(p["id"], p["video_name"], p["A"]) for p in preds] == [("0", "7", "blue"), ("1", "video7", "a circle")]


def test_msvd_clips_are_found_through_its_youtube_mapping(export, bench, tmp_path, capsys):
    """MSVD-QA as released: test_qa.json rows {video_id: int, id, question, answer, category_id...} and clips named
    by YouTube id, joined by youtube_mapping.txt (lines '<clip name> vid<N>')."""
    media = tmp_path / "YouTubeClips"
    media.mkdir()
    (media / "-4wsuPCjDBc_5_15.avi").write_bytes(encode(frames_of(6, color="green"), fmt="avi", codec="mpeg4"))
    (tmp_path / "youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nzzzz_1_2 vid2\n")
    (tmp_path / "test_qa.json").write_text(json.dumps([
        {"video_id": 1, "question": "what is green?", "answer": "shape", "id": 0, "category_id": 3},
        {"video_id": 2, "question": "what is gone?", "answer": "clip", "id": 1, "category_id": 3}]))
    args = ["eval", "--task", "videoqa", "--model", export, "--questions", tmp_path / "test_qa.json",
            "--media-root", media, "--out", tmp_path / "out", "--max-new-tokens", 2, "--json"]
    rc, stdout, text = run(capsys, *args, "--video-map", tmp_path / "youtube_mapping.txt")
    assert rc == 0, text
    rep = json.loads(stdout)
    assert rep["rows"][0]["scored"] == 1 and len(rep["unanswerable"]) == 1
    assert "zzzz_1_2.*" in rep["unanswerable"][0]["reason"]
    rc, stdout, text = run(capsys, *args)  # without the mapping: vid1 is not a file name there
    assert rc == 0 and json.loads(stdout)["rows"][0]["scored"] == 0
    (tmp_path / "bad_map.txt").write_text("just-one-column\n")
    rc, _, text = run(capsys, *args, "--video-map", tmp_path / "bad_map.txt")
    assert rc != 0 and "line 1: expected '<clip name> vid<N>'" in text and "Traceback" not in text
