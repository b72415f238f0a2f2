"""The ``vlp`` command line.

Config-driven subcommands (make-shards, pack, precompute, train, infer, demo, serve): ``vlp <cmd> [--config FILE]
[dotted.key=value ...]``. The others take plain flags: ``eval --model --features`` (or ``--task videoqa|mcq
--questions --media-root``), ``chat --model [--video|--image FILE]...
[question]``, ``inspect URI...``; ``presets`` and ``config-docs`` take none.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from .config import dump_config, load_config
from .errors import UserError


def _load(cls, args):
    """The command's resolved config, or None after printing it (``--print-config``)."""
    cfg = load_config(cls, args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg))
        return None
    return cfg


def _cmd_make_shards(args) -> int:
    from .synth.shards import MakeShardsConfig, make_shards

    cfg = _load(MakeShardsConfig, args)
    if cfg is None:
        return 0
    written = make_shards(cfg)
    for fam, uris in written.items():
        print(f"{fam}: {len(uris)} shard(s) -> {uris[0].rsplit('/', 1)[0]}/{fam}-*.tar")
    return 0


def _cmd_precompute(args) -> int:
    from .precompute import PrecomputeConfig, run_precompute

    cfg = _load(PrecomputeConfig, args)
    if cfg is None:
        return 0
    run_precompute(cfg)
    return 0


def _cmd_pack(args) -> int:
    from .pack import PackConfig, run_pack

    flags = [f"format.type={args.format}"] if args.format else []
    flags += [f"annotations={json.dumps(args.annotations)}"] if args.annotations else []
    flags += [f"{k}={json.dumps(v)}" for k, v in (("media_root", args.media_root), ("out", args.out)) if v]
    args.overrides = flags + args.overrides
    cfg = _load(PackConfig, args)
    if cfg is not None:
        run_pack(cfg)
    return 0


def _cmd_inspect(args) -> int:
    from .config import validate
    from .data.sample import SampleConfig
    from .inspect_ import format_report, inspect_features, inspect_shards, is_feature_set
    from .storage import StorageConfig

    storage = validate(StorageConfig, {k: v for k, v in {"endpoint_url": args.endpoint_url}.items() if v})
    if len(args.uri) == 1 and is_feature_set(args.uri[0], storage):
        rep = inspect_features(args.uri[0], storage)
    else:
        cap = {} if args.max_sample_bytes is None else {"max_sample_bytes": args.max_sample_bytes}
        sample = validate(SampleConfig, cap)
        rep = inspect_shards(args.uri, storage, decode=not args.no_decode, max_samples=args.max_samples, sample=sample)
    print(json.dumps(rep, indent=2, default=str) if args.json else format_report(rep))
    return 0


def _cmd_train(args) -> int:
    from .train import TrainConfig, run_train

    cfg = _load(TrainConfig, args)
    if cfg is None:
        return 0
    run_train(cfg)
    return 0


GROUNDING = ("temporal_grounding", "referring")
EVAL_FLAGS = {"features": ("synthetic", *GROUNDING), "pooler": ("synthetic",), "without": ("synthetic",),
              "no_generate": ("synthetic",), "endpoint_url": ("synthetic",), "questions": ("videoqa", "mcq"),
              "media_root": ("videoqa", "mcq"),
              "out": ("videoqa", "mcq", *GROUNDING), "answers": ("videoqa",), "video_map": ("videoqa",),
              "max_new_tokens": ("synthetic", "videoqa", *GROUNDING), "batch_size": ("synthetic", "videoqa", *GROUNDING)}
EVAL_BATCH_SIZE = 16  # questions per batched generation (--batch-size)


