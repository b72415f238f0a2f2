"""``vlp train``: checks, memory preflight, the Ray Data graph and the Ray Train ``TorchTrainer``."""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import yaml

from ..config import ConfigError, dump_config
from ..errors import UserError
from ..models.videollm import feature_mode_problems, frame_times_problems
from ..formats.export import MODEL_CONFIG, ExportInfo
from ..formats.featureset import FeatureSetInfo
from ..formats.records import RecordError
from ..runlog import LOG_FILE, one_line, ray_output, to_logs
from ..storage import get_fs, join, make_output_dir
from ..writer_lock import WriterBusy, WriterLock
from .config import TrainConfig
from .data import DropSeen, Mixture, TagSet, Tokenize, feature_set_info, mixture_passes
from .memory import BF16_GPUS, GPU_MEMORY_GB, LMShape, Plan, Preflight, Workload, preflight, resolve_precision


class TrainSetupError(UserError, ValueError):
    """The run cannot start; the message says why and what would work."""


class TrainingFailed(UserError):
    """Ray Train gave up on the run (a worker failed more than max_failures times): the failure on one line; the
    tracebacks are in the run's logs/ray.log. Exit code 1: the run folder keeps its checkpoints, and the same
    command resumes from the last one."""

    exit_code = 1


def param_counts(cfg: TrainConfig) -> tuple[int, int]:
    """(trainable, frozen) parameter counts without allocating weights (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.connectors import CONNECTORS
    from ..models.pixel_tower import PixelTower
    from ..models.videollm import feature_widths

    lcfg = AutoConfig.from_pretrained(cfg.model.llm.config_source())
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(lcfg)
        d_model = llm.get_input_embeddings().weight.shape[1]
        conn = CONNECTORS.part(cfg.model.connector).build_for(feature_widths(cfg.model), d_model)
        tower = PixelTower(cfg.model.tower, weights=False) if cfg.model.tower is not None else None
    n_llm = sum(p.numel() for p in llm.parameters())
    n_conn = sum(p.numel() for p in conn.parameters())
    n_tower = sum(p.numel() for p in tower.parameters()) if tower is not None else 0
    n_tower_trained = sum(p.numel() for p in tower.parameters() if p.requires_grad) if tower is not None else 0
    trainable = (n_conn if cfg.model.connector.trainable else 0) + n_tower_trained
    if cfg.model.llm.trainable:
        trainable += n_llm
    elif cfg.lora.enabled:  # LoRA adds r x (in + out) per adapted linear layer
        lora = 0
        for name, mod in llm.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in cfg.lora.target_modules:
                lora += cfg.lora.r * (mod.in_features + mod.out_features)
        trainable += lora
    return trainable, n_llm + n_conn + n_tower - trainable


def mixed_encoders(infos: list[FeatureSetInfo]) -> list[str]:
    """Sets of one run must come from the same tower, layer and preprocessing (sampling may differ: images vs
    videos); the export records the first set's, which chat/infer then reproduce for every input."""
    out = []
    ref = infos[0].fingerprint
    for i, inf in enumerate(infos[1:], 1):
        fp = inf.fingerprint
        for part, a, b in (("encoder", ref.encoder, fp.encoder), ("preprocess", ref.preprocess, fp.preprocess)):
            diff = _diff(a.to_json() if a else {}, b.to_json() if b else {})
            if diff:
                out.append(f"data.sets[{i}]: made with another {part} than data.sets[0] "
                           f"({', '.join(f'{k}: {a!r} vs {b!r}' for k, a, b in diff)})")
    heard = [(i, inf.fingerprint.audio) for i, inf in enumerate(infos) if inf.fingerprint.audio is not None]
    for i, a in heard[1:]:  # sets with audio: one audio tower and one way of cutting (the export records one)
        diff = _diff(heard[0][1].to_json(), a.to_json())
        if diff:
            out.append(f"data.sets[{i}]: made with another audio tower or audio cuts than data.sets[{heard[0][0]}] "
                       f"({', '.join(f'{k}: {x!r} vs {y!r}' for k, x, y in diff)})")
    return out


