"""Audio decode and fbank features (vlp.data.audio) on real files made with PyAV: every container the audio
modality reads, channel mean, resampling, bounded decoding, and an error for each kind of bad audio."""

from __future__ import annotations

import numpy as np
import pytest

from media_makers import aac_in_mp4, audio_bytes, encode, frames_of, tone
from vlp.data.audio import AudioConfig, decode_audio, fbank_features, segments
from vlp.data.media import MediaError

CFG = AudioConfig()


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(wave.size, 1 / rate)[spec.argmax()])


@pytest.mark.parametrize("fmt,codec", [("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame"),
                                       ("ipod", "aac"), ("mp4", "aac")])
def test_every_container_decodes_to_16k_mono_with_the_tone_kept(fmt, codec):
    data = audio_bytes(tone([440.0], 1.0, 44100), 44100, fmt, codec)
    wave = decode_audio(data, CFG)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - 16000) < 16000 * 0.1, wave.size  # codecs add or trim a frame of padding
    assert abs(peak_hz(wave, 16000) - 440) < 3


def test_the_soundtrack_of_a_video_is_its_own_item():
    data = audio_bytes(tone([660.0], 1.0, 48000), 48000, "mp4", "aac", video=frames_of(8))
    assert abs(peak_hz(decode_audio(data, CFG), 16000) - 660) < 3


def test_stereo_is_the_mean_of_its_channels():
    wave = decode_audio(audio_bytes(tone([300.0, 1200.0], 1.0, 16000), 16000), CFG)
    spec = np.abs(np.fft.rfft(wave)) / wave.size
    freqs = np.fft.rfftfreq(wave.size, 1 / 16000)
    at = {f: spec[np.abs(freqs - f).argmin()] for f in (300, 1200)}
    assert at[300] == pytest.approx(at[1200], rel=0.05) and at[300] == pytest.approx(0.3 / 2 / 2, rel=0.1)


def test_decoding_stops_after_the_segments_kept():
    data = audio_bytes(tone([440.0], 30.0, 16000), 16000)
    wave = decode_audio(data, AudioConfig(max_segments=2, segment_seconds=4.0))
    assert wave.size == 8 * 16000
    assert [len(s) for s in segments(wave, AudioConfig(max_segments=2, segment_seconds=4.0))] == [64000, 64000]
    assert [len(s) for s in segments(wave[:70000], AudioConfig(max_segments=3, segment_seconds=4.0))] == [64000,
                                                                                                          6000]


@pytest.mark.parametrize("data,reason", [
    (encode(frames_of(4)), "no audio stream"),
    (audio_bytes(np.zeros((1, 16000), np.float32), 16000), "silent audio"),
    (audio_bytes(np.zeros((1, 0), np.float32), 16000, "flac", "flac"), "no audio samples"),
    (audio_bytes(np.zeros((1, 0), np.float32), 16000), "undecodable audio"),  # a wav header, no data chunk
    (b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 4, "undecodable audio"),
    (b"", "undecodable audio"),
])
def test_bad_audio_gets_one_reason(data, reason):
    with pytest.raises(MediaError, match=reason):
        decode_audio(data, CFG)


def test_a_huge_sample_rate_is_refused():
    data = audio_bytes(tone([440.0], 0.2, 96000), 96000)
    with pytest.raises(MediaError, match="sample rate 96000 Hz is above max_source_rate 48000"):
        decode_audio(data, AudioConfig(max_source_rate=48000))


def test_a_truncated_file_keeps_what_decodes_or_fails_with_a_reason():
    data = audio_bytes(tone([440.0], 2.0, 16000), 16000, "mp3", "libmp3lame")
    try:
        wave = decode_audio(data[: len(data) // 2], CFG)
    except MediaError as e:
        assert str(e).startswith(("undecodable audio", "no audio samples"))
    else:
        assert 0 < wave.size < 2 * 16000


def test_fbank_is_the_ast_extractors_own_on_each_segment():
    from transformers import ASTFeatureExtractor

    ext = ASTFeatureExtractor()
    wave = decode_audio(audio_bytes(tone([440.0], 3.0, 16000), 16000), AudioConfig(segment_seconds=1.0,
                                                                                      max_segments=2))
    chunks = segments(wave, AudioConfig(segment_seconds=1.0, max_segments=2))
    feats = fbank_features(chunks, ext)
    assert feats.shape == (2, 1024, 128) and feats.dtype == np.float32
    one = ext(chunks[1], sampling_rate=16000, return_tensors="np")["input_values"][0]
    np.testing.assert_allclose(feats[1], one, rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats[0, :50], feats[0, -50:])  # the tone, then padding


def test_the_tiny_ast_preset_loads_offline_and_encodes_the_features():
    import torch
    from transformers import ASTFeatureExtractor, ASTModel

    from vlp.models.presets import resolve_model_path

    path = resolve_model_path("preset:tiny-ast")
    model, ext = ASTModel.from_pretrained(path).eval(), ASTFeatureExtractor.from_pretrained(path)
    wave = decode_audio(audio_bytes(tone([440.0], 2.0, 16000), 16000), CFG)
    feats = fbank_features(segments(wave, CFG), ext)  # (1, 1024, 128)
    with torch.no_grad():
        out = model(input_values=torch.from_numpy(feats)).last_hidden_state
    assert out.shape == (1, 2 + 12 * 101, 64) and torch.isfinite(out).all()  # CLS, distillation, 12 x 101 patches
