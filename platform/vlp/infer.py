"""``vlp infer``: batch inference over a shard set with Ray Data, answers written next to keys.

shards --read--> --decode (same sampling/preprocessing as the model's features)--> --answer (actor pool:
frozen tower + VideoLLM, greedy; each actor call's ``batch_size`` x ``length_groups`` rows sorted by prompt length
and answered ``batch_size`` at a time in batched, left-padded generations)--> driver writes ``answers.jsonl``
(shard, key, question, answer) and ``errors.jsonl``. Bad samples become error records exactly as in precompute.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Optional

import numpy as np
from pydantic import Field

from .config import Cfg
from .data.media import DecodeConfig, DecoderUnavailable, check_chain
from .data.sample import SampleConfig
from .runtime import RayConfig
from .storage import StorageConfig, expand_shards, get_fs, join, make_output_dir

if TYPE_CHECKING:
    from .formats.export import ExportInfo


class InferConfig(Cfg):
    """``vlp infer``: answer a question about every sample of a shard set."""

    model: str = Field(..., description="export folder of a trained run")
    shards: list[str] = Field(..., min_length=1, description="shard specs (folders, globs, brace ranges, s3://)")
    storage: StorageConfig = StorageConfig()
    question: Optional[str] = Field(None, description="asked of every sample; None = each sample's first "
                                    "human turn from its conversations")
    output: str = Field(..., description="folder for answers.jsonl / errors.jsonl (local or s3://)")
    output_storage: StorageConfig = StorageConfig()
    max_new_tokens: int = Field(32, ge=1)
    decode: DecodeConfig = DecodeConfig()
    decode_gpus: float = Field(0.25, gt=0, le=1, description="GPU fraction each decode task asks Ray for when "
                               "decode.device=cuda (docs/data.md, \"GPU decoding\")")
    sample: SampleConfig = Field(SampleConfig(), description="how raw samples become samples of 0..N media items")
    batch_size: int = Field(8, ge=1, description="rows per batched generation")
    length_groups: int = Field(4, ge=1, description="batches per answer actor call: its batch_size x "
                               "length_groups rows are sorted by prompt length and answered batch_size at a time, "
                               "so that each batch holds prompts of near length (less padding)")
    concurrency: int = Field(1, ge=1, description="answer actors (one GPU each where GPUs exist)")
    use_gpu: bool = Field(False, description="each answer actor asks Ray for one GPU and runs the tower and the "
                          "VideoLLM on cuda; false: both on CPU")
    ray: RayConfig = RayConfig()


class AnswerBatch:
    """Actor stage: decoded items -> the export's tower features (vlp.online) -> VideoLLM answer."""

    def __init__(self, export_dir: str, question: Optional[str], max_new_tokens: int, device: str = "cpu",
                 batch_size: int = 8):
        from .formats.export import load_model
        from .online import OnlineEncoder

        self.device = device
        self.model, self.tok, self.info = load_model(export_dir, device)
        self.template = self.info.prompt_template(export_dir)
        self.enc = OnlineEncoder(self.info, export_dir, device, self.model.tower)
        self.question, self.max_new, self.batch_size = question, max_new_tokens, batch_size

    def features(self, data: bytes, shape: str, modality: str):
        """One decoded item -> its features: uint8 frames (T, 3, S, S) -> (T, 1 + P, D); an audio item's float32
        fbank (n, F, M) -> (n, tokens, D_a) (as precompute's EncodeFeatures did)."""
        import torch

        from .precompute.stages import shape_of

        if modality == "audio":
            return self.enc.sound(np.frombuffer(data, np.float32).reshape(shape_of(shape)).copy())
        return self.enc.frames(torch.from_numpy(np.frombuffer(data, np.uint8).reshape(shape_of(shape)).copy()))

    def prompt(self, r: dict) -> Optional[str]:
        """The user turn asked of a sample row: with ``question`` set, one placeholder per item + the question;
        else the row's first user turn as resolved by parse_sample (its placeholders kept, in item order).
        None when there is neither."""
        if self.question:
            marks = "".join(f"<{m}>" for m in r["modalities"])
            return f"{marks}\n{self.question}" if marks else self.question
        from .data.conversation import turn_role

        conv = json.loads(r["conversations"]) if r["conversations"] else []
        return next((t["value"] for t in conv if turn_role(t) == "user"), None)

    def model_prompt(self, r: dict, prompt: str):
        """A row's decoded items (none: a text-only prompt) and ``prompt`` -> the model's :class:`Prompt`."""
        import torch

        from .data.conversation import prompt_ids
        from .models.videollm import Prompt

        feats = [self.features(b, s, str(m)) for b, s, m in zip(r["frames"], r["frames_shape"], r["modalities"])]
        nfs = [int(f.shape[0]) for f in feats]  # frames, or audio segments
        ids = torch.tensor(prompt_ids([{"from": "human", "value": prompt}], self.tok, self.template),
                           device=self.device)
        return Prompt(ids, feats or None, "frames", nfs or 1, [str(m) for m in r["modalities"]])

    def answers(self, asked: list[tuple[dict, str]]) -> list[str]:
        """Greedy answers to (row, prompt) pairs, ``batch_size`` at a time, grouped by prompt length."""
        toks = self.model.generate_grouped([self.model_prompt(r, p) for r, p in asked], self.batch_size,
                                           max_new_tokens=self.max_new, eos_token_id=self.tok.eos_token_id)
        return [self.tok.decode(t, skip_special_tokens=True).strip() for t in toks]

    def __call__(self, batch) -> dict:
        from .data.conversation import PLACEHOLDER_RE
        from .precompute.stages import batch_rows

        rows = [r for r in batch_rows(batch) if r["kind"] != "end"]
        prompts = [self.prompt(r) if r["kind"] == "sample" else None for r in rows]
        asked = [i for i, (r, p) in enumerate(zip(rows, prompts)) if r["kind"] == "sample" and p is not None]
        answered = dict(zip(asked, self.answers([(rows[i], prompts[i]) for i in asked])))
        out = {"shard": [], "key": [], "question": [], "answer": [], "error": [], "stage": [], "kind": []}
        for i, (r, p) in enumerate(zip(rows, prompts)):
            q = PLACEHOLDER_RE.sub("", p).strip() if p is not None else None  # what answers.jsonl shows
            ans, err, stage = answered.get(i, ""), r["error"], r["stage"]
            if r["kind"] == "sample" and p is None:
                err, stage = "no question: set question or give the sample conversations", "answer"
            for k, v in (("shard", r["shard"]), ("key", r["key"]), ("question", q or ""), ("answer", ans),
                         ("error", err), ("stage", stage), ("kind", "answer" if not err else "error")):
                out[k].append(v)
        return out