def fill_widths(cfg: TrainConfig, infos: list[FeatureSetInfo]) -> list[str]:
    """Fill model.vision_hidden_size / audio_hidden_size from the sets (or check them against the sets), and
    check the connector takes those widths. -> the problems."""
    from ..models.connectors import CONNECTORS
    from ..models.videollm import feature_widths

    problems = []
    for field, what in (("vision_hidden_size", "hidden_size"), ("audio_hidden_size", "audio_hidden_size")):
        sizes = sorted({getattr(inf, what) for inf in infos} - {None})
        if len(sizes) > 1:
            problems.append(f"data.sets: feature sets have different {field.split('_')[0]} feature widths {sizes}")
        have = getattr(cfg.model, field)
        if sizes and have is None:
            setattr(cfg.model, field, sizes[0])
        elif sizes and have != sizes[0]:
            problems.append(f"model.{field}={have} does not match the feature set's hidden size {sizes[0]}")
    if problems:
        return problems
    problems += fill_tower(cfg, infos[0].fingerprint) if cfg.model.tower is not None else []
    part = CONNECTORS.part(cfg.model.connector)
    problems += part.width_problems(feature_widths(cfg.model)) + part.item_problems(item_extents(infos))
    init = cfg.model.connector.init_from
    if not problems and init and exists(init):
        import torch

        from ..formats.export import connector_fit_problems

        with torch.device("meta"):
            module = part.build_for(feature_widths(cfg.model), _llm_width(cfg))
        problems += connector_fit_problems(module, init)
    return problems


def fill_tower(cfg: TrainConfig, fp) -> list[str]:
    """Fill model.tower.mean/std from the first set's fingerprint (the normalisation its pixel rows were cut for)
    and check the tower fits the sets' frames. -> the problems."""
    from ..models.pixel_tower import tower_problems

    t, pp = cfg.model.tower, fp.preprocess
    if pp is not None and pp.mean and pp.std:
        t.mean, t.std = t.mean or tuple(pp.mean), t.std or tuple(pp.std)
    return tower_problems(t, (pp.size if pp else None) or fp.encoder.image_size, cfg.model.vision_hidden_size)


def item_extents(infos: list[FeatureSetInfo]) -> dict[str, int]:
    """modality -> the most frames (audio: segments) an item of the sets may have, for the modalities they hold
    (their manifests' item counts; sets written before those were counted add nothing)."""
    out: dict[str, int] = {}
    for inf in infos:
        fp = inf.fingerprint
        for m in inf.manifest.totals.items_by_modality:
            if m == "audio":
                n = int(fp.audio.decode.get("max_segments", 1)) if fp.audio else 1
            elif m == "video":
                s = fp.sampling or {}
                n = int((s.get("num_frames") if s.get("mode", "uniform") == "uniform" else s.get("max_frames")) or 1)
            else:
                n = 1
            out[m] = max(out.get(m, 0), n)
    return out


def _llm_width(cfg: TrainConfig) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(cfg.model.llm.config_source()).hidden_size)


def exists(uri: str) -> bool:
    """Whether a local path or an object-store URI (an earlier stage's export on S3) exists."""
    fs, path = get_fs(uri)
    return fs.exists(path)


def check_inputs(cfg: TrainConfig) -> list[dict]:
    """What can be checked without Ray: the feature sets (present, complete, one encoder) and the stage-1
    connector. -> the sets' infos; TrainSetupError listing every problem. Fills model.vision_hidden_size and
    audio_hidden_size."""
    problems = []
    infos = []
    for i, s in enumerate(cfg.data.sets):
        try:
            infos.append(feature_set_info(s.uri, s.storage))
        except (FileNotFoundError, RecordError) as e:  # RecordError: a format this vlp does not read
            problems.append(f"data.sets[{i}].uri: {e}")
    if infos:
        problems += fill_widths(cfg, infos)
        problems += mixed_encoders(infos)
        problems += feature_mode_problems(cfg.model, [inf.mode for inf in infos])
    problems += frame_times_problems(cfg.model)
    if cfg.model.connector.init_from and not exists(cfg.model.connector.init_from):
        problems.append(f"model.connector.init_from: {cfg.model.connector.init_from} does not exist")
    init = cfg.model.llm.init_from
    if init and not exists(join(init, "llm", "config.json")):
        problems.append(f"model.llm.init_from: no export with an llm/ at {init} (point it at an earlier stage's "
                        "export folder)")
    if problems:
        raise TrainSetupError("cannot start training:\n  - " + "\n  - ".join(problems))
    return infos