def _cmd_eval(args) -> int:
    from .eval.common import MissingFlag

    stray = [f"--{k.replace('_', '-')}" for k, tasks in EVAL_FLAGS.items()
             if getattr(args, k) and args.task not in tasks]
    stray += ["--qa-format"] if args.qa_format != "auto" and args.task != "videoqa" else []
    if stray:
        raise MissingFlag(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply to --task {args.task}")
    if args.task in GROUNDING:
        return _cmd_eval_grounding(args)
    if args.task != "synthetic":
        return _cmd_eval_benchmark(args)
    from .config import validate
    from .eval.synthetic import evaluate
    from .storage import StorageConfig

    if not args.features:
        raise MissingFlag("--task synthetic needs --features (a held-out feature set made by vlp precompute)")
    storage = validate(StorageConfig, {k: v for k, v in {"endpoint_url": args.endpoint_url}.items() if v})
    gen = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    rep = evaluate(args.model, args.features, storage, max_samples=args.max_samples, generate=not args.no_generate,
                   pooler=args.pooler, without=args.without, batch_size=args.batch_size or EVAL_BATCH_SIZE, **gen)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"eval {args.model} on {args.features} (pooler {rep['pooler']}"
          f"{f', {args.without} items withheld' if args.without else ''})")
    print(f"  {'question':<21} {'n':>4} {'choice acc':>10} {'gen acc':>8} {'chance':>7}")
    for k, v in rep["by_type"].items():
        gen = f"{v['gen_acc']:.2f}" if v["gen_acc"] is not None else "-"
        print(f"  {k:<21} {v['n']:>4} {v['choice_acc']:>10.2f} {gen:>8} {v['chance']:>7.2f}")
    return 0


def _cmd_eval_grounding(args) -> int:
    """``vlp eval --task temporal_grounding|referring --features SET``: the set's grounding questions, scored."""
    from .config import validate
    from .eval.common import MissingFlag
    from .eval.grounded import evaluate_grounding
    from .storage import StorageConfig

    if not args.features:
        raise MissingFlag(f"--task {args.task} needs --features (a feature set packed with grounding truth)")
    storage = validate(StorageConfig, {k: v for k, v in {"endpoint_url": args.endpoint_url}.items() if v})
    out = args.out or f"runs/eval/{args.task}-{args.features.rstrip('/').rsplit('/', 1)[-1]}"
    rep = evaluate_grounding(args.model, args.features, args.task, storage, args.max_samples,
                             args.max_new_tokens or 64, out, args.batch_size or EVAL_BATCH_SIZE)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    base = rep["constant_baseline"]
    print(f"eval {args.model}: {args.task} on {args.features} ({rep['metrics']['n']} questions) -> "
          f"{out}/results.json")
    for k, v in rep["metrics"].items():
        if k != "n":
            print(f"  {k:<9} {v:.3f}")
    print(f"  best constant answer {base['answer']}: {base['metric']} {base['value']:.3f}")
    print(f"  unreadable answers (scored 0): {rep['unparseable_n']}"
          + "".join(f"\n    {u['id']}: {u['answer'][:60]!r}" for u in rep["unparseable"][:5]))
    return 0


def _cmd_eval_benchmark(args) -> int:
    """``vlp eval --task videoqa|mcq``: a benchmark's questions file about videos under --media-root."""
    from pathlib import Path

    from .eval.common import MissingFlag

    missing = [f for f, v in (("--questions", args.questions), ("--media-root", args.media_root)) if not v]
    if missing:
        raise MissingFlag(f"--task {args.task} needs {' and '.join(missing)}")
    out = args.out or str(Path("runs") / "eval" / f"{args.task}-{Path(args.questions).stem}")
    if args.task == "videoqa":
        from .eval.videoqa import evaluate_videoqa

        rep = evaluate_videoqa(args.model, args.questions, args.answers, args.media_root, out, args.qa_format,
                               args.max_samples, args.max_new_tokens or 32, args.video_map,
                               args.batch_size or EVAL_BATCH_SIZE)
    else:
        from .eval.mcq import evaluate_mcq

        rep = evaluate_mcq(args.model, args.questions, args.media_root, out, args.max_samples)
    table = rep.pop("table")
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"eval {args.model}: {args.task} on {args.questions} -> {out}/results.json")
    print(table, end="")
    return 0


