"""The ``vlp pack`` run, step by step (:class:`PackRun`): plan -> check_existing -> pack -> finish.

Records are split into groups of ``samples_per_shard`` by their running index (group g = records
[g*N, (g+1)*N)), so a group's shard is the same on every run. The driver streams the annotations once (bounded
memory: a few groups' records at a time). :class:`PackGroup` packs one group: fetches its media, writes its
shard(s), its error lines and, last, its commit marker ``{out}/_pack/groups/{g}.json``. A killed run resumes from
the committed groups; ``pack_manifest.json`` sums every group's marker. Where the groups run
(``executor``, :func:`choose_executor`):

- ``ray`` (a cluster): the driver writes a plan file per group not yet committed (its records, and its malformed
  ones as errors) under ``{out}/_pack/plan/`` (``write_plans``), then Ray Data maps PackGroup over those groups on
  the cluster's nodes (``pack``).
- ``local`` (one machine, no cluster named): ``workers`` groups at once on threads of the driver, records handed
  over in memory (``pack_local``). Same shards, markers and manifest, without Ray's start-up and per-task costs,
  which dominate packing on one machine (docs/benchmarks.md).

Output layout (``out``)::

    {prefix}-000000.tar ...          the shards (split {prefix}-000000-{k}.tar past max_shard_bytes)
    pack_manifest.json               totals, shards, settings
    _pack/settings.json              what the shards depend on (a resume with others is refused)
    _pack/groups/000000.json         group commit markers (records, packed, errors, shards)
    _pack/errors/000000.jsonl        one line per record that could not be packed: key, index, id, file, reason
    _pack/plan/000000.jsonl          the group's records, deleted once the group is committed
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Iterable, Iterator, Optional

from ..config import dump_config
from ..errors import UserError
from ..runlog import ray_output
from ..runtime import on_a_cluster
from ..storage import get_fs, join, make_output_dir, read_bytes, write_atomic
from .config import PackConfig
from .formats import PackError, PackRecord, expand_annotations, read_annotations
from .group import GroupWriter, built_in_order, error_line, fetch_threads, in_order, parse_plan_line, plan_line

SETTINGS_KEYS = ("format", "samples_per_shard", "prefix", "max_shard_bytes", "media_check")


class PackMismatch(UserError, RuntimeError):
    """``out`` holds shards packed with other settings (format, grouping, names)."""

    exit_code = 1


def group_of(index: int, cfg: PackConfig) -> int:
    return index // cfg.samples_per_shard


class PackGroup:
    """One group of records -> its shard(s), error lines and commit marker. As a Ray Data map function (the ray
    executor): ``{"group": g, "plan": uri}`` -> ``{"group", "marker"}``; :meth:`pack` is the same on records in
    memory (the local executor), fetching media on ``pool`` when given (threads shared by the groups)."""

    def __init__(self, cfg: PackConfig, pool: Optional[ThreadPoolExecutor] = None):
        self.cfg, self.pool = cfg, pool

    def __call__(self, row: dict) -> dict:
        text = (read_bytes(row["plan"], self.cfg.storage) or b"").decode()
        return self.pack(int(row["group"]), (parse_plan_line(line) for line in text.split("\n") if line))

    def pack(self, g: int, entries: Iterable[PackRecord | PackError]) -> dict:
        cfg = self.cfg
        errors, counts, out = [], Counter(), GroupWriter(g, cfg)
        try:
            for entry, sample, stage, reason in built_in_order(entries, cfg, self.pool):
                counts["records"] += 1
                if sample is None:
                    errors.append(error_line(entry, reason, stage))
                    continue
                out.write(sample)
                counts["packed"] += 1
                counts["text_only" if not entry.items else "with_media"] += 1
                counts.update(f"items_{it.modality}" for it in entry.items)
            shards = out.publish()
        finally:
            out.close()
        if errors:  # read back only where the marker counts errors (errors_of): a stale file is never read
            write_atomic(join(cfg.out, "_pack", "errors", f"{g:06d}.jsonl"), "".join(e + "\n" for e in errors),
                         cfg.storage)
        marker = {"group": g, **counts, "packed": counts["packed"], "errors": len(errors),
                  "shards": [u.rsplit("/", 1)[-1] for u in shards]}
        write_atomic(join(cfg.out, "_pack", "groups", f"{g:06d}.json"), json.dumps(marker), cfg.storage)
        return {"group": g, "marker": json.dumps(marker)}


def choose_executor(cfg: PackConfig) -> str:
    """``cfg.executor``, with ``auto`` resolved: ray when a cluster is named (``ray.address``, ``RAY_ADDRESS``:
    also every ``ray job submit`` driver) or this process already runs Ray, else local."""
    if cfg.executor != "auto":
        return cfg.executor
    return "ray" if on_a_cluster(cfg.ray) else "local"


def group_entries(entries: Iterator[PackRecord | PackError], cfg: PackConfig
                  ) -> Iterator[tuple[int, list[PackRecord | PackError]]]:
    """(group, its entries) in order, one group held at a time."""
    cur, held = None, []
    for e in entries:
        g = group_of(e.index, cfg)
        if cur is not None and g != cur:
            yield cur, held
            held = []
        cur = g
        held.append(e)
    if cur is not None:
        yield cur, held


class PackRun:
    """One run (or resume) of ``vlp pack``; :meth:`run` calls the steps in order."""

    def __init__(self, cfg: PackConfig, log=print):
        self.cfg, self.log = cfg, log
        self.t0 = time.time()
        self.todo: list[dict] = []
        self.done: dict[int, dict] = {}
        self.groups_total = 0
        self.filtered: Counter = Counter()  # records the format left out (another split...), by reason

    def run(self) -> dict:
        self.plan()
        self.check_existing()
        if choose_executor(self.cfg) != "ray":
            self.pack_local()
            return self.finish()
        own_log = self.log
        with ray_output(self.cfg.out, self.cfg.ray.verbose, self.cfg.storage, own_log) as self.log:  # logs/ray.log
            try:
                self.write_plans()
                if self.todo:
                    self.pack()
                return self.finish()
            finally:
                self.log = own_log

    def uri(self, *parts: str) -> str:
        return join(self.cfg.out, "_pack", *parts)

    def plan(self) -> None:
        """Expand the annotation specs (a UserError naming a pattern that matches nothing)."""
        self.files = expand_annotations(self.cfg.annotations, self.cfg.storage)

    def settings(self) -> dict:
        return {k: v for k, v in json.loads(self.cfg.model_dump_json()).items() if k in SETTINGS_KEYS}

    def check_existing(self) -> None:
        """Refuse (or with overwrite delete) an output packed with other settings; record this run's settings and
        config; read the committed groups."""
        cfg, now = self.cfg, self.settings()
        make_output_dir(cfg.out, "out", cfg.storage)
        old = json.loads(read_bytes(self.uri("settings.json"), cfg.storage) or b"null")
        if old is not None and old != now:
            diff = sorted(k for k, v in now.items() if old.get(k) != v)
            if not cfg.overwrite:
                raise PackMismatch(f"{cfg.out} holds shards packed with a different {', '.join(diff)}; use a new "
                                   "out or overwrite=true to delete them")
            self.remove_output()
        write_atomic(self.uri("settings.json"), json.dumps(now, indent=2), cfg.storage)
        write_atomic(self.uri("config.yaml"), dump_config(cfg), cfg.storage)
        self.done = read_markers(self.cfg.out, self.cfg.storage)

    def remove_output(self) -> None:
        """Delete what an earlier pack wrote into ``out`` (its shards, manifest and _pack/), nothing else."""
        fs, root = get_fs(self.cfg.out, self.cfg.storage)
        for m in read_markers(self.cfg.out, self.cfg.storage).values():
            for name in m["shards"]:
                if fs.exists(join(root, name)):
                    fs.rm(join(root, name))
        for rel in ("pack_manifest.json", "_pack"):
            if fs.exists(join(root, rel)):
                fs.rm(join(root, rel), recursive=True)

    def write_plans(self) -> None:
        """Stream the annotations once; a plan file for every group not committed yet."""
        self.drop_plans()
        for g, held in self.groups_to_do():
            uri = self.uri("plan", f"{g:06d}.jsonl")
            write_atomic(uri, "".join(plan_line(e) + "\n" for e in held), self.cfg.storage)
            self.todo.append({"group": g, "plan": uri})
        self.log(f"[vlp] pack {len(self.files)} annotation file(s), {self.groups_total} group(s) of "
                 f"{self.cfg.samples_per_shard}: {len(self.done)} already packed, {len(self.todo)} to do -> "
                 f"{self.cfg.out}")

    def groups_to_do(self) -> Iterator[tuple[int, list[PackRecord | PackError]]]:
        """Stream the annotations once: (group, its entries) for every group not committed yet."""
        entries = read_annotations(self.cfg.format, self.files, self.cfg.storage, self.filtered)
        for g, held in group_entries(entries, self.cfg):
            self.groups_total = g + 1
            if g not in self.done:
                yield g, held

    def pack_local(self) -> None:
        """The local executor: ``workers`` groups at once on threads of this process, media fetched on
        ``workers * fetch_threads`` shared threads (none for local media); at most ``2 * workers`` groups' records
        held. No plan files: the records go to the group in memory; each group commits itself, as on Ray."""
        cfg = self.cfg
        workers, threads = cfg.workers or os.cpu_count() or 1, fetch_threads(cfg)
        self.drop_plans()
        self.log(f"[vlp] pack {len(self.files)} annotation file(s) in this process ({workers} group(s) at once, "
                 f"{cfg.samples_per_shard} records per group; {len(self.done)} group(s) already packed) -> {cfg.out}")
        with ExitStack() as stack:
            fetch = stack.enter_context(ThreadPoolExecutor(workers * threads)) if threads else None
            groups = stack.enter_context(ThreadPoolExecutor(workers))
            job = PackGroup(cfg, fetch)
            for row in in_order(groups, lambda gh: job.pack(*gh), self.groups_to_do(), 2 * workers):
                self.commit(row, has_plan=False)

    def commit(self, row: dict, has_plan: bool = True) -> None:
        m = json.loads(row["marker"])
        self.done[m["group"]] = m
        if has_plan:
            self.drop_plan(m["group"])

    def pack(self) -> None:
        """The ray executor: the groups to do, in parallel on Ray Data; each commits itself."""
        import ray

        from ..runtime import init_ray

        init_ray(self.cfg.ray)
        ray.data.DataContext.get_current().enable_progress_bars = self.cfg.ray.progress_bars
        ds = ray.data.from_items(self.todo, override_num_blocks=len(self.todo))
        ds = ds.map(PackGroup(self.cfg), num_cpus=self.cfg.cpus_per_task)
        for row in ds.iter_rows():
            self.commit(row)

    def drop_plan(self, g: int) -> None:
        fs, path = get_fs(self.uri("plan", f"{g:06d}.jsonl"), self.cfg.storage)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass

    def drop_plans(self) -> None:
        """Remove the plan files a killed ray run left (its groups are planned again or committed)."""
        fs, path = get_fs(self.uri("plan"), self.cfg.storage)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def finish(self) -> dict:
        """Sum the group markers into pack_manifest.json and print the summary."""
        return write_manifest(self.cfg, self.done, self.groups_total, self.files, time.time() - self.t0, self.log,
                              dict(self.filtered))


def read_markers(out: str, storage=None) -> dict[int, dict]:
    """The commit markers of an output's packed groups: {group: marker}."""
    fs, root = get_fs(join(out, "_pack", "groups"), storage)
    if not fs.exists(root):
        return {}
    markers = {}
    for p in fs.ls(root, detail=False):
        if p.endswith(".json"):
            with fs.open(p, "rb") as f:
                m = json.loads(f.read())
            markers[int(m["group"])] = m
    return markers