def check_setup(cfg: TrainConfig, log=print) -> dict:
    """Everything that can be checked before a worker starts. Raises TrainSetupError listing every problem."""
    infos = check_inputs(cfg)
    trainable, frozen = param_counts(cfg)
    if cfg.scaling.use_gpu:
        gb = cfg.scaling.device_memory_gb or _detect_gpu_gb()
    else:
        import psutil

        gb = cfg.scaling.device_memory_gb or psutil.virtual_memory().total / 2**30 / cfg.scaling.num_workers
    precision = resolve_precision(cfg.deepspeed.precision, cfg.scaling.use_gpu,
                                  _gpu_bf16_supported() if cfg.scaling.use_gpu else False)
    pf = memory_preflight(cfg, trainable, frozen, precision, gb, log)
    n_epoch = sum(int(inf.samples * s.weight) for inf, s in zip(infos, cfg.data.sets))
    steps_per_epoch = n_epoch // cfg.batch.global_size
    if steps_per_epoch == 0:
        raise TrainSetupError(f"batch.global_size={cfg.batch.global_size} is larger than an epoch ({n_epoch} samples)")
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return {"infos": infos, "trainable": trainable, "frozen": frozen, "total_steps": total,
            "samples_per_epoch": n_epoch, "preflight": pf.message if pf else None, "precision": precision,
            "memory": pf.to_json() if pf else None}


def memory_workload(cfg: TrainConfig, trainable: int, frozen: int, precision: str) -> tuple[Workload, Plan]:
    """What the preflight counts for the run: its parameters, the LM's shape (from its config.json), samples of
    data.max_length tokens, and the settings :func:`vlp.train.memory.recommend` may change. vlp checkpoints the
    LM's layers only when it is trained (``model.llm.trainable``); LoRA adapters make the LM keep its
    activations as a trained one."""
    from transformers import AutoConfig

    llm = cfg.model.llm
    lm = LMShape.of(AutoConfig.from_pretrained(llm.config_source()))
    ds = cfg.deepspeed
    work = Workload(trainable, frozen, precision, lm, cfg.data.max_length, trained_lm=llm.trainable or cfg.lora.enabled,
                    can_checkpoint=llm.trainable, attn=llm.attn_implementation, bucket_elems=ds.reduce_bucket_size,
                    prefetch_elems=ds.stage3_prefetch_bucket_size, global_size=cfg.batch.global_size)
    plan = Plan(ds.zero_stage, cfg.scaling.num_workers, cfg.batch.micro_size,
                llm.gradient_checkpointing and llm.trainable, *ds.offloads())
    return work, plan


def memory_preflight(cfg: TrainConfig, trainable: int, frozen: int, precision: str, gb: Optional[float],
                     log=print) -> Optional[Preflight]:
    """The preflight report (:func:`vlp.train.memory.preflight`) printed. A run whose model states do not fit stops
    here (TrainSetupError with the report); one where only a micro-batch of max_length-token samples would not
    fit stops under ``scaling.memory_preflight: strict`` and otherwise starts with the report as a warning. None
    when the device memory is unknown."""
    if not gb:
        log("[vlp] memory preflight skipped: device memory unknown (set scaling.device_memory_gb)")
        return None
    pf = preflight(*memory_workload(cfg, trainable, frozen, precision), gb)
    if not pf.fits and (not pf.states_fit or cfg.scaling.memory_preflight == "strict"):
        raise TrainSetupError(f"memory preflight: {pf.message}")
    if not pf.fits:
        log(f"[vlp] memory preflight, warning: the model states fit, a micro-batch of {cfg.data.max_length}-token "
            f"samples would not (scaling.memory_preflight=strict stops here): {pf.message}")
    else:
        log(f"[vlp] memory preflight: {pf.message}")
    return pf


