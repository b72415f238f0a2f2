"""The precompute driver: stream the shards through the stages, commit shards as they complete, write the manifest.
May import: config, storage, writer_lock, errors, data, models, formats, runtime, runlog, precompute.

Two executors run the same stages (``executor``, :func:`choose_executor`). On Ray (a cluster):

    shards --read (CPU tasks)--> rows --decode+sample+resize (CPU tasks)--> uint8 frames
           --encode (actor pool, GPU or CPU)--> fp16 features --write (tasks)--> parts + small metadata

On one machine without a cluster (``local``, :mod:`vlp.precompute.local`): decode processes, the encoder and the
writes in this process. Either way the driver counts metadata per shard; a shard is committed (marker written)
once every row its reader produced has been written. Decode, encode and write all stream: none waits for another
to finish.

The driver is :class:`PrecomputeRun`, one named step each: plan -> (the set's writer lock, vlp.writer_lock) ->
check_existing (fingerprint / format / overwrite) -> select (skip committed shards, clear uncommitted parts and
orphans) -> stream (local, or build_graph on Ray) -> consume (commit shards as they complete) -> finish
(errors.jsonl, manifest.json, summary.json). Every path comes from the feature-set layout
(formats.featureset.FeatureSetLayout), every JSON record from its typed record.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from .. import __version__
from ..config import ConfigError, dump_config
from ..data.audio import AudioFeaturizer
from ..errors import UserError
from ..data.preprocess import RESAMPLER
from ..data.sample import SampleConfig
from ..formats.featureset import (FEATURES_V1, AudioEncoderInfo, EncoderInfo, FeatureSetLayout, Fingerprint,
                                  Manifest, PreprocessInfo, ShardCommit, Totals, committed_shards, features_format)
from ..formats.records import RecordError
from ..runlog import ray_output
from ..runtime import on_a_cluster
from ..storage import expand_shards, make_output_dir
from ..writer_lock import WriterBusy, WriterLock
from .config import PrecomputeConfig
from ..data.media import DecoderUnavailable, check_chain
from .local import LocalPrecompute
from .stages import DecodeActor, DecodeEncode, DecodeFrames, EncodeFeatures, ReadShard, WriteParts


class FeatureSetMismatch(UserError, RuntimeError):
    """The output folder holds features computed with a different config."""

    exit_code = 1


@dataclass
class ShardState:
    parts: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    n_ok: int = 0
    n_err: int = 0
    expected: Optional[int] = None
    frames: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    media: Counter = field(default_factory=Counter)
    items: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)
    decoders: Counter = field(default_factory=Counter)  # items per decoder (this run only, not in the commit)
    fallbacks: Counter = field(default_factory=Counter)  # items a GPU decoder left to the CPU, per reason

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.n_ok + self.n_err == self.expected

    def add(self, meta: dict, stage_time: Counter) -> None:
        """Count one metadata row of WriteParts (a written part, or the shard's ``end``)."""
        if meta["kind"] == "end":
            self.expected = int(meta["expected"])
        else:
            self.n_ok += int(meta["n_ok"])
            self.n_err += int(meta["n_err"])
            self.frames += int(meta["frames"])
            self.bytes_in += int(meta["bytes_in"])
            self.bytes_out += int(meta["bytes_out"])
            self.media.update(json.loads(meta["media_counts"] or "{}"))
            self.items.update(json.loads(meta["item_counts"] or "{}"))
            self.ignored.update(json.loads(meta["ignored"] or "{}"))
            self.decoders.update(json.loads(meta["decoders"] or "{}"))
            self.fallbacks.update({_reason_class(k): v for k, v in json.loads(meta["fallbacks"] or "{}").items()})
            for k in ("read", "decode", "encode"):
                stage_time[k] += float(meta[f"t_{k}"])
            if meta["part"]:
                self.parts.append(meta["part"])
            if meta["errors"]:
                self.errors.append(meta["errors"])
        if self.expected is not None and self.n_ok + self.n_err > self.expected:
            raise RuntimeError(f"shard {meta['shard']}: more rows than its reader produced (internal error)")

    def commit(self, name: str) -> ShardCommit:
        return ShardCommit(shard=name, parts=self.parts, errors=self.errors, n_ok=self.n_ok, n_err=self.n_err,
                           expected=self.expected, frames=self.frames, bytes_in=self.bytes_in,
                           bytes_out=self.bytes_out, media=dict(self.media), items=dict(self.items), ignored_members=dict(self.ignored),
                           committed_at=time.time())


def shard_names(uris: list[str]) -> dict[str, str]:
    """{uri: short unique name}: the file stem, disambiguated by parent folders when stems collide."""
    def stem(u: str, depth: int) -> str:
        parts = u.rstrip("/").split("/")
        base = parts[-1][:-4] if parts[-1].endswith(".tar") else parts[-1]
        return "__".join([*parts[-1 - depth:-1], base]).replace(":", "")

    depth = 0
    while True:
        names = {u: stem(u, depth) for u in uris}
        if len(set(names.values())) == len(uris) or depth > 8:
            return names
        depth += 1


def tower_geometry(cfg: PrecomputeConfig) -> tuple[int, int, str, tuple, tuple]:
    """(image size, hidden size, weights sha256, mean, std) without building the model on the driver. mean/std
    are resolved: ``data.preprocess.mean/std`` when set, else the tower's own (its preprocessor_config.json)."""
    from ..models.presets import resolve_model_path
    from ..models.towers import TOWERS, tower_mean_std, weights_hash

    path = resolve_model_path(cfg.encoder.tower.path)
    size, hidden = TOWERS.part(cfg.encoder.tower).geometry()  # the tower type's own reading of its checkpoint
    mean, std = cfg.data.preprocess.resolve(*tower_mean_std(path))
    return size, hidden, weights_hash(path), mean, std


def fingerprint(cfg: PrecomputeConfig, size: int, hidden: int, sha: str, mean: tuple, std: tuple,
                audio: Optional[AudioEncoderInfo] = None) -> Fingerprint:
    """What the features depend on. ``preprocess`` holds the crop size and the mean/std actually used (resolved,
    never None): chat and infer read them back from the export, and a resume with other values is refused."""
    tower = cfg.encoder.tower
    return Fingerprint(
        encoder=EncoderInfo(type=tower.type, path=tower.path, weights_sha256=sha, layer=tower.layer,
                            hidden_size=hidden, image_size=size),
        mode=cfg.output.mode,
        sampling=cfg.data.sampling.model_dump(),
        preprocess=PreprocessInfo.model_validate({**cfg.data.preprocess.model_dump(mode="json"), "size": size,
                                                  "mean": list(mean), "std": list(std), "resampler": RESAMPLER}),
        sample=cfg.data.sample.model_dump(mode="json"), **({"audio": audio} if audio else {}))


def audio_plan(cfg: PrecomputeConfig) -> tuple[Optional[AudioEncoderInfo], Optional[AudioFeaturizer]]:
    """(fingerprint ``audio``, the decode stage's featurizer), both None without ``encoder.audio_tower``. The
    tower's extractor must expect the rate audio is resampled to (``data.audio.sample_rate``)."""
    tcfg = cfg.encoder.audio_tower
    if tcfg is None:
        return None, None
    from ..models.audio_towers import AUDIO_TOWERS
    from ..models.presets import resolve_model_path
    from ..models.towers import layer_problem, weights_hash

    path = resolve_model_path(tcfg.path)
    try:
        g = AUDIO_TOWERS.part(tcfg).geometry()
    except (OSError, ValueError, KeyError) as e:  # not a checkpoint of this tower type, or no extractor beside it
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError([("encoder.audio_tower.path", f"{tcfg.path} is not an {tcfg.type} audio tower with its "
                                                        f"feature extractor: {first}")]) from None
    problems = []
    if g["sampling_rate"] != cfg.data.audio.sample_rate:
        problems.append(("data.audio.sample_rate", f"{cfg.data.audio.sample_rate} Hz, but the audio tower's feature "
                                                   f"extractor ({tcfg.path}) expects {g['sampling_rate']} Hz"))
    bad_layer = layer_problem(tcfg.layer, g["num_layers"])
    if bad_layer:
        problems.append(("encoder.audio_tower.layer", f"{tcfg.layer} is {bad_layer}"))
    if problems:
        raise ConfigError(problems)
    info = AudioEncoderInfo(type=tcfg.type, path=tcfg.path, weights_sha256=weights_hash(path), layer=tcfg.layer,
                            hidden_size=g["hidden_size"], tokens_per_segment=g["tokens_per_segment"],
                            num_mel_bins=g["num_mel_bins"], max_length=g["max_length"],
                            decode=cfg.data.audio.model_dump(mode="json"))
    return info, AudioFeaturizer(cfg.data.audio, tcfg.path)


def with_added_sample_keys(fp: Optional[Fingerprint]) -> Optional[Fingerprint]:
    """A fingerprint written before a ``data.sample`` key existed (e.g. ``max_sample_bytes``) had that key at its
    default: filled in, so such a set still resumes with the default and is refused with another value."""
    if fp is None or fp.sample is None:
        return fp
    return fp.model_copy(update={"sample": {**SampleConfig().model_dump(mode="json"), **fp.sample}})


def plan_stages(cfg: PrecomputeConfig) -> tuple[Fingerprint, DecodeFrames, dict]:
    """(fingerprint, decode stage, encoder actor kwargs), resolved once on the driver: the decode stage pads with
    the resolved mean and the encoder normalises with the resolved mean/std, the values the fingerprint records."""
    size, hidden, sha, mean, std = tower_geometry(cfg)
    size = cfg.data.preprocess.size or size
    audio, featurizer = audio_plan(cfg)
    fp = fingerprint(cfg, size, hidden, sha, mean, std, audio)
    decode = DecodeFrames(cfg.data.sampling, cfg.data.decode, size, cfg.data.preprocess.pad_to_square, mean,
                          audio=featurizer)
    encode = dict(tower_cfg=cfg.encoder.tower, mode=cfg.output.mode,
                  max_frames_per_forward=cfg.encoder.max_frames_per_forward, mean=mean, std=std,
                  audio_tower_cfg=cfg.encoder.audio_tower,
                  max_segments_per_forward=cfg.encoder.max_segments_per_forward)
    return fp, decode, encode


def choose_executor(cfg: PrecomputeConfig) -> str:
    """``cfg.executor`` with ``auto`` resolved: ray on a cluster (:func:`vlp.runtime.on_a_cluster`), for GPU
    decoding and for an encoder that asks for a GPU type, else local (this machine without Ray)."""
    if cfg.executor != "auto":
        return cfg.executor
    ray_only = cfg.data.decode.device == "cuda" or cfg.encoder.accelerator_type is not None
    return "ray" if ray_only or on_a_cluster(cfg.ray) else "local"


def encoder_on_gpu(cfg: PrecomputeConfig, cluster_gpus: float) -> bool:
    """Whether the encoder actors ask for GPUs: a tower (vision or audio) with device=cuda, or auto with GPUs in the
    cluster or an accelerator_type asked for (an autoscaling cluster may have no GPU node up yet)."""
    devices = {cfg.encoder.tower.device} if cfg.output.mode != "pixels" else set()  # pixels: no vision tower runs
    devices |= {cfg.encoder.audio_tower.device} if cfg.encoder.audio_tower else set()
    return "cuda" in devices or ("auto" in devices and (cluster_gpus > 0 or cfg.encoder.accelerator_type is not None))


def decode_placement(cfg: PrecomputeConfig, on_gpu: bool) -> str:
    """Where decoding runs (``data.decode_placement`` resolved): ``tasks``, ``actors`` or ``encoder`` (inside the
    encoder actors, on their GPU). ``on_gpu``: whether the encoder actors hold GPUs (:func:`encoder_on_gpu`)."""
    want, cuda = cfg.data.decode_placement, cfg.data.decode.device == "cuda"
    enc_gpu = on_gpu and cfg.encoder.num_gpus_per_actor > 0
    if want == "encoder" and not enc_gpu:
        raise ConfigError([("data.decode_placement", "encoder decodes on the encoder actors' GPU, but they hold none "
                                                     "(encoder.tower.device, encoder.num_gpus_per_actor, output.mode)")])
    if want != "auto":
        return want
    return "tasks" if not cuda else "encoder" if enc_gpu else "actors"


def stage_resources(cfg: PrecomputeConfig, on_gpu: bool, placement: Optional[str] = None) -> dict[str, dict]:
    """Ray resource requests per stage, the numbers the autoscaler scales on. Reads and writes are CPU tasks; the
    encoder is an actor pool, each actor holding ``num_gpus_per_actor`` GPUs (of ``accelerator_type`` when set)
    when the tower runs on cuda, else CPUs only. Decoding (``placement``, default :func:`decode_placement`) asks
    for CPUs, plus ``data.decode_gpus`` of a GPU when it decodes on cuda; placed in the encoder actors it asks for
    nothing of its own (``decode`` is empty): it shares theirs."""
    placement = placement or decode_placement(cfg, on_gpu)
    enc = {"num_cpus": cfg.encoder.cpus_per_actor, "num_gpus": cfg.encoder.num_gpus_per_actor if on_gpu else 0}
    if on_gpu and cfg.encoder.accelerator_type:
        enc["accelerator_type"] = cfg.encoder.accelerator_type
    dec: dict = {"num_cpus": cfg.data.decode_cpus, "memory": cfg.data.decode_memory_mb << 20}
    if cfg.data.decode.device == "cuda":
        dec["num_gpus"] = cfg.data.decode_gpus
    return {"read": {"num_cpus": cfg.data.read_cpus},
            "decode": {} if placement == "encoder" else dec,
            "encode": enc,
            "write": {"num_cpus": 0.25}}


def decode_map_args(cfg: PrecomputeConfig, stage: DecodeFrames, placement: str, resources: dict) -> tuple:
    """(fn, map_batches keyword arguments) of the decode stage for ``placement`` tasks or actors; ``resources`` is
    :func:`stage_resources`' ``decode`` entry."""
    import ray

    kw = dict(batch_size=cfg.data.decode_batch_size, batch_format="numpy", **resources)
    if placement == "actors":
        return DecodeActor, dict(kw, fn_constructor_kwargs={"stage": stage},
                                 compute=ray.data.ActorPoolStrategy(size=cfg.data.decode_concurrency))
    if placement == "tasks":
        return stage, kw
    raise ValueError(f"decode placement {placement!r} has no decode stage of its own")


class PrecomputeRun:
    """One run (or resume) of a precompute job, step by step; :meth:`run` calls them in order."""

    def __init__(self, cfg: PrecomputeConfig, log=print):
        self.cfg, self.log = cfg, log
        self.layout = FeatureSetLayout(cfg.output.uri, cfg.output.storage)
        self.t_start = time.time()
        self.states: dict[str, ShardState] = {}
        self.skipped: list[str] = []
        self.stage_time: Counter = Counter()
        self.ds_stats = ""
        self.lock: Optional[WriterLock] = None  # held from check_existing to finish (run)

    def run(self) -> dict:
        self.plan()
        make_output_dir(self.cfg.output.uri, "output.uri", self.cfg.output.storage)
        out, own_log = self.cfg.output, self.log
        with WriterLock(out.uri, "output.uri", out.storage, command="vlp precompute") as lock, \
                ray_output(out.uri, self.cfg.ray.verbose, out.storage, own_log) as self.log:  # <uri>/logs/ray.log
            self.lock = lock  # a second writer is refused until this run ends
            try:
                self.check_existing()
                todo = self.select()
                if todo:
                    self.consume(self.stream(todo))
                return self.finish()
            finally:
                self.log = own_log

    def plan(self) -> None:
        """Expand the shard specs, name the shards, resolve the fingerprint and the stages."""
        self.shards = expand_shards(self.cfg.data.shards, self.cfg.data.storage)
        self.names = shard_names(self.shards)
        self.fp, self.decode, self.encode = plan_stages(self.cfg)
        check_chain(self.decode.chain)  # a decoder that is not installed stops the job here, in one line

    def check_existing(self) -> None:
        """Refuse (or with output.overwrite delete) an output made with another fingerprint or in a format this
        vlp does not write; then record this run's fingerprint and config."""
        out, layout = self.cfg.output.uri, self.layout
        fs, root = make_output_dir(out, "output.uri", self.cfg.output.storage)
        old_fp = Fingerprint.read(layout)
        problem = None
        try:
            man = Manifest.read(layout)
        except RecordError as e:  # a newer/unknown format (FeatureSetFormatError) or a foreign manifest
            problem = f"{out} holds a feature set this vlp cannot resume ({e})"
        else:
            if man is not None and man.format in (None, FEATURES_V1):  # readable, but its rows have another shape
                problem = (f"{out} holds a feature set in format {man.format or FEATURES_V1}; this vlp writes "
                           f"{features_format(self.fp.audio is not None, self.fp.mode)} and cannot add to it")
        old_fp = with_added_sample_keys(old_fp)
        if problem is None and old_fp is not None and old_fp.to_json() != self.fp.to_json():
            problem = f"{out} holds features made with a different {', '.join(self.fp.differences(old_fp))}"
        if problem is not None:
            if not self.cfg.output.overwrite:
                raise FeatureSetMismatch(f"{problem}; use a new output.uri or output.overwrite=true to delete them")
            layout.remove()
            fs.makedirs(root, exist_ok=True)
            if self.lock is not None:
                self.lock.restore()  # removed with the rest
        self.fp.write(layout)
        layout.write(layout.CONFIG, dump_config(self.cfg))

    def select(self) -> list[str]:
        """The shard URIs still to do; committed shards are reused, uncommitted parts of the others deleted."""
        done = committed_shards(self.layout)
        todo = [u for u in self.shards if self.names[u] not in done]
        self.skipped = [self.names[u] for u in self.shards if self.names[u] in done]
        self.log(f"[vlp] precompute {len(self.shards)} shard(s): {len(self.skipped)} already complete, "
                 f"{len(todo)} to do -> {self.cfg.output.uri}")
        for u in todo:
            for rel in self.layout.shard_folders(self.names[u]):
                self.layout.remove(rel)
        self.remove_orphans(done)
        self.states = {self.names[u]: ShardState() for u in todo}
        return todo

    def remove_orphans(self, done: dict[str, ShardCommit]) -> None:
        """Delete the files in committed shards' folders that their markers do not name (parts a concurrent writer
        left before sets had a writer lock, or a write retried after its first attempt landed)."""
        named = {p for rec in done.values() for p in [*rec.parts, *rec.errors]}
        layout = self.layout
        orphans = [f for top in (layout.PARTS, layout.ERROR_PARTS) for f in layout.files(top)
                   if f.split("/")[1] in done and f not in named]
        for f in orphans:
            layout.remove(f)
        if orphans:
            self.log(f"[vlp] removed {len(orphans)} part file(s) no commit names (orphans)")

    def stream(self, todo: list[str]) -> Iterator[dict]:
        """WriteParts' metadata rows of the shards to do, as they are written: from the local executor
        (:class:`vlp.precompute.local.LocalPrecompute`) or the Ray Data graph (:meth:`build_graph`)."""
        items = [{"shard": self.names[u], "uri": u} for u in todo]
        if choose_executor(self.cfg) == "local":
            yield from LocalPrecompute(self.cfg, self.decode, self.encode, self.log).run(items)
            return
        ds = self.build_graph(items)
        yield from ds.iter_rows()
        self.ds_stats = ds.stats()

    def build_graph(self, items: list[dict]):
        """read -> decode -> encode -> write over the shards to do (``items``: ``{"shard", "uri"}`` each); a Ray
        Dataset of WriteParts metadata rows."""
        import ray

        from ..runtime import init_ray

        cfg = self.cfg
        init_ray(cfg.ray)
        ray.data.DataContext.get_current().enable_progress_bars = cfg.ray.progress_bars
        on_gpu = encoder_on_gpu(cfg, ray.cluster_resources().get("GPU", 0))
        placement = decode_placement(cfg, on_gpu)
        res = stage_resources(cfg, on_gpu, placement)
        self.log(f"[vlp] decode on {cfg.data.decode.device} ({', '.join(c.name for c, _ in self.decode.chain)}), "
                 f"placement {placement}")
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(ReadShard(cfg.data.storage, cfg.data.sample), **res["read"])
        encoder, encode_kw = EncodeFeatures, self.encode
        if placement == "encoder":  # decode inside the encoder actors: GPU frames go to the tower in place
            encoder, encode_kw = DecodeEncode, {"decode": self.decode, **self.encode}
        else:
            # On CPU, decode runs as stateless tasks (not actors, so it never pins CPUs that reads and writes need).
            # Its memory reservation also keeps Ray Data from fusing it into the encoder actor, which would
            # serialise decoding and encoding in one process.
            fn, kw = decode_map_args(cfg, self.decode, placement, res["decode"])
            ds = ds.map_batches(fn, **kw)
        ds = ds.map_batches(
            encoder, fn_constructor_kwargs=encode_kw, batch_size=cfg.encoder.batch_size,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.encoder.concurrency), **res["encode"])
        return ds.map_batches(WriteParts(cfg.output.uri, cfg.output.storage, cfg.output.mode),
                              batch_size=cfg.encoder.batch_size * 2, batch_format="numpy", **res["write"])

    def consume(self, metas: Iterable[dict]) -> None:
        """Count the metadata rows as they stream; commit each shard once all its rows are written. A decoder that
        a worker cannot run (no GPU visible there) stops the run with its own message, not Ray's traceback."""
        try:
            for meta in metas:
                st = self.states[meta["shard"]]
                st.add(meta, self.stage_time)
                if st.complete:
                    self.check_lock()
                    st.commit(meta["shard"]).write(self.layout)
        except Exception as e:
            problem = decoder_problem(e)
            if problem is None:
                raise
            raise DecoderUnavailable(problem) from None

    def check_lock(self) -> None:
        """Stop before committing when another writer took the set over (this run stalled past the stale time)."""
        if self.lock is not None and self.lock.lost:
            raise WriterBusy(f"output.uri: stopped before committing more shards: {self.lock.lost}")

    def finish(self) -> dict:
        """errors.jsonl, manifest.json and summary.json over every committed shard; returns the summary."""
        incomplete = [n for n, s in self.states.items() if not s.complete]
        if incomplete:
            raise RuntimeError(f"shards never completed: {incomplete}")
        done = committed_shards(self.layout)
        reasons = self.collect_errors(done)
        summary = self.summary(done, reasons)
        self.manifest(done, summary).write(self.layout)
        self.layout.write(self.layout.SUMMARY, json.dumps(summary, indent=2))
        self.report(summary, reasons)
        return summary

    def collect_errors(self, done: dict[str, ShardCommit]) -> Counter:
        """Write every error record of every committed shard into errors.jsonl; -> count per reason class."""
        lines = []
        reasons: Counter = Counter()
        for rec in done.values():
            for e in rec.errors:
                for line in (self.layout.read(e) or b"").decode().splitlines():
                    if line.strip():
                        lines.append(line)
                        d = json.loads(line)
                        reasons[f"{d['stage']}: {_reason_class(d['reason'])}"] += 1
        self.layout.write(self.layout.ERRORS, "\n".join(lines) + ("\n" if lines else ""))
        return reasons

    def summary(self, done: dict[str, ShardCommit], reasons: Counter) -> dict:
        """summary.json: totals over the committed shards, throughput and stage times of this run."""
        cfg, ran = self.cfg, self.states
        wall = time.time() - self.t_start
        frames = sum(s.frames for s in ran.values())
        samples_ok = sum(s.n_ok for s in ran.values())
        return {
            "run": cfg.run_name or cfg.output.uri.rstrip("/").rsplit("/", 1)[-1],
            "shards": len(self.shards), "shards_run": len(ran), "shards_skipped_complete": len(self.skipped),
            "samples_ok": sum(r.n_ok for r in done.values()),
            "samples_failed": sum(r.n_err for r in done.values()),
            "samples_text": sum(r.media.get("text", 0) for r in done.values()),
            "items_by_modality": dict(sum((Counter(r.items) for r in done.values()), Counter())),
            "this_run": {"samples_ok": samples_ok, "samples_failed": sum(s.n_err for s in ran.values()),
                         "frames": frames, "bytes_in": sum(s.bytes_in for s in ran.values()),
                         "bytes_out": sum(s.bytes_out for s in ran.values()), "wall_s": round(wall, 3),
                         "samples_per_s": round(samples_ok / wall, 3) if wall > 0 else 0.0,
                         "frames_per_s": round(frames / wall, 3) if wall > 0 else 0.0,
                         "stage_cpu_seconds": {k: round(v, 3) for k, v in self.stage_time.items()},
                         "decoders": dict(sum((s.decoders for s in ran.values()), Counter())),
                         "decode_fallbacks": dict(sum((s.fallbacks for s in ran.values()), Counter()).most_common())},
            "errors_by_reason": dict(reasons.most_common()),
            "ray_data_stats": self.ds_stats,
        }

    def manifest(self, done: dict[str, ShardCommit], summary: dict) -> Manifest:
        fp = self.fp
        return Manifest(
            format=features_format(fp.audio is not None, fp.mode), vlp_version=__version__, created_at=time.time(), host=socket.gethostname(),
            inputs=self.shards, shard_names={u: self.names[u] for u in self.shards},
            shards={n: done[n].counts() for n in sorted(done)},
            encoder=fp.encoder, **({"audio": fp.audio} if fp.audio else {}), layer=fp.encoder.layer, mode=fp.mode, sampling=fp.sampling, preprocess=fp.preprocess,
            totals=Totals(samples_ok=summary["samples_ok"], samples_failed=summary["samples_failed"],
                          samples_text=summary["samples_text"], items_by_modality=summary["items_by_modality"]),
            config=self.cfg.model_dump(mode="json"))

    def report(self, summary: dict, reasons: Counter) -> None:
        t = summary["this_run"]
        self.log(f"[vlp] done: {summary['samples_ok']} ok, {summary['samples_failed']} failed "
                 f"({len(self.skipped)} shard(s) reused); this run {t['samples_ok']} samples, {t['frames']} frames "
                 f"in {t['wall_s']:.1f}s = {t['samples_per_s']:.2f} samples/s, {t['frames_per_s']:.1f} frames/s; "
                 f"in {t['bytes_in'] / 1e6:.1f} MB, out {t['bytes_out'] / 1e6:.1f} MB")
        if t["decode_fallbacks"]:
            self.log(f"[vlp] GPU decode fell back to CPU for {sum(t['decode_fallbacks'].values())} item(s): "
                     + "; ".join(f"{k} x{v}" for k, v in t["decode_fallbacks"].items()))
        if reasons:
            self.log("[vlp] errors by reason: " + "; ".join(f"{k} x{v}" for k, v in reasons.most_common()))
            self.log(f"[vlp] error records: {self.layout.uri_of(self.layout.ERRORS)}")


