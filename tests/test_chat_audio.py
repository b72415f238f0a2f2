"""vlp chat with sound: ``--audio FILE`` and ``--video FILE --with-audio`` on a (tiny, untrained) export whose
features had an audio tower: the audio item is cut and encoded exactly as precompute did, placed by ``<audio>``,
and the errors (a model without audio, a video without a soundtrack) are one clear line each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHARED_MEDIA
from media_makers import audio_bytes, frames_of, tone
from vlp.data.audio import AudioConfig

AST_TOKENS = 2 + 12 * 101


@pytest.fixture(scope="module")
def audio_export(tmp_path_factory):
    from transformers import AutoTokenizer

    from vlp.config import validate
    from vlp.formats.export import export_model
    from vlp.models.presets import resolve_model_path
    from vlp.models.videollm import ModelConfig, VideoLLM

    torch.manual_seed(0)
    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64, "audio_hidden_size": 64, "connector": {
        "type": "perceiver", "num_queries": 4, "num_layers": 2, "hidden_size": 32, "num_heads": 4,
        "intermediate_size": 40}}))
    tok = AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))
    out = tmp_path_factory.mktemp("chat-audio") / "export"
    export_model(model, tok, out, extra={
        "template": "vicuna_v1", "feature_mode": "valley_pooled",
        "encoder": {"type": "clip", "path": "preset:tiny-clip", "layer": -2, "hidden_size": 64, "image_size": 224},
        "audio": {"type": "ast", "path": "preset:tiny-ast", "layer": -1, "hidden_size": 64,
                  "tokens_per_segment": AST_TOKENS, "num_mel_bins": 128, "max_length": 1024,
                  "decode": AudioConfig(max_segments=2).model_dump(mode="json")},
        "sampling": {"mode": "uniform", "num_frames": 8, "fps": 1.0, "max_frames": 32},
        "preprocess": {"size": 224, "pad_to_square": False}})
    return out


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("sounds")
    (d / "tone.wav").write_bytes(audio_bytes(tone([440.0], 12.0, 16000), 16000))  # 12 s: two segments
    (d / "movie.mp4").write_bytes(audio_bytes(tone([660.0], 1.0, 48000), 48000, "mp4", "aac", video=frames_of(8)))
    from vlp.synth.shards import encode_mp4

    (d / "silent_film.mp4").write_bytes(encode_mp4(frames_of(8), 8))
    return d


def test_audio_items_are_encoded_as_precompute_did(audio_export, media):
    from vlp.chat import ChatSession
    from vlp.data.audio import AudioFeaturizer
    from vlp.data.tario import RawSample
    from vlp.models.presets import resolve_model_path
    from vlp.precompute.stages import DecodeFrames, EncodeFeatures, ReadShard, batch_rows, rows_batch
    from vlp.data.media import DecodeConfig, SamplingConfig

    s = ChatSession(str(audio_export))
    item = s.encode_audio(str(media / "tone.wav"))
    assert item.modality == "audio" and item.feats.shape == (2, AST_TOKENS, 64) and item.num_frames == 2
    row = ReadShard().row("x", RawSample("k", {"wav": (media / "tone.wav").read_bytes(), "txt": b"t"}), 0.0)
    dec = DecodeFrames(SamplingConfig(), DecodeConfig(), 224,
                       audio=AudioFeaturizer(AudioConfig(max_segments=2), resolve_model_path("preset:tiny-ast")))
    enc = EncodeFeatures({"type": "clip", "path": "preset:tiny-clip"}, "frames",
                         audio_tower_cfg={"type": "ast", "path": "preset:tiny-ast"})
    out = batch_rows(enc(rows_batch([dec.decode_row(row)])))[0]
    stored = np.frombuffer(out["features"][0], np.float16).reshape(2, AST_TOKENS, 64)
    torch.testing.assert_close(item.feats, torch.from_numpy(stored.astype(np.float32)), atol=2e-3, rtol=2e-3)


def test_audio_and_a_videos_soundtrack_are_placed_as_items(audio_export, media):
    from vlp.chat import ChatSession

    s = ChatSession(str(audio_export))
    assert s.load_media([str(media / "movie.mp4"), str(media / "tone.wav")], audio=[1], with_audio=True) == [
        "video", "audio", "audio"]
    seen = []
    real = s.model.generate
    s.model.generate = lambda ids, feats, mode, nfs, **kw: (seen.append((kw["modalities"], nfs)), real(
        ids, feats, mode, nfs, **kw))[1]
    "".join(s.ask("Which <audio> is the film's sound, this <audio> or the <video>?", max_new_tokens=2))
    assert seen[-1] == (["audio", "audio", "video"], [1, 2, 8])  # placeholder order: movie's sound, the tone, the film
    assert [i for i in s.order] == [1, 2, 0]


def test_cli_chat_audio_and_its_errors(audio_export, export, media, capsys):
    from vlp.cli import main

    assert main(["chat", "--model", str(audio_export), "--audio", str(media / "tone.wav"), "What pitch?",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["chat", "--model", str(audio_export), "--video", str(media / "movie.mp4"), "--with-audio",
                 "Describe it.", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    cases = [([str(export), "--audio", str(media / "tone.wav")], "this model was trained without audio"),
             ([str(audio_export), "--video", str(media / "silent_film.mp4"), "--with-audio"],
              "silent_film.mp4 has no audio vlp can decode: no audio stream"),
             ([str(audio_export), "--audio", str(media / "nope.wav")], "nope.wav: no such file")]
    for args, needle in cases:
        rc = main(["chat", "--model", *args, "Hi?", "--max-new-tokens", "2"])
        err = capsys.readouterr().err
        ours = [line for line in err.splitlines() if line.startswith("vlp chat")]
        assert rc == 2 and "Traceback" not in err and len(ours) == 1 and needle in ours[0], err


@pytest.mark.skipif(not SHARED_MEDIA.exists(), reason="../shared/media not present (optional realism check)")
@pytest.mark.parametrize("name", ["1.mp3", "2.wav", "3.flac"])
def test_chat_hears_real_files(audio_export, name):
    from vlp.chat import ChatSession

    s = ChatSession(str(audio_export))
    assert s.load_media([str(SHARED_MEDIA / name)], audio=[0]) == ["audio"]
    assert s.items[0].feats.shape[1:] == (AST_TOKENS, 64)
    assert isinstance("".join(s.ask("What do you hear?", max_new_tokens=3)), str)


def test_infer_answers_samples_with_sound_through_the_exports_audio_cuts(audio_export, export, media):
    """vlp infer's stages on a model trained with audio: the decode stage cuts the sound as the export records
    (two segments here), the answer actor encodes it with the audio tower; a model without audio records the
    sample as an error naming the missing audio tower, not a crash."""
    import json

    from vlp.data.media import DecodeConfig
    from vlp.data.tario import RawSample
    from vlp.formats.export import ExportInfo
    from vlp.infer import AnswerBatch, decode_stage
    from vlp.precompute.stages import ReadShard, batch_rows, rows_batch

    turn = {"from": "human", "value": "<video>\n<audio>\nWhat do you hear?"}
    raws = [RawSample("movie", {"mp4": (media / "movie.mp4").read_bytes(), "json": json.dumps(
                {"videos": ["mp4"], "audios": ["mp4"], "conversations": [turn]}).encode()}),
            RawSample("tone", {"wav": (media / "tone.wav").read_bytes(), "txt": b"A tone."})]
    rows = [ReadShard().row("s", r, 0.0) for r in raws]
    batch = decode_stage(ExportInfo.read(audio_export), DecodeConfig())(rows_batch(rows))
    assert [r["frames_shape"] for r in batch_rows(batch)] == [["8,3,224,224", "1,1024,128"], ["2,1024,128"]]
    out = AnswerBatch(str(audio_export), "Describe.", 3)(batch)
    assert out["kind"] == ["answer", "answer"], out["error"]
    deaf = batch_rows(decode_stage(ExportInfo.read(export), DecodeConfig())(rows_batch(rows)))
    assert [r["kind"] for r in deaf] == ["error", "error"]
    assert deaf[1]["error"] == ("item 0 (wav): an audio item, but the model was trained without audio (its export "
                                "has no audio tower)")