def _gpu_bf16_supported():
    """bf16 support of the training GPUs as seen from the driver: the local GPU if there is one, else Ray's
    accelerator type; None when unknown (then ``auto`` is counted as fp32, the larger count)."""
    import ray

    try:
        import torch

        if torch.cuda.is_available():
            return bool(torch.cuda.is_bf16_supported())
    except Exception:
        pass
    types = [k.split(":", 1)[1] for k in (ray.cluster_resources() if ray.is_initialized() else {})
             if k.startswith("accelerator_type:")]
    if not types:
        return None
    return all(any(name in t for name in BF16_GPUS) for t in types)


def _detect_gpu_gb():
    import ray

    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:
        pass
    for key in ray.cluster_resources():
        if key.startswith("accelerator_type:"):
            t = key.split(":", 1)[1]
            for name, gb in GPU_MEMORY_GB.items():
                if name.split("-")[0] in t:
                    return gb
    return None


def scaling_kwargs(cfg: TrainConfig) -> dict:
    """Arguments of Ray Train's ``ScalingConfig``: one GPU per worker when use_gpu (of accelerator_type
    when set), plus the worker's CPUs. These are the requests the autoscaler scales GPU nodes on."""
    s = cfg.scaling
    res = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    return {"num_workers": s.num_workers, "use_gpu": s.use_gpu, "resources_per_worker": res,
            "accelerator_type": s.accelerator_type}


def should_materialize(cfg: TrainConfig) -> bool:
    """``data.materialize``: always / never, or auto = the sets' stored bytes are within the limit."""
    if cfg.data.materialize != "auto":
        return cfg.data.materialize == "always"
    total = 0
    for s in cfg.data.sets:
        fs, root = get_fs(s.uri, s.storage)
        total += fs.du(root)
    return total <= cfg.data.materialize_max_mb * 2**20


def tokenize_stage(cfg: TrainConfig) -> Tokenize:
    return Tokenize(cfg.model.llm.tokenizer_source(), cfg.data.template, cfg.data.max_length,
                    cfg.data.overlong, cfg.model.model_dump(mode="json"))


def build_held(cfg: TrainConfig) -> list[dict]:
    """The held path (:mod:`vlp.train.held`): each set read, tagged and tokenised once, materialised in Ray's
    object store; per set its weight and block refs, which the workers plan every epoch from."""
    from ..formats.featureset import open_feature_dataset

    held = []
    for i, s in enumerate(cfg.data.sets):
        ds = open_feature_dataset(s.uri, s.storage, decode=False)
        ds = ds.map_batches(TagSet(f"s{i}", s.format), batch_format="numpy", batch_size=256,
                            num_cpus=cfg.scaling.data_cpus_per_task)
        ds = ds.map_batches(tokenize_stage(cfg), batch_format="numpy", batch_size=64,
                            num_cpus=cfg.scaling.data_cpus_per_task).materialize()
        refs = [b.ref for rb in ds.iter_internal_ref_bundles() for b in rb.blocks]  # keep the blocks alive
        held.append({"weight": s.weight, "blocks": refs})
    return held


def set_parts(cfg: TrainConfig) -> list[list[str]]:
    """Per set its committed part URIs, in the order the streaming path numbers its units
    (:mod:`vlp.train.progress`); computed once on the driver and handed to the graph and the workers."""
    from ..formats.featureset import feature_parts

    return [feature_parts(s.uri, s.storage) for s in cfg.data.sets]


def build_dataset(cfg: TrainConfig, state_path: str, parts: Optional[list[list[str]]] = None):
    """The streaming path: the Ray Data graph that Ray Train splits over the workers, re-executed every epoch
    (read -> Mixture per pass -> union -> DropSeen -> Tokenize; :mod:`vlp.train.data`). Rows carry their
    part's path into Mixture, which tags them with their unit (``parts``: :func:`set_parts`)."""
    from ..formats.featureset import feature_part_paths, open_feature_dataset

    parts = parts if parts is not None else set_parts(cfg)
    raw = {i: open_feature_dataset(s.uri, s.storage, decode=False, include_paths=True)
           for i, s in enumerate(cfg.data.sets)}
    ds = None
    for k in range(max(mixture_passes(s.weight) for s in cfg.data.sets)):  # pass k holds every set's copy k
        for i, s in enumerate(cfg.data.sets):
            if k >= mixture_passes(s.weight):
                continue
            part = raw[i].map_batches(
                Mixture(f"s{i}", s.weight, cfg.data.seed, state_path, s.format, copy=k,
                        parts=feature_part_paths(parts[i], s.storage)),
                batch_format="numpy", batch_size=256, num_cpus=cfg.scaling.data_cpus_per_task)
            ds = part if ds is None else ds.union(part)
    ds = ds.map_batches(DropSeen(state_path, cfg.data.sets, parts, cfg.data.seed), batch_format="numpy",
                        batch_size=256, num_cpus=cfg.scaling.data_cpus_per_task)
    return ds.map_batches(tokenize_stage(cfg), batch_format="numpy", batch_size=64,
                          num_cpus=cfg.scaling.data_cpus_per_task)


