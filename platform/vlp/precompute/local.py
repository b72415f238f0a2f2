"""The local executor of ``vlp precompute``: one machine, no Ray (``executor: local``, what ``auto`` picks when no
cluster is named). May import: errors, data, precompute.

    this process:     shards --ReadShard--> rows --batches of data.decode_batch_size--+
    decode processes: (data.decode_workers, one thread each)  <-----------------------+
                      DecodeFrames.decode_row: media -> uint8 frames (as bytes)  ------+
    this process:     <-- decoded rows, as they finish; encoder.batch_size at a time --+
                      EncodeFeatures (the tower, built once here) --> WriteParts --> metadata rows (the driver
                      commits shards from them exactly as from the Ray Data graph's)

The same stages as the Ray graph, so the same features, parts and commits; what goes is Ray's start-up, its
per-task scheduling and object store, and the CPU reservations that on one machine leave cores idle
(docs/benchmarks.md). At most ``2 * workers`` decode batches are in flight: memory stays bounded.

A decode process that dies (a decoder crash, the kernel's out-of-memory killer) takes the batches in flight with
it. They are decoded again one batch at a time in a fresh pool; a batch that kills it alone is split into its
rows, and a row that kills it alone becomes a ``stage: decode`` error record (counted and recorded like any
sample vlp cannot decode). When :data:`MAX_CRASHES_IN_A_ROW` rows in a row die alone, the fault is the machine,
not the data: the run stops with one line, committed shards kept for a resume.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, Optional

from ..errors import UserError
from .stages import DecodeFrames, EncodeFeatures, ReadShard, WriteParts

MAX_CRASHES_IN_A_ROW = 8
PROGRESS_EVERY_S = 30.0
# fork, as torch's DataLoader workers: no re-import of torch per process, and no re-run of the caller's main module
# (spawn and forkserver import it: a script calling run_precompute without a ``__main__`` guard would run again
# in every decode process). A forked decode process only decodes bytes; it exits with os._exit (no atexit hooks).
START_METHOD = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
DIED = ("the decode process died while decoding this sample (a decoder crash, or killed: out of memory?); it was "
        "decoded alone and died again")


class DecodeWorkersDying(UserError, RuntimeError):
    """Decode processes die on every sample: the machine (memory, a broken decoder install) is at fault."""

    exit_code = 1


# ------------------------------------------------------------------------------------------------ decode processes

STAGE: list[DecodeFrames] = []  # the decode stage of this decode process (set by start_worker)


def start_worker(stage: DecodeFrames) -> None:
    """Initializer of a decode process: one intra-op thread (the processes are the parallelism), and a watch on
    the driver: a driver killed outright (SIGKILL, the OOM killer) would otherwise leave its decode processes
    waiting for work forever."""
    import threading

    import torch

    torch.set_num_threads(1)
    STAGE[:] = [stage]
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=exit_with, args=(parent,), daemon=True, name="vlp-driver-watch").start()


def exit_with(parent) -> None:
    """Wait for ``parent`` (a multiprocessing parent process) to end, then end this process at once."""
    from multiprocessing.connection import wait as wait_ready

    wait_ready([parent.sentinel])
    os._exit(1)


def decode_rows(rows: list[dict]) -> list[dict]:
    """In a decode process: a batch of read rows -> decoded rows (``frames`` as bytes; other kinds pass through)."""
    return [STAGE[0].decode_row(r) for r in rows]


def died_row(row: dict) -> dict:
    """The error row of a sample whose decoding killed the decode process on its own."""
    return {**row, "kind": "error", "stage": "decode", "error": DIED, "media": []}


class DecodePool:
    """``workers`` spawned decode processes, restarted when one dies; :meth:`imap` decodes batches."""

    def __init__(self, stage: DecodeFrames, workers: int, log: Callable = print):
        self.stage, self.workers, self.log = stage, workers, log
        self.pool: Optional[ProcessPoolExecutor] = None
        self.crashes_in_a_row = 0
        self.restarts = 0

    def __enter__(self) -> "DecodePool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def start(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(START_METHOD),
                                        initializer=start_worker, initargs=(self.stage,))

    def imap(self, batches: Iterable[list[dict]]) -> Iterator[list[dict]]:
        """Decoded batches in input order (so a run's parts are the same every time), ``2 * workers`` at most in
        flight."""
        todo = iter(batches)
        pending: dict[Future, list[dict]] = {}  # in submission order
        while True:
            refused = self.fill(pending, todo)
            if not pending and not refused:
                return
            head = next(iter(pending), None)
            if head is not None and not refused:
                try:
                    out = head.result()
                except BrokenProcessPool:
                    pass
                else:
                    del pending[head]
                    yield out
                    continue
            lost = [*pending.values(), *refused]  # the pool is gone, and every batch in it
            pending.clear()
            yield from self.recover(lost)

    def fill(self, pending: dict, todo: Iterator[list[dict]]) -> list[list[dict]]:
        """Submit batches until ``2 * workers`` are in flight; -> [the batch a broken pool refused], or []."""
        while len(pending) < 2 * self.workers and (batch := next(todo, None)) is not None:
            try:
                pending[self.pool.submit(decode_rows, batch)] = batch
            except BrokenProcessPool:
                return [batch]
        return []

    def recover(self, lost: list[list[dict]]) -> Iterator[list[dict]]:
        """After a decode process died: a fresh pool, then ``lost`` decoded again one batch at a time."""
        self.restarts += 1
        self.log(f"[vlp] a decode process died; decoding the {sum(map(len, lost))} sample(s) it held again, "
                 f"one batch at a time")
        self.start()
        for batch in lost:
            yield self.alone(batch)

    def alone(self, batch: list[dict]) -> list[dict]:
        """``batch`` decoded with nothing else in flight; split into rows if it kills the process."""
        try:
            out = self.pool.submit(decode_rows, batch).result()
        except BrokenProcessPool:
            self.start()
            if len(batch) > 1:
                return [r for row in batch for r in self.alone([row])]
            self.crashes_in_a_row += 1
            if self.crashes_in_a_row >= MAX_CRASHES_IN_A_ROW:
                raise DecodeWorkersDying(f"decode processes died on {self.crashes_in_a_row} samples in a row, each "
                                         "decoded alone: the machine is at fault, not the data (memory? a broken "
                                         "decoder install?); the shards committed so far are kept") from None
            return [died_row(batch[0])]
        self.crashes_in_a_row = 0
        return out


# ------------------------------------------------------------------------------------------------ the run

def default_workers() -> int:
    """Decode processes when ``data.decode_workers`` is 0: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def quietly(build: Callable, **kw):
    """``build(**kw)`` without transformers' weight-loading progress bars (on Ray they go to the run's log; here
    they would be on the terminal, one per tower)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return build(**kw)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def batched(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    held: list[dict] = []
    for r in rows:
        held.append(r)
        if len(held) >= size:
            yield held
            held = []
    if held:
        yield held


class Progress:
    """A ``[vlp]`` line every ``every`` seconds from the metadata rows as they pass (the local executor has no Ray
    Data progress bars): samples written, failed, shards finished, samples/s."""

    def __init__(self, shards: int, log: Callable, every: float = PROGRESS_EVERY_S):
        self.shards, self.log, self.every = shards, log, every
        self.t0 = self.last = time.monotonic()
        self.ok = self.failed = self.ended = 0

    def count(self, metas: list[dict]) -> list[dict]:
        """Count ``metas`` (WriteParts' rows), print when it is time; -> ``metas``."""
        for m in metas:
            self.ok, self.failed = self.ok + m["n_ok"], self.failed + m["n_err"]
            self.ended += m["kind"] == "end"
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log(f"[vlp] precompute: {self.ok} samples written, {self.failed} failed, {self.ended}/{self.shards} "
                     f"shard(s) read, {self.ok / (now - self.t0):.1f} samples/s")
        return metas


class LocalPrecompute:
    """Read, decode, encode and write the shards to do on this machine; :meth:`run` yields WriteParts' metadata
    rows, the ones the Ray graph yields."""

    def __init__(self, cfg, decode: DecodeFrames, encode_kw: dict, log: Callable = print):
        self.cfg, self.decode, self.encode_kw, self.log = cfg, decode, encode_kw, log
        self.workers = cfg.data.decode_workers or default_workers()

    def rows(self, items: list[dict]) -> Iterator[dict]:
        read = ReadShard(self.cfg.data.storage, self.cfg.data.sample)
        for item in items:
            yield from read(item)

    def run(self, items: list[dict]) -> Iterator[dict]:
        """``items``: ``{"shard": name, "uri": uri}`` per shard to do -> metadata rows."""
        cfg = self.cfg
        self.log(f"[vlp] decode on cpu ({', '.join(c.name for c, _ in self.decode.chain)}) in {self.workers} "
                 f"process(es) of this machine; encoder in this process (executor local)")
        encoder = quietly(EncodeFeatures, **self.encode_kw)
        write = WriteParts(cfg.output.uri, cfg.output.storage, cfg.output.mode)
        ready: deque = deque()
        progress = Progress(len(items), self.log)
        with DecodePool(self.decode, self.workers, self.log) as pool:
            for rows in pool.imap(batched(self.rows(items), cfg.data.decode_batch_size)):
                ready.extend(rows)
                while len(ready) >= cfg.encoder.batch_size:
                    batch = [ready.popleft() for _ in range(cfg.encoder.batch_size)]
                    yield from progress.count(write.write_rows(encoder.encode_decoded(batch)))
            if ready:
                yield from progress.count(write.write_rows(encoder.encode_decoded(list(ready))))
