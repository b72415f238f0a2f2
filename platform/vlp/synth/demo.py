"""``vlp demo`` / ``jobs/pipeline.py``: the whole platform on one machine, tiny defaults.

shards -> three feature sets (caption pretraining, instructions, held-out) -> stage 1 (connector, ZeRO-1)
-> stage 2 (connector + LLM, ZeRO-2) -> the pooling ablation (stage 2 again from the same stage-1 connector,
same data and steps, pooler ``patch_mean``: no per-frame CLS tokens) -> evaluation of both on the held-out
split -> answers -> report.
Everything lands in one run folder; re-running reuses every finished step.
"""

from __future__ import annotations

import json
from typing import Literal, Optional

from pydantic import Field, field_validator

from ..config import Cfg, ConfigError, dump_config, validate
from ..data.audio import AudioConfig
from ..data.media import SamplingConfig
from ..models.audio_towers import AUDIO_TOWERS, AudioTowerConfig
from ..models.connectors import CONNECTORS, ConnectorConfig
from .shards import SYNTH_VERSION, MakeShardsConfig, make_shards
from ..inspect_ import format_report, inspect_features
from ..models.towers import TOWERS, TowerConfig
from ..precompute import PrecomputeConfig, run_precompute
from ..runlog import ray_output
from ..runtime import RayConfig
from ..storage import get_fs, join, make_output_dir


class DemoShardsConfig(MakeShardsConfig):
    out: str = Field("", description="empty: <root>/shards")
    videos: int = 96
    images: int = 32
    instructions: int = 192
    heldout: int = 32
    samples_per_shard: int = 32
    num_frames: int = 8
    image_fraction_in_instructions: float = 0.0


class DemoStageConfig(Cfg):
    epochs: int = Field(..., ge=1)
    lr: float = Field(..., gt=0)
    global_batch: int = Field(16, ge=1)
    micro_batch: int = Field(8, ge=1)
    zero_stage: int = Field(1, ge=0, le=2)


class DemoConfig(Cfg):
    """Everything the demo does, with tiny defaults (a few minutes on 2 CPU cores)."""

    root: str = Field("runs/demo", description="run folder holding everything")
    shards: DemoShardsConfig = DemoShardsConfig()
    sampling: SamplingConfig = SamplingConfig()
    tower: TowerConfig = TOWERS.config(path="preset:tiny-clip-synth")
    mode: str = Field("valley_pooled", pattern="^(frames|valley_pooled)$")
    llm: str = Field("preset:tiny-llama", description="causal LM for training")
    connector: ConnectorConfig = Field(CONNECTORS.config(), description="the connector both stages train (its "
                                       "trainable/init_from are set by the stages)")
    stage1: DemoStageConfig = DemoStageConfig(epochs=3, lr=2e-3, zero_stage=1)
    stage2: DemoStageConfig = DemoStageConfig(epochs=100, lr=3e-3, global_batch=32, micro_batch=16, zero_stage=2)
    train: bool = Field(True, description="false: stop after the feature sets")
    num_workers: int = Field(2, ge=1)
    ablation_pooler: Optional[str] = Field(
        "patch_mean", description="also train stage 2 with this pooler (same data, steps, stage-1 connector) and "
        "evaluate it next to valley; null: skip the ablation")
    audio_tower: AudioTowerConfig = Field(
        AUDIO_TOWERS.config(path="preset:tiny-ast-synth"), description="with shards.audio: the tower the clips' "
        "soundtracks are encoded with")
    audio: AudioConfig = Field(AudioConfig(segment_seconds=1.28), description="with shards.audio: how soundtracks "
                               "are cut (one 1.28 s segment: tiny-ast-synth's 128 frames)")
    answers: int = Field(6, ge=0, description="held-out questions answered in the report")
    executor: Literal["auto", "ray", "local"] = Field("auto", description="where the feature sets are computed "
                                                      "(vlp precompute's executor)")
    ray: RayConfig = RayConfig()
    run_name: Optional[str] = None


    @field_validator("ablation_pooler")
    @classmethod
    def _known_pooler(cls, v):
        from ..models.poolers import POOLERS

        return None if v is None else POOLERS.validate(v)