def last_checkpoint_state(run_dir: str) -> Optional[dict]:
    """vlp_state.json of the run folder's latest checkpoint (the highest step, the final one of a step; the one
    a restart resumes from), None when there is none."""
    fs, rd = get_fs(run_dir)
    if not fs.exists(rd):
        return None
    best = None
    for d in fs.ls(rd, detail=False):
        p = join(d, "vlp_state.json")
        if d.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_") and fs.exists(p):
            st = json.loads(fs.cat(p))
            if best is None or (st["step"], bool(st.get("final"))) > (best["step"], bool(best.get("final"))):
                best = st
    return best


def resume_problem(run_dir: str, held: bool) -> Optional[str]:
    """Why the run cannot resume on the data path chosen now, or None. A checkpoint taken in the middle of a
    held epoch records only the steps done (:mod:`vlp.train.progress`): which rows they were is replayed from
    the tokenised held sets, which the streaming path does not have (the other way round converts)."""
    st = last_checkpoint_state(run_dir)
    if held or not st or st.get("final") or st.get("mode") != "held" or not st.get("epoch_steps"):
        return None
    return (f"the run's last checkpoint (step {st['step']}) was taken in the middle of an epoch on the held data "
            "path, which this attempt does not take (data.materialize); set data.materialize: always to resume it")


# Fields that may differ between attempts of one run (a re-run reuses the finished run or resumes it from its
# checkpoints): they change how the run is reached, scheduled, logged or fault-injected, never what is trained.
# Everything else of TrainConfig must equal the run folder's config.yaml. ``[*]`` matches any list index.
RERUN_MAY_CHANGE = (
    "run_name",                    # names the folder; equal by construction
    "output_dir",                  # the same folder may be spelled differently (relative / absolute)
    "stage",                       # a label; nothing reads it
    "data.sets[*].storage",        # how the data is reached (endpoint, region, profile), not which data
    "data.materialize", "data.materialize_max_mb",  # where the rows are kept between epochs, not which rows
    "scaling.cpus_per_worker",     # Ray resource requests only
    "scaling.data_cpus_per_task",
    "scaling.device_memory_gb", "scaling.memory_preflight",  # only the preflight reads them
    "checkpoint",                  # cadence / retention: resume is exact from any checkpoint
    "max_failures",                # restarts allowed
    "log_every", "tensorboard", "tracking",  # logging and experiment tracking
    "debug",                       # fault injection (tests fail an attempt, then re-run without it)
    "ray",                         # how Ray is reached
    "model.plugins",               # which modules register part types; the types used are compared (and runs
                                   # saved before plugins existed have no such key)
)
# Filled in by check_setup when left None; the saved config holds the resolved value.
_RESOLVED_AT_SETUP = ("model.vision_hidden_size", "model.audio_hidden_size", "model.tower.mean", "model.tower.std")


def _may_change(path: str) -> bool:
    generic = re.sub(r"\[\d+\]", "[*]", path)
    return any(generic == a or generic.startswith(a + ".") or generic.startswith(a + "[") for a in RERUN_MAY_CHANGE)


