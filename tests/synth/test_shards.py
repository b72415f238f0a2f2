"""make-shards writes with webdataset's ShardWriter: the names, members and samples per shard of before, the same
bytes for the same config, and no partial shard when writing fails."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from vlp.data.tario import RawSample, iter_tar_samples
from vlp.synth.shards import MakeShardsConfig, make_samples, make_shards, write_shards

SMALL = {"videos": 5, "images": 2, "instructions": 0, "heldout": 2, "samples_per_shard": 2, "num_frames": 2,
         "width": 32, "height": 32, "codec": "mpeg4"}  # mpeg4: byte-identical clips run to run (module doc)


def members_of(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def test_names_counts_and_members(tmp_path):
    cfg = MakeShardsConfig(out=str(tmp_path / "s"), **SMALL)
    out = make_shards(cfg)
    names = {fam: [u.rsplit("/", 1)[-1] for u in uris] for fam, uris in out.items()}
    assert names == {"webvid": ["webvid-00000.tar", "webvid-00001.tar", "webvid-00002.tar"],
                     "cc3m": ["cc3m-00000.tar"], "heldout": ["heldout-00000.tar"]}  # no instruct-*: none asked
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(n for ns in names.values() for n in ns)
    # the samples make_samples yields, 2 per shard, every member byte for byte
    expect = list(make_samples("webvid", 5, cfg, np.random.default_rng([cfg.seed, 0]), 0))
    got = [s for n in names["webvid"] for s in iter_tar_samples(open(tmp_path / "s" / n, "rb"))]
    assert all(isinstance(s, RawSample) and not s.ignored for s in got)
    assert [(s.key, s.members) for s in got] == [(key, members) for _, key, members in expect]
    assert [len(list(iter_tar_samples(open(tmp_path / "s" / n, "rb")))) for n in names["webvid"]] == [2, 2, 1]
    assert json.loads(got[0].members["json"])["key"] == "000000000"
    for ti in members_of(tmp_path / "s" / "cc3m-00000.tar"):  # pinned headers: nothing of the time or the user
        assert (ti.mtime, ti.mode, ti.uname, ti.gname, ti.uid, ti.gid) == (0, 0o644, "", "", 0, 0)
    assert [ti.name for ti in members_of(tmp_path / "s" / "cc3m-00000.tar")] == [
        "010000000.jpg", "010000000.json", "010000000.txt", "010000001.jpg", "010000001.json", "010000001.txt"]


def test_same_config_same_bytes(tmp_path):
    a, b = (make_shards(MakeShardsConfig(out=str(tmp_path / d), **SMALL)) for d in ("a", "b"))
    assert [u.rsplit("/", 1)[-1] for us in a.values() for u in us] == [u.rsplit("/", 1)[-1] for us in b.values()
                                                                        for u in us]
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def test_an_error_while_writing_leaves_no_partial_shard(tmp_path):
    cfg = MakeShardsConfig(out=str(tmp_path / "s"), samples_per_shard=2)

    def samples():
        for i in range(3):
            yield f"k{i}", {"txt": b"caption", "json": b"{}"}
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_shards("fam", samples(), cfg)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["fam-00000.tar"]  # complete; fam-00001 never written
    assert [s.key for s in iter_tar_samples(io.BytesIO((tmp_path / "s" / "fam-00000.tar").read_bytes()))] == [
        "k0", "k1"]


def test_audio_clips_carry_a_tone_naming_a_word_and_ask_for_it():
    """shards.audio: each clip's mp4 has a soundtrack whose pitch names a word (WORDS); the instruction/held-out JSON
    names the mp4 as the video and as the audio item and ends with the sound's question. Without it, the clips
    are those of before (the rng is not drawn from: the demo's data do not change)."""
    from vlp.data.audio import AudioConfig, decode_audio
    from vlp.data.sample import parse_sample
    from vlp.synth.shards import SOUND_QUESTION, WORDS

    cfg = MakeShardsConfig(out="unused", **{**SMALL, "num_frames": 8}, audio=True)
    (_, key, m), = list(make_samples("heldout", 1, cfg, np.random.default_rng(0), 3000))
    meta = json.loads(m["json"])
    assert meta["word"] in WORDS and meta["videos"] == meta["audios"] == ["mp4"]
    conv = meta["conversations"]
    assert conv[0]["value"].startswith("<video>\n<audio>\n") and conv[-2]["value"] == SOUND_QUESTION[0]
    assert conv[-1]["value"] == f"It names {meta['word']}."
    wave = decode_audio(m["mp4"], AudioConfig())
    peak = np.fft.rfftfreq(wave.size, 1 / 16000)[np.abs(np.fft.rfft(wave)).argmax()]
    assert abs(peak - WORDS[meta["word"]]) < 5
    assert parse_sample(RawSample(key, m)).modalities == ["video", "audio"]
    (_, _, webvid), = list(make_samples("webvid", 1, cfg, np.random.default_rng(0), 0))
    assert "audios" not in json.loads(webvid["json"])  # caption clips have the sound but no audio item
    quiet = MakeShardsConfig(out="unused", **{**SMALL, "num_frames": 8})
    (_, _, before), = list(make_samples("heldout", 1, quiet, np.random.default_rng(0), 3000))
    assert "word" not in json.loads(before["json"]) and "audios" not in json.loads(before["json"])


def test_text_only_instructions_have_no_media_and_no_placeholder(tmp_path):
    from vlp.synth.shards import TEXT_FACTS

    cfg = MakeShardsConfig(out=str(tmp_path / "s"), videos=0, images=0, instructions=0, heldout=0, text_only=3)
    out = make_shards(cfg)
    assert list(out) == ["text"] and out["text"][0].endswith("text-00000.tar")
    got = list(iter_tar_samples(open(out["text"][0], "rb")))
    assert len(got) == 3 and all(set(s.members) == {"json"} for s in got)
    facts = {t for pair in TEXT_FACTS for t in pair}
    for s in got:
        conv = json.loads(s.members["json"])["conversations"]
        assert conv and all(t["value"] in facts and "<" not in t["value"] for t in conv)
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    again = make_shards(cfg.model_copy(update={"out": str(tmp_path / "t")}))
    assert open(again["text"][0], "rb").read() == open(out["text"][0], "rb").read()  # deterministic