def decoder_problem(e: BaseException) -> Optional[str]:
    """The message of a :class:`DecoderUnavailable` a Ray worker raised, found in what the driver caught, or None.
    Ray Data hands the driver a ``RayTaskError(UserCodeException)`` that keeps the worker's exception only as
    traceback text (``vlp.data.media.DecoderUnavailable: <message>``, one line: vlp's messages are), so that line
    is looked for in every exception of the chain (its ``cause``, ``__cause__``, ``__context__``); an original
    instance, where Ray keeps one, is taken as is."""
    head = f"{DecoderUnavailable.__module__}.{DecoderUnavailable.__qualname__}: "
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if type(x) is DecoderUnavailable:  # the original, not Ray's subclass whose str() holds a traceback
            return str(x)
        found = [line[len(head):] for line in str(x).splitlines() if line.startswith(head)]
        if found:
            return found[-1]
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def run_precompute(cfg: PrecomputeConfig, log=print) -> dict:
    """Run (or resume) a precompute job. Returns the summary dict (also written to summary.json)."""
    return PrecomputeRun(cfg, log).run()


def _reason_class(reason: str) -> str:
    """Short class of an error reason for the summary table (first clause, no numbers/paths)."""
    import re

    r = re.sub(r"^(item \d+ \(.*?\)|sample '.*?'): ", "", reason)  # "item 1 (1.jpg): <reason>": its reason
    r = r.split(":")[0] if r.startswith(("decord", "pyav", "tar is")) else r
    r = re.sub(r"\(.*?\)", "", r)
    r = re.sub(r"\d+", "N", r)
    return r.strip()[:80]