def _diff(old, new, path: str = "") -> list[tuple[str, object, object]]:
    """(dotted path, old, new) of every leaf that differs; a list of another length differs as a whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += _diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _diff(a, b, f"{path}[{i}]")]
    return [] if old == new else [(path, old, new)]


def field_default(cls, path: str):
    """The declared default of the config field at dotted ``path`` (through nested configs; a union's first member
    that has the field); a sentinel that equals nothing when there is none."""
    import typing

    from pydantic import BaseModel

    for part in path.split("."):
        models = [c for c in (typing.get_args(cls) or (cls,)) if isinstance(c, type) and issubclass(c, BaseModel)]
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if field is None:
            return object()
        cls = field.annotation
    d = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(d, BaseModel):  # a section added later (deepspeed.offload_optimizer): as config.yaml holds it
        return d.model_dump(mode="json")
    return d.value if hasattr(d, "value") else d


def config_changes(saved: dict, cfg: TrainConfig) -> list[tuple[str, object, object]]:
    """What differs between a run folder's saved config and ``cfg``, outside RERUN_MAY_CHANGE."""
    new = yaml.safe_load(dump_config(cfg))  # the same JSON-mode dump config.yaml holds (tuples as lists)
    out = []
    for path, a, b in _diff(saved, new):
        if _may_change(path) or (path in _RESOLVED_AT_SETUP and b is None) or (a == "<absent>" and (
                b is None or b == field_default(TrainConfig, path))):
            # (the last: a field added after the run was saved, at its default)
            continue
        out.append((path, a, b))
    return out


def check_same_config(fs, rd: str, run_dir: str, cfg: TrainConfig) -> bool:
    """Raise ConfigError when the run folder holds a config.yaml that differs from ``cfg`` in anything that
    is trained on; True when there is a saved config (and it matches)."""
    path = join(rd, "config.yaml")
    if not fs.exists(path):
        return False
    saved = yaml.safe_load(fs.cat(path)) or {}
    changes = config_changes(saved, cfg)
    if changes:
        raise ConfigError(
            [(p, f"{a!r} -> {b!r}") for p, a, b in changes],
            f"run {cfg.run_name}: {run_dir} was trained with another config (old -> new); use a new run_name "
            "or delete the run folder")
    return True


def config_for_workers(cfg: TrainConfig) -> dict:
    """The config as the workers get it, local model paths made absolute: Ray Train runs each worker in a
    folder of its own, where a path relative to the driver's working directory finds nothing."""
    from ..models.presets import looks_local

    d = cfg.model_dump(mode="json")
    conn, llm = d["model"]["connector"], d["model"]["llm"]
    if conn["init_from"] and "://" not in conn["init_from"]:
        conn["init_from"] = os.path.abspath(conn["init_from"])
    tower = d["model"]["tower"] or {}
    for part, k in [(llm, "path"), (llm, "tokenizer"), (llm, "init_from"), (tower, "path"), (tower, "init_from")]:
        v = part.get(k)
        if v and "://" not in v and (looks_local(v) or os.path.exists(v)):
            part[k] = os.path.abspath(os.path.expanduser(v))
    return d


def worker_meta(cfg: TrainConfig, setup: dict, run_dir: str, held: Optional[list[dict]],
                parts: Optional[list[list[str]]] = None) -> dict:
    """What each worker's recipe gets besides the config (``TrainRecipe(cfg, meta)``): the run folder, the data
    state file, the step count of the LR schedule, the export's record less the model config (as JSON), the
    held sets' object refs (:func:`build_held`) or None (the streaming path), and the sets' parts
    (:func:`set_parts`, for the resume state). ``setup``: :func:`check_setup`."""
    audio = next((inf.fingerprint.audio for inf in setup["infos"] if inf.fingerprint.audio), None)
    info = ExportInfo.from_fingerprint(setup["infos"][0].fingerprint, cfg.data.template, cfg.run_name, audio)
    return {"run_dir": run_dir, "state_path": join(run_dir, "data_state.json"), "total_steps": setup["total_steps"],
            "export_extra": info.to_json(), "held": held,
            "parts": parts if parts is not None else set_parts(cfg)}