WITHOUT_AUDIO = "stage2 (valley), no audio"  # the sound ablation's row: the same model, audio items withheld
FEATURE_SETS = {"pretrain": ("webvid", "cc3m"), "instruct": ("instruct",), "heldout": ("heldout",)}
_COUNT = {"webvid": "videos", "cc3m": "images", "instruct": "instructions", "heldout": "heldout"}


def _train_cfg(cfg: DemoConfig, name: str, st: DemoStageConfig, **kw):
    from ..train import TrainConfig

    return validate(TrainConfig, {
        "run_name": name, "output_dir": join(cfg.root, "train"), "stage": name, "epochs": st.epochs,
        "batch": {"global_size": st.global_batch, "micro_size": st.micro_batch},
        "optim": {"lr": st.lr}, "deepspeed": {"zero_stage": st.zero_stage},
        "scaling": {"num_workers": cfg.num_workers, "cpus_per_worker": 0.5},
        "checkpoint": {"every_n_steps": 150, "keep_last": 1}, "ray": cfg.ray.model_dump()} | kw)


def _check_same_shards(old: dict, new: dict, where: str) -> None:
    """Reusing shards made with other settings would silently train on the wrong data: refuse instead."""
    if old.get("synth_version") != new["synth_version"]:
        problems = [("shards", f"the shards in {where} were made by an older shard generator (version "
                               f"{old.get('synth_version')}, now {new['synth_version']})")]
    else:
        # a setting added after the shards were made (shards.audio) was at its default then
        made = {**MakeShardsConfig().model_dump(mode="json"), **old}
        problems = [(f"shards.{k}", f"the shards in {where} were made with {made.get(k)!r}, this config says {v!r}")
                    for k, v in new.items() if k != "storage" and made.get(k) != v]
    if problems:
        problems.append(("root", "use another root, or delete the old shards (and the features/train folders "
                                 "made from them) to rebuild"))
        raise ConfigError(problems, source="demo re-run")


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """shards -> feature sets -> stage 1 -> stage 2 (+ the ablation) -> evaluation -> report; see the module doc."""
    fs, root = make_output_dir(cfg.root, "root")
    with fs.open(join(root, "demo_config.yaml"), "w") as f:
        f.write(dump_config(cfg))
    with ray_output(cfg.root, cfg.ray.verbose, log=log) as log:  # everything Ray prints: <root>/logs/ray.log
        return demo_steps(cfg, log)


def demo_steps(cfg: DemoConfig, log) -> dict:
    """:func:`run_demo`'s steps, in its run folder."""
    n_steps = (7 if cfg.ablation_pooler is not None else 6) if cfg.train else 2
    shards_cfg, written = demo_shards(cfg, n_steps, log)
    results: dict = {"shards": written, "features": {}}
    features = demo_features(cfg, shards_cfg, n_steps, results, log)
    if not cfg.train:
        log(f"[vlp] demo outputs are in {cfg.root}/")
        return results
    s1, s2, sa = demo_train(cfg, features, n_steps, log)
    runs = {"stage1": s1["run_dir"], "stage2": s2["run_dir"]}
    if sa is not None:
        runs[ablation_run(cfg)] = sa["run_dir"]
    models = {"stage2 (valley)": s2} | ({f"stage2 ({cfg.ablation_pooler})": sa} if sa is not None else {})
    step = 6 if sa is not None else 5
    evals = demo_evaluate(cfg, models, features["heldout"], f"{step}/{n_steps}", log)
    answers = evals["stage2 (valley)"]["examples"][: cfg.answers]
    for a in answers:
        log(f"[vlp]   {a['uid']}: {a['question']} -> {a['generated'].strip()!r} (truth: {a['truth']})")
    log(f"[vlp] step {step + 1}/{n_steps} report")
    from .report import make_report

    report = make_report(join(cfg.root, "report"), runs, features, evals, answers)
    log(f"[vlp] demo done. Run folder: {cfg.root}/  report: {report}  model: {s2['export']}")
    results.update(stage1=s1, stage2=s2, ablation=sa, eval=evals, report=str(report))
    return results