class _AudioArg(argparse.Action):
    """``--audio FILE``: appended to the media in the order given; its position is remembered as one to take the
    sound of (``args.audio``)."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.media = [*(namespace.media or []), value]
        namespace.audio = [*(getattr(namespace, "audio", None) or []), len(namespace.media) - 1]


def _cmd_chat(args) -> int:
    from .chat import run_chat

    return run_chat(args.model, args.media or [], args.question, max_new_tokens=args.max_new_tokens,
                    do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-5), top_p=args.top_p,
                    audio=args.audio or [], with_audio=args.with_audio)


def _cmd_infer(args) -> int:
    from .infer import InferConfig, run_infer

    cfg = _load(InferConfig, args)
    if cfg is not None:
        run_infer(cfg)
    return 0


def _cmd_serve(args) -> int:
    from .serve import ServeConfig

    cfg = _load(ServeConfig, args)
    if cfg is not None:
        from .serve.app import run_serve

        run_serve(cfg)
    return 0


def _cmd_demo(args) -> int:
    from .synth.demo import DemoConfig, run_demo

    cfg = _load(DemoConfig, args)
    if cfg is not None:
        run_demo(cfg)
    return 0


def _add_export_parser(sub) -> None:
    sp = sub.add_parser("export", help="write a trained model as a Hugging Face checkpoint transformers loads")
    sp.add_argument("--model", required=True, help="export folder or run folder (its export/) of a trained run")
    sp.add_argument("--format", default="hf", choices=["hf", "llava-hf", "vlp-hf"],
                    help="llava-hf: LlavaForConditionalGeneration (models that map onto it exactly); vlp-hf: "
                    "AutoModelForCausalLM with trust_remote_code (vlp's parts; needs vlp installed); hf: llava-hf "
                    "where the model maps, else vlp-hf")
    sp.add_argument("--out", required=True, help="folder to write")
    sp.set_defaults(fn=_cmd_export)


def _cmd_export(a) -> int:
    from .formats.hf import export_hf

    export_hf(a.model, a.out, a.format)
    return 0


def _cmd_presets(args) -> int:
    from .models.presets import PRESETS, resolve_model_path

    for name in PRESETS.names():
        print(f"preset:{name} -> {resolve_model_path('preset:' + name)}")
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def _add_eval_parser(sub) -> None:
    """``vlp eval``'s flags (synthetic held-out features, or a benchmark's files with --task)."""
    sp = sub.add_parser("eval", help="accuracy on the synthetic held-out features, or a video QA / multiple-choice "
                        "benchmark (--task)")
    sp.add_argument("--model", required=True, help="export folder of a trained run")
    sp.add_argument("--task", choices=("synthetic", "videoqa", "mcq", *GROUNDING), default="synthetic",
                    help="synthetic: held-out feature set (--features); videoqa: open-ended QA (MSRVTT-QA, MSVD-QA, "
                    "ActivityNet-QA files); mcq: multiple choice by log-likelihood (Video-MME, MVBench files); "
                    "temporal_grounding / referring: a feature set with grounding truth (--features; R@1@IoU, mIoU / "
                    "Acc@0.5)")
    sp.add_argument("--features", help="held-out feature set (vlp precompute output); --task synthetic, "
                    "temporal_grounding, referring")
    sp.add_argument("--questions", help="benchmark questions JSON file; --task videoqa/mcq")
    sp.add_argument("--answers", help="answers JSON file of the activitynet format (test_a.json); --task videoqa")
    sp.add_argument("--media-root", help="folder holding the benchmark's videos; --task videoqa/mcq")
    sp.add_argument("--qa-format", default="auto", help="auto | activitynet | msrvtt (--task videoqa)")
    sp.add_argument("--video-map", help="MSVD-QA's youtube_mapping.txt (lines '<clip name> vid<N>'): video_id N is "
                    "the clip of that name under --media-root (--task videoqa)")
    sp.add_argument("--out", help="folder for predictions.json, results.json, results.md (--task videoqa/mcq: "
                    "default runs/eval/TASK-QUESTIONS_STEM; temporal_grounding/referring: runs/eval/TASK-SET_NAME)")
    sp.add_argument("--max-new-tokens", type=int, default=None,
                    help="answer length cap of greedy generation (synthetic 12, videoqa 32, grounding 64)")
    sp.add_argument("--pooler", default=None,
                    help="evaluate the export with another pooler than it was trained with (e.g. patch_mean on "
                    "valley-trained weights): a probe, not the pooling ablation, which is a stage 2 trained with "
                    "that pooler (vlp demo's train/stage2_patch_mean/export); --task synthetic")
    sp.add_argument("--without", choices=("image", "video", "audio"), default=None,
                    help="withhold the samples' items of this modality from the model (the sound ablation: --without "
                    "audio); --task synthetic")
    sp.add_argument("--max-samples", type=int, default=None, help="only the first N feature rows / questions")
    sp.add_argument("--batch-size", type=positive_int, default=None,
                    help=f"questions answered per batched generation (default {EVAL_BATCH_SIZE}; the answers do not "
                    "depend on it); --task synthetic, videoqa, temporal_grounding, referring")
    sp.add_argument("--no-generate", action="store_true", help="choice accuracy only (--task synthetic)")
    sp.add_argument("--endpoint-url", help="S3-compatible endpoint")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=_cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlp", description="vlp: video-language training platform")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--config", "-c", help="YAML config file (defaults built in when omitted)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.sampling.num_frames=8")
        sp.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        sp.set_defaults(fn=fn)
        return sp

    with_config("make-shards", _cmd_make_shards, "write synthetic WebVid/CC3M/instruction shards")
    sp = with_config("pack", _cmd_pack, "pack a dataset's annotation files + media folder into WebDataset shards")
    sp.add_argument("--format", help="llava | valley | videochatgpt | sharegpt | captions (= format.type)")
    sp.add_argument("--annotations", action="append", metavar="FILE_OR_GLOB",
                    help="annotation file, glob or folder (local or s3://); repeatable (= annotations)")
    sp.add_argument("--media-root", help="folder or s3:// prefix the media paths are relative to (= media_root)")
    sp.add_argument("--out", help="output folder or s3:// prefix (= out)")
    with_config("precompute", _cmd_precompute, "decode shards and precompute frozen CLIP features")
    with_config("train", _cmd_train, "train a VideoLLM on feature sets (DeepSpeed on Ray Train)")
    with_config("infer", _cmd_infer, "batch inference over a shard set (answers next to keys)")
    with_config("demo", _cmd_demo, "run the built-in tiny end-to-end demo")
    with_config("serve", _cmd_serve, "serve an export: OpenAI-compatible chat API on Ray Serve (Ctrl-C stops)")
    sp = sub.add_parser("inspect", help="summarise a shard set or a feature set")
    sp.add_argument("uri", nargs="+", help="feature-set folder, or shard specs (folders, globs, brace ranges, s3://)")
    sp.add_argument("--endpoint-url", help="S3-compatible endpoint")
    sp.add_argument("--no-decode", action="store_true", help="do not open media to count frames")
    sp.add_argument("--max-samples", type=int, default=None)
    sp.add_argument("--max-sample-bytes", type=int, default=None,
                    help="refuse a sample holding more than this (data.sample.max_sample_bytes; default 1 GiB)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=_cmd_inspect)
    _add_eval_parser(sub)
    sp = sub.add_parser("chat", help="ask a trained model about videos, images and sounds (multi-turn without a "
                        "question)")
    sp.add_argument("--model", required=True, help="export folder of a trained run")
    sp.add_argument("--video", dest="media", action="append", help="video file (mp4, webm, avi, ...); repeatable")
    sp.add_argument("--image", dest="media", action="append", help="image file; repeatable (items keep the order "
                    "given; <image>/<video>/<audio> in the question place them, else they go in front of it)")
    sp.add_argument("--audio", dest="media", action=_AudioArg, help="audio file (wav, flac, mp3, m4a, ...) or a "
                    "video whose soundtrack to use; repeatable (a model trained with audio features)")
    sp.add_argument("--with-audio", action="store_true", help="follow each --video with its soundtrack as an "
                    "<audio> item")
    sp.add_argument("question", nargs="?", help="one question; omit for an interactive session")
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.set_defaults(fn=_cmd_chat, audio=[])
    _add_export_parser(sub)
    sp = sub.add_parser("config-docs", help="print the configuration reference (Markdown)")
    sp.set_defaults(fn=lambda a: (print(__import__("vlp.configdoc", fromlist=["x"]).config_reference()), 0)[1])
    sp = sub.add_parser("presets", help="build (if needed) and list the tiny model presets")
    sp.set_defaults(fn=_cmd_presets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:  # the one handler of user mistakes: their message, no traceback
        print(f"vlp {args.cmd}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