def answer_device(cfg: InferConfig) -> str:
    """Where the answer actors run the tower and the LLM: chosen by the config (use_gpu, which also makes Ray
    give each actor a GPU), never by probing the driver, which may have no GPU while the workers do."""
    return "cuda" if cfg.use_gpu else "cpu"


def decode_stage(info: ExportInfo, decode: DecodeConfig):
    """The decode stage for a model: the sampling, crop size, padding and padding colour its features were
    precomputed with (export info), and its audio cuts when it was trained on audio, as precompute's DecodeFrames
    was built. An export that records no mean (none written by vlp) pads with the tower's own, as AnswerBatch then
    normalises. Built on the driver without loading a tower."""
    from .data.preprocess import CLIP_MEAN, CLIP_STD
    from .models.presets import resolve_model_path
    from .models.towers import tower_mean_std
    from .online import audio_featurizer
    from .precompute.stages import DecodeFrames

    enc, sampling = info.media()
    recorded = info.preprocess is not None and info.preprocess.mean
    mean, std = (CLIP_MEAN, CLIP_STD) if recorded else tower_mean_std(resolve_model_path(enc.path))
    g = info.geometry(enc.image_size, mean, std)
    return DecodeFrames(sampling, decode, g.size, g.pad_to_square, g.mean, audio=audio_featurizer(info),
                        no_audio="an audio item, but the model was trained without audio (its export has no audio "
                                 "tower)")