def demo_shards(cfg: DemoConfig, n_steps: int, log) -> tuple[MakeShardsConfig, Optional[dict]]:
    """Step 1: write the synthetic shards, or reuse those of an earlier run made with the same settings."""
    shards_cfg = cfg.shards.model_copy(update={"out": cfg.shards.out or join(cfg.root, "shards")})
    marker = join(shards_cfg.out, "_SUCCESS")
    sfs, _ = get_fs(shards_cfg.out)
    made_with = {**shards_cfg.model_dump(mode="json"), "synth_version": SYNTH_VERSION}
    if sfs.exists(marker):
        recorded = sfs.cat(marker).decode()
        # run folders of vlp before the check hold a bare "ok": made by synth version 1
        _check_same_shards(json.loads(recorded) if recorded.lstrip().startswith("{") else {"synth_version": 1},
                           made_with, shards_cfg.out)
        log(f"[vlp] step 1/{n_steps} shards: reused {shards_cfg.out}")
        return shards_cfg, None
    log(f"[vlp] step 1/{n_steps} shards: writing synthetic shards to {shards_cfg.out}")
    written = make_shards(shards_cfg)
    with sfs.open(marker, "w") as f:
        f.write(json.dumps(made_with, indent=2))
    return shards_cfg, written


def demo_features(cfg: DemoConfig, shards_cfg: MakeShardsConfig, n_steps: int, results: dict, log) -> dict:
    """Step 2: the three feature sets ({name: uri}); their inspect reports go to ``results["features"]``."""
    features = {}
    for name, families in FEATURE_SETS.items():
        specs = [join(shards_cfg.out, f"{fam}-*.tar") for fam in families if getattr(shards_cfg, _COUNT[fam]) > 0]
        if not specs:
            continue
        sound = {"audio_tower": cfg.audio_tower} if cfg.shards.audio else {}
        pc = PrecomputeConfig(
            run_name=name, executor=cfg.executor, data={"shards": specs, "sampling": cfg.sampling, "audio": cfg.audio},
            encoder={"tower": cfg.tower, **sound}, output={"uri": join(cfg.root, "features", name), "mode": cfg.mode},
            ray=cfg.ray)
        log(f"[vlp] step 2/{n_steps} features: {name} <- {', '.join(families)}")
        run_precompute(pc, log=log)
        rep = inspect_features(pc.output.uri)
        log(format_report(rep))
        results["features"][name] = rep
        features[name] = pc.output.uri
    return features


def _connector(cfg: DemoConfig) -> dict:
    """The connector both stages train, less what each stage sets (trainable, init_from)."""
    return cfg.connector.model_dump(mode="json", exclude={"trainable", "init_from"})


def stage1_config(cfg: DemoConfig, features: dict):
    """Stage 1's TrainConfig: the connector on the caption set, LLM frozen."""
    return _train_cfg(cfg, "stage1", cfg.stage1, data={
        "sets": [{"uri": features["pretrain"]}], "template": "plain", "max_length": 512},
        model={"llm": {"path": cfg.llm}, "connector": _connector(cfg)})


def ablation_run(cfg: DemoConfig) -> str:
    """The run name of the pooling ablation's stage 2 (``stage2_<pooler>``)."""
    return f"stage2_{cfg.ablation_pooler}"


def stage2_configs(cfg: DemoConfig, features: dict, stage1_export: str) -> dict:
    """{run name: TrainConfig} of stage 2 (connector + LLM on the instructions, from stage 1's connector) and,
    unless ``ablation_pooler`` is null, the ablation: the same run with that pooler."""
    data = {"sets": [{"uri": features["instruct"]}], "template": "vicuna_v1", "max_length": 512}
    model = {"llm": {"path": cfg.llm, "trainable": True}, "connector": {**_connector(cfg), "init_from": stage1_export}}
    out = {"stage2": _train_cfg(cfg, "stage2", cfg.stage2, data=data, model=model)}
    if cfg.ablation_pooler is not None:
        name = ablation_run(cfg)
        out[name] = _train_cfg(cfg, name, cfg.stage2, stage="stage2", data=data,
                               model={**model, "pooler": {"type": cfg.ablation_pooler}})
    return out