def run_train(cfg: TrainConfig, log=print) -> dict:
    """Train (or resume, or reuse a finished run). Returns the training summary.

    A run folder that already exists must have been started with the same config (up to RERUN_MAY_CHANGE),
    else ConfigError; its config.yaml keeps the first attempt's config. One training at a time writes a run folder
    (vlp.writer_lock): a second one is refused with a line naming the first."""
    out_root = os.path.abspath(cfg.output_dir) if "://" not in cfg.output_dir else cfg.output_dir
    run_dir = join(out_root, cfg.run_name)
    fs, rd = get_fs(run_dir)
    check_same_config(fs, rd, run_dir, cfg)
    if fs.exists(join(rd, "export", MODEL_CONFIG)) and fs.exists(join(rd, "train_summary.json")):
        log(f"[vlp] train {cfg.run_name}: finished earlier, reusing {run_dir}/export")
        return {**json.loads(fs.cat(join(rd, "train_summary.json"))), "run_dir": run_dir,
                "export": join(run_dir, "export"), "reused": True}
    make_output_dir(out_root, "output_dir")  # an output_dir that cannot be created fails before Ray starts,
    with WriterLock(run_dir, "the run folder", command="vlp train") as lock, \
            ray_output(run_dir, cfg.ray.verbose, log=log) as log:  # Ray's output: <run_dir>/logs/ray.log
        summary = train_run(cfg, out_root, run_dir, log)
        if lock.lost:
            raise WriterBusy(f"the run folder: {lock.lost} while this training ran; check its checkpoints")
        log(f"[vlp] train {cfg.run_name}: done, {summary['steps']} steps, final loss "
            f"{summary['final_metrics'].get('loss', float('nan')):.4f}; export: {run_dir}/export")
    return {**summary, "run_dir": run_dir, "export": join(run_dir, "export"), "reused": False}


def train_run(cfg: TrainConfig, out_root: str, run_dir: str, log=print) -> dict:
    """The training of :func:`run_train` under its run folder's lock: checks, config.yaml, Ray Train's fit;
    -> train_summary.json."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from ..runtime import init_ray
    from .notices import RestartNotice
    from .loop import train_loop_per_worker

    fs, rd = get_fs(run_dir)
    saved = check_same_config(fs, rd, run_dir, cfg)  # again: under the lock
    check_inputs(cfg)  # and so do missing or unfinished feature sets
    init_ray(cfg.ray)
    setup = check_setup(cfg, log)
    fs.makedirs(rd, exist_ok=True)
    if saved:
        log(f"[vlp] train {cfg.run_name}: {run_dir} exists with the same config, continuing it "
            "(from its last checkpoint if it has one)")
    else:
        with fs.open(join(rd, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
    if setup["memory"]:  # the preflight's numbers of this attempt, machine-readable
        with fs.open(join(rd, "preflight.json"), "w") as f:
            f.write(json.dumps(setup["memory"], indent=2))
    materialize = should_materialize(cfg)
    problem = resume_problem(run_dir, materialize)
    if problem:
        raise TrainSetupError(f"cannot resume {cfg.run_name}: {problem}")
    held = build_held(cfg) if materialize else None
    parts = set_parts(cfg)
    meta = worker_meta(cfg, setup, run_dir, held, parts)
    log(f"[vlp] train {cfg.run_name}: {setup['samples_per_epoch']} samples/epoch, {setup['total_steps']} steps, "
        f"{cfg.scaling.num_workers} workers x micro {cfg.batch.micro_size} x accum {cfg.batch.grad_accum}, "
        f"ZeRO-{cfg.deepspeed.zero_stage}, trainable {setup['trainable']:,} / frozen {setup['frozen']:,} params")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": config_for_workers(cfg), "meta": meta},
        scaling_config=ScalingConfig(**scaling_kwargs(cfg)),
        run_config=RunConfig(name=cfg.run_name, storage_path=out_root,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
                             callbacks=[RestartNotice(cfg.run_name, cfg.max_failures)]),
        datasets={} if held else {"train": build_dataset(cfg, meta["state_path"], parts)},
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as e:  # the workers' tracebacks into the log; the terminal gets one line
        to_logs(f"[vlp] train {cfg.run_name} failed:\n{e}")
        raise TrainingFailed(f"training {cfg.run_name} failed: {failure_line(e)} (tracebacks: {run_dir}/"
                             f"{LOG_FILE})") from e
    if result.error:
        raise result.error
    return json.loads(fs.cat(join(rd, "train_summary.json")))


def failure_line(e) -> str:
    """What failed a Ray Train run, on one line: each failed rank's exception, or the controller's."""
    workers = getattr(e, "worker_failures", None)
    if workers:
        return "; ".join(f"rank {rank}: {one_line(exc)}" for rank, exc in sorted(workers.items()))
    controller = getattr(e, "controller_failure", None)
    return one_line(controller if controller is not None else e)