def write_manifest(cfg: PackConfig, done: dict[int, dict], groups_total: int, files: list[str], seconds: float,
                   log, filtered: Optional[dict] = None) -> dict:
    totals: Counter = Counter()
    shards = []
    for g in sorted(done):
        m = done[g]
        totals.update({k: v for k, v in m.items() if isinstance(v, int) and k != "group"})
        shards += m["shards"]
    man = {"format": "vlp-pack/1", "annotation_format": cfg.format.type, "annotations": files,
           "media_root": cfg.media_root, "groups": groups_total, "groups_packed": len(done), "shards": shards,
           "totals": dict(sorted(totals.items())), "filtered": dict(sorted((filtered or {}).items())),
           "seconds": round(seconds, 1)}
    write_atomic(join(cfg.out, "pack_manifest.json"), json.dumps(man, indent=2), cfg.storage)
    items = ", ".join(f"{v} {k[6:]}" for k, v in sorted(totals.items()) if k.startswith("items_")) or "no media"
    log(f"[vlp] packed {totals['packed']} of {totals['records']} record(s) into {len(shards)} shard(s) in "
        f"{seconds:.1f} s ({items}; {totals['text_only']} text-only); {totals['errors']} error(s)"
        + (f", listed in {join(cfg.out, '_pack', 'errors')}/" if totals["errors"] else "")
        + (f"; left out by the format: {', '.join(f'{v} ({k})' for k, v in sorted(filtered.items()))}"
           if filtered else ""))
    return man


def run_pack(cfg: PackConfig, log=print) -> dict:
    return PackRun(cfg, log).run()


def errors_of(out: str, storage=None) -> list[dict]:
    """Every error line of a packed output, in group order (tests, reports): the error files of the committed
    groups whose marker counts errors."""
    rows = []
    for g, m in sorted(read_markers(out, storage).items()):
        if m.get("errors"):
            data = read_bytes(join(out, "_pack", "errors", f"{g:06d}.jsonl"), storage) or b""
            rows += [json.loads(ln) for ln in data.decode().splitlines() if ln]
    return rows


def pack_summary(out: str, storage=None) -> Optional[dict]:
    data = read_bytes(join(out, "pack_manifest.json"), storage)
    return None if data is None else json.loads(data)