def demo_train(cfg: DemoConfig, features: dict, n_steps: int, log) -> tuple[dict, dict, Optional[dict]]:
    """Steps 3-5: stage 1, stage 2 and (unless ablation_pooler is null) stage 2 again with the ablation pooler."""
    from ..train import run_train

    log(f"[vlp] step 3/{n_steps} stage 1: connector on captions, LLM frozen, ZeRO-{cfg.stage1.zero_stage}")
    s1 = run_train(stage1_config(cfg, features), log=log)
    log(f"[vlp] step 4/{n_steps} stage 2: connector + LLM on conversations, ZeRO-{cfg.stage2.zero_stage}")
    configs = stage2_configs(cfg, features, s1["export"])
    s2 = run_train(configs["stage2"], log=log)
    if cfg.ablation_pooler is None:
        return s1, s2, None
    log(f"[vlp] step 5/{n_steps} ablation: stage 2 again with pooler {cfg.ablation_pooler} "
        "(same stage-1 connector, data and steps)")
    sa = run_train(configs[ablation_run(cfg)], log=log)
    return s1, s2, sa


def demo_evaluate(cfg: DemoConfig, models: dict, heldout: str, step: str, log) -> dict:
    """Evaluate every trained model on the held-out features, or reuse eval.json when every model was reused
    (their configs checked equal by run_train) and evaluated on the same features; writes eval.json."""
    from ..eval.synthetic import evaluate

    fs, root = get_fs(cfg.root)
    eval_path = join(root, "eval.json")
    old = json.loads(fs.cat(eval_path)) if fs.exists(eval_path) else None
    names = set(models) | ({WITHOUT_AUDIO} if cfg.shards.audio else set())
    if old is not None and all(m["reused"] for m in models.values()) and set(old) == names and all(
            old[n]["export"] == str(m["export"]) and old[n]["features"] == heldout for n, m in models.items()):
        log(f"[vlp] step {step} evaluation: reused {eval_path}")
        evals = old
    else:
        log(f"[vlp] step {step} evaluation on the held-out split")
        # the ablation by choice accuracy only: greedy generation would double the evaluation time for a number
        # it does not need (in our runs generated accuracy equalled choice accuracy to the clip)
        s2 = models["stage2 (valley)"]
        evals = {n: evaluate(m["export"], heldout, generate=(m is s2)) for n, m in models.items()}
        if cfg.shards.audio:  # the sound ablation: the same model, its clips' <audio> items withheld
            evals[WITHOUT_AUDIO] = evaluate(s2["export"], heldout, generate=False, without="audio")
    for name, e in evals.items():
        for q, v in e["by_type"].items():
            gen = "-" if v.get("gen_acc") is None else f"{v['gen_acc']:.2f}"
            log(f"[vlp]   {name:<22} {q:<21} choice {v['choice_acc']:.2f}  generated {gen:<4}  "
                f"(chance {v['chance']:.2f})")
    if len(evals) > 1 and all("direction_vs_opposite" in e["by_type"] for e in evals.values()):
        log("[vlp] what the per-frame CLS tokens buy: direction of motion (chance 0.25) / direction vs its opposite "
            "(chance 0.50): " + ", ".join(f"{n} {e['by_type']['direction']['choice_acc']:.2f} / "
                                         f"{e['by_type']['direction_vs_opposite']['choice_acc']:.2f}"
                                         for n, e in evals.items()))
    if WITHOUT_AUDIO in evals:
        log("[vlp] what the <audio> item buys: the word the sound names (chance 0.25): " + ", ".join(
            f"{n} {e['by_type']['sound']['choice_acc']:.2f}" for n, e in evals.items() if "sound" in e["by_type"]))
    with fs.open(eval_path, "w") as f:
        f.write(json.dumps(evals, indent=2))
    return evals
