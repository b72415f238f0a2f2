"""vlp chat on made media: online decode + encode with the export's sampling/preprocessing, streaming answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED_MEDIA
from vlp.config import validate
from vlp.formats.export import ExportInfo


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from vlp.synth.shards import Attributes, encode_jpeg, encode_mp4, render_clip

    d = tmp_path_factory.mktemp("media")
    frames = render_clip(Attributes("red", "square", "left"), np.random.default_rng(0), 64, 96, 12)
    (d / "clip.mp4").write_bytes(encode_mp4(frames, 8))
    (d / "photo.jpg").write_bytes(encode_jpeg(frames[0]))
    return d


def one_item_row(data: bytes, ext: str) -> dict:
    """A read-stage row of a sample with one media member (as precompute's ReadShard makes it)."""
    from vlp.data.sample import modality_of
    from vlp.precompute.stages import make_row

    return make_row(shard="x", key="k", kind="sample", media=[data], media_ext=[ext], item_names=[ext],
                    modalities=[modality_of(ext)], item_refs=[""])


def test_features_match_precompute_path(export, clip):
    """Online encoding = what precompute stores (same sampling, preprocessing, layer; pooled the Valley way)."""
    from vlp.chat import ChatSession
    from vlp.data.media import DecodeConfig, SamplingConfig
    from vlp.precompute.stages import DecodeFrames, EncodeFeatures, rows_batch, batch_rows
    from vlp.models.towers import TOWERS

    s = ChatSession(str(export))
    assert s.load_media(str(clip / "clip.mp4")) == ["video"] and s.items[0].feats.shape == (8, 257, 64)
    row = one_item_row((clip / "clip.mp4").read_bytes(), "mp4")
    dec = DecodeFrames(SamplingConfig(), DecodeConfig(), 224)(rows_batch([row]))
    enc = batch_rows(EncodeFeatures(TOWERS.config(), "valley_pooled")(dec))[0]
    stored = np.frombuffer(enc["features"][0], np.float16).reshape(264, 64)
    online = s.model.pool(s.items[0].feats, "frames", 8).numpy()
    assert np.allclose(stored, online, atol=2e-2)


PAD_MEAN, PAD_STD = [0.9, 0.1, 0.6], [0.2, 0.3, 0.4]


def _padded_precompute(sampling: dict):
    """What precompute plans for pad_to_square with a non-CLIP mean/std: (fingerprint, decode stage, encoder
    kwargs), resolved on the driver as run_precompute does."""
    from vlp.precompute import PrecomputeConfig
    from vlp.precompute.pipeline import plan_stages

    return plan_stages(validate(PrecomputeConfig, {
        "data": {"shards": ["unused.tar"], "sampling": sampling,
                 "preprocess": {"pad_to_square": True, "mean": PAD_MEAN, "std": PAD_STD}},
        "output": {"uri": "unused", "mode": "frames"}}))


@pytest.fixture(scope="module")
def padded_export(export, tmp_path_factory):
    """The same export, as if its features were precomputed with pad_to_square and a non-CLIP mean/std: its
    ``preprocess`` is that feature set's fingerprint's, as training copies it into the export."""
    import shutil

    out = tmp_path_factory.mktemp("padded") / "export"
    shutil.copytree(export, out)
    info = json.loads((out / "vlp_model.json").read_text())
    info["preprocess"] = _padded_precompute(info["sampling"])[0].preprocess.to_json()
    (out / "vlp_model.json").write_text(json.dumps(info))
    return out


@pytest.mark.parametrize("name", ["photo.jpg", "clip.mp4"])
def test_chat_and_infer_preprocess_as_precompute_did(padded_export, clip, name):
    """A non-square 64x96 image/clip, pad_to_square and a custom mean/std: chat and infer pad with the feature
    set's mean (identical pixels) and normalise with its mean/std (the same features) as precompute did."""
    from vlp.chat import ChatSession
    from vlp.data.media import DecodeConfig, SamplingConfig
    from vlp.infer import AnswerBatch, decode_stage
    from vlp.models.towers import TOWERS
    from vlp.precompute.stages import DecodeFrames, EncodeFeatures, rows_batch, batch_rows, shape_of

    info = json.loads((padded_export / "vlp_model.json").read_text())
    assert info["preprocess"]["mean"] == PAD_MEAN and info["preprocess"]["std"] == PAD_STD
    _, decode, encode = _padded_precompute(info["sampling"])
    row = one_item_row((clip / name).read_bytes(), name.split(".")[1])

    def pixels(stage):
        out = batch_rows(stage(rows_batch([row])))[0]
        assert out["kind"] == "sample", out["error"]
        return torch.from_numpy(np.frombuffer(out["frames"][0], np.uint8).reshape(shape_of(out["frames_shape"][0])).copy())

    def features(stage, decoded):
        out = batch_rows(stage(decoded))[0]
        return torch.from_numpy(np.frombuffer(out["features"][0], np.float16).reshape(
            shape_of(out["features_shape"][0])).astype(np.float32))

    precomputed = pixels(decode)
    clip_mean = pixels(DecodeFrames(SamplingConfig(**info["sampling"]), DecodeConfig(), 224, True))
    assert not torch.equal(precomputed, clip_mean)  # the padding colour shows: a mismatch would be caught
    corner = precomputed[0, :, 0, 0].float()  # the top rows of a 64x96 frame padded to 96x96
    assert torch.allclose(corner, torch.tensor(PAD_MEAN) * 255, atol=1)
    s = ChatSession(str(padded_export))
    mtype, online = s.frames(str(clip / name))
    assert mtype == ("image" if name.endswith("jpg") else "video")
    assert torch.equal(online, precomputed)
    assert torch.equal(pixels(decode_stage(ExportInfo.read(padded_export), DecodeConfig())), precomputed)

    decoded = decode(rows_batch([row]))
    stored = features(EncodeFeatures(**encode), decoded)  # (T, 1 + P, D), as precompute stores in frames mode
    towers_own = features(EncodeFeatures(TOWERS.config(), "frames"), decoded)
    assert (stored - towers_own).abs().max() > 0.5  # the mean/std show in the features
    s.load_media(str(clip / name))
    got = s.items[0].feats
    assert torch.allclose(got, stored, atol=2e-2, rtol=1e-2), (got - stored).abs().max()
    actor = AnswerBatch(str(padded_export), None, 3)
    assert torch.allclose(actor.enc.frames(precomputed), stored, atol=2e-2, rtol=1e-2)


def test_single_question_streams_and_is_deterministic(export, clip):
    from vlp.chat import run_chat

    outs = []
    for _ in range(2):
        pieces = []
        assert run_chat(str(export), str(clip / "clip.mp4"), "What color is the shape?", write=pieces.append,
                        max_new_tokens=8) == 0
        outs.append(pieces)
    assert outs[0] == outs[1] and outs[0][-1] == "\n"
    text = outs[0][:-1]  # the answer's pieces, as ask() yields them token by token, before the final newline
    assert len(text) >= 2 and all(text), outs[0]


def test_encode_bytes_is_encode_of_the_file(export, clip):
    """ChatSession.encode_bytes (media made in memory, as lmms-eval's PIL images reach vlp.eval.lmms) gives what
    encode gives for the same file; undecodable bytes are BadMedia naming what was passed as the name."""
    from vlp.chat import BadMedia, ChatSession

    s = ChatSession(str(export))
    for name in ("clip.mp4", "photo.jpg"):
        a, b = s.encode(str(clip / name)), s.encode_bytes((clip / name).read_bytes(), name.split(".")[1], "mem")
        assert (a.modality, a.num_frames, b.path) == (b.modality, b.num_frames, "mem")
        assert torch.equal(a.feats, b.feats)
    with pytest.raises(BadMedia, match="^mem is not a video or image vlp can decode"):
        s.encode_bytes(b"not media", "png", "mem")


def test_multi_turn_session_keeps_history(export, clip):
    from vlp.chat import ChatSession, run_chat

    questions = iter(["What color is the shape?", "Which direction does the shape move?", ""])
    out = []
    assert run_chat(str(export), str(clip / "photo.jpg"), None, write=out.append, read=lambda _: next(questions),
                    max_new_tokens=4) == 0
    text = "".join(out)
    assert text.startswith("[image:") and text.count("vlp> ") == 2
    s = ChatSession(str(export))
    s.load_media(str(clip / "photo.jpg"))
    "".join(s.ask("What color is the shape?", max_new_tokens=4))
    "".join(s.ask("And the shape?", max_new_tokens=4))
    assert [t["from"] for t in s.conv] == ["human", "gpt", "human", "gpt"]
    assert s.conv[0]["value"].startswith("<image>\n") and not s.conv[2]["value"].startswith("<")


def test_cli_chat_on_a_made_clip(export, clip, capsys):
    from vlp.cli import main

    assert main(["chat", "--model", str(export), "--video", str(clip / "clip.mp4"), "What shape is shown?",
                 "--max-new-tokens", "4", "--temperature", "0.7"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_several_items_are_placed_by_the_questions_placeholders(export, clip):
    """Two items: placeholders in the question place them (k-th <image> = k-th image given); without any, one per
    item goes in front in the order given; the model gets the blocks in placeholder order (a swapped order gives
    different logits, so the order reaching the model is checked, not just the text)."""
    from vlp.chat import ChatSession

    s = ChatSession(str(export))
    assert s.load_media([str(clip / "clip.mp4"), str(clip / "photo.jpg")]) == ["video", "image"]
    seen = []
    real = s.model.generate
    s.model.generate = lambda ids, feats, mode, nfs, **kw: (seen.append([f.shape[0] for f in feats]), real(
        ids, feats, mode, nfs, **kw))[1]
    "".join(s.ask("Is the <image> a frame of the <video>?", max_new_tokens=2))
    assert s.conv[0]["value"] == "Is the <image> a frame of the <video>?" and seen[-1] == [1, 8]
    s.load_media([str(clip / "clip.mp4"), str(clip / "photo.jpg")])
    "".join(s.ask("Compare them.", max_new_tokens=2))
    assert s.conv[0]["value"] == "<video>\n<image>\nCompare them." and seen[-1] == [8, 1]


def test_mismatched_placeholders_are_one_clear_line(export, clip, capsys):
    from vlp.cli import main

    rc = main(["chat", "--model", str(export), "--image", str(clip / "photo.jpg"), "<image> or <image>?"])
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("vlp chat")]  # others: transformers' load bar
    assert rc == 2 and "Traceback" not in err and len(ours) == 1, err
    assert "2 <image> placeholder(s) but 1 image item(s)" in ours[0], ours


def test_text_only_chat(export, capsys):
    from vlp.cli import main

    assert main(["chat", "--model", str(export), "Hello?", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.skipif(not SHARED_MEDIA.exists(), reason="../shared/media not present (optional realism check)")
@pytest.mark.parametrize("name", ["1.mp4", "2.avi", "4.mp4"])
def test_chat_decodes_real_clips(export, name):
    from vlp.chat import ChatSession

    s = ChatSession(str(export))
    assert s.load_media(str(SHARED_MEDIA / name)) == ["video"] and s.items[0].feats.shape == (8, 257, 64)
    assert isinstance("".join(s.ask("What is happening?", max_new_tokens=3)), str)


def test_building_an_encoder_leaves_autograd_on_in_the_process():
    """EncodeFeatures used to switch autograd off for the whole process (torch.set_grad_enabled(False)): a
    training step later in the same process then got a loss without a graph. The tower encodes under no_grad."""
    import torch

    from vlp.models.towers import TOWERS
    from vlp.precompute.stages import EncodeFeatures

    EncodeFeatures(TOWERS.config(), "valley_pooled")
    assert torch.is_grad_enabled()


def test_a_character_split_over_two_tokens_streams_whole(export, monkeypatch):
    """Byte-level tokens: 'é' is two tokens, and the first alone decodes as U+FFFD. The stream holds it back and
    shows 'é' once its second token is there (it used to show U+FFFD and never correct it)."""
    from vlp.chat import ChatSession

    session = ChatSession(str(export))
    ids = session.tok("é ok", add_special_tokens=False).input_ids
    assert "\ufffd" in session.tok.decode(ids[:1])  # the premise: a split character
    monkeypatch.setattr(session.model, "generate", lambda *a, **k: iter(ids))  # these tokens, as if generated
    pieces = list(session.stream([{"from": "human", "value": "Say it."}], []))
    assert "".join(pieces) == "é ok" and not any("\ufffd" in p for p in pieces)