def decode_args(cfg: InferConfig) -> dict:
    """map_batches keyword arguments of the decode tasks: CPU tasks, plus ``decode_gpus`` of a GPU each when
    decoding on cuda (they stay tasks: the answer actors hold whole GPUs for the tower and the LLM)."""
    gpus = {"num_gpus": cfg.decode_gpus} if cfg.decode.device == "cuda" else {}
    return {"batch_size": 4, "batch_format": "numpy", "memory": 512 << 20, **gpus}


def collect(ds) -> tuple[list[dict], list[dict]]:
    """(answers, error records) from the answer rows; a decoder the workers cannot make (no GPU visible there)
    stops with its own message."""
    from .precompute.pipeline import decoder_problem

    answers, errors = [], []
    try:
        for r in ds.iter_rows():
            rec = {"shard": r["shard"], "key": r["key"]}
            if r["kind"] == "answer":
                answers.append({**rec, "question": r["question"], "answer": r["answer"]})
            else:
                errors.append({**rec, "stage": r["stage"], "reason": r["error"]})
    except Exception as e:
        problem = decoder_problem(e)
        if problem is None:
            raise
        raise DecoderUnavailable(problem) from None
    return answers, errors


def run_infer(cfg: InferConfig, log=print) -> dict:
    from .formats.export import ExportInfo
    from .precompute.pipeline import shard_names
    from .runlog import ray_output

    info = ExportInfo.read(cfg.model)  # NotAnExport / ExportFormatError before Ray starts
    shards = expand_shards(cfg.shards, cfg.storage)
    names = shard_names(shards)
    make_output_dir(cfg.output, "output", cfg.output_storage)  # before Ray starts
    decode = decode_stage(info, cfg.decode)
    check_chain(decode.chain)  # a decoder that is not installed: one line, before Ray starts
    with ray_output(cfg.output, cfg.ray.verbose, cfg.output_storage, log) as log:  # <output>/logs/ray.log
        return infer_on_ray(cfg, decode, shards, names, log)


def infer_on_ray(cfg: InferConfig, decode, shards: list[str], names: dict, log=print) -> dict:
    """:func:`run_infer`'s Ray part: read -> decode -> answer over the shards; answers.jsonl, errors.jsonl."""
    import ray

    from .precompute.stages import ReadShard
    from .runtime import init_ray

    init_ray(cfg.ray)
    t0 = time.time()
    ds = ray.data.from_items([{"shard": names[u], "uri": u} for u in shards], override_num_blocks=len(shards))
    ds = ds.flat_map(ReadShard(cfg.storage, cfg.sample), num_cpus=0.25)
    ds = ds.map_batches(decode, **decode_args(cfg))
    ds = ds.map_batches(AnswerBatch, fn_constructor_kwargs=dict(export_dir=cfg.model, question=cfg.question,
                                                                max_new_tokens=cfg.max_new_tokens,
                                                                device=answer_device(cfg), batch_size=cfg.batch_size),
                        batch_size=cfg.batch_size * cfg.length_groups, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_gpus=1 if cfg.use_gpu else 0)
    answers, errors = collect(ds)
    answers.sort(key=lambda a: (a["shard"], a["key"]))
    fs, root = get_fs(cfg.output, cfg.output_storage)
    fs.makedirs(root, exist_ok=True)
    for name, rows in (("answers.jsonl", answers), ("errors.jsonl", errors)):
        with fs.open(join(root, name), "w") as f:
            f.write("".join(json.dumps(x) + "\n" for x in rows))
    summary = {"answers": len(answers), "errors": len(errors), "wall_s": round(time.time() - t0, 2),
               "output": cfg.output}
    log(f"[vlp] infer: {len(answers)} answers, {len(errors)} errors in {summary['wall_s']}s -> "
        f"{join(cfg.output, 'answers.jsonl')}")
    return summary
