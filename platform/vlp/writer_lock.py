"""One writer per output folder (a feature set, a training run folder): a lock object with owner, host and heartbeat.

``WriterLock(folder, what).acquire()`` creates ``folder/.vlp-writer.json`` exclusively (``O_EXCL`` on local disk, a
conditional PUT ``If-None-Match: *`` on S3). A second writer finds it and is refused with one line naming the holder
(:class:`WriterBusy`), unless the holder is gone: its heartbeat is older than ``stale_s``, or it ran on this host and
its process is dead (a killed run is taken over at once). The takeover is atomic (a rename on local disk, a PUT
``If-Match`` the stale object's ETag on S3), so of two writers taking over the same stale lock one wins. A thread
renews the heartbeat every ``beat_s``, each renewal conditional on the lock still being this owner's; a writer that
finds it taken (it stalled longer than ``stale_s``) says so in :attr:`WriterLock.lost` and stops renewing.
``release()`` deletes the lock when it is still this owner's.

May import: vlp.errors, vlp.storage.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from .errors import UserError
from .storage import StorageConfig, get_fs, is_remote, join

LOCK_NAME = ".vlp-writer.json"


class WriterBusy(UserError):
    """Another live writer holds the folder."""

    exit_code = 1


def describe(holder: dict, now: float) -> str:
    """``vlp precompute (pid 12, host a, started 2026-.. UTC, heartbeat 3 s ago)``."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return (f"{holder.get('command', '?')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{started}, heartbeat {now - float(holder.get('heartbeat', 0)):.0f} s ago)")


class WriterLock:
    """The lock of ``folder`` (local or s3://) for ``what`` (``output.uri``, ``the run folder``: how lines name it)."""

    def __init__(self, folder: str, what: str, storage: Optional[StorageConfig] = None, stale_s: float = 300.0,
                 beat_s: float = 30.0, command: Optional[str] = None):
        self.uri, self.what, self.stale_s, self.beat_s = join(folder, LOCK_NAME), what, stale_s, beat_s
        self.fs, self.path = get_fs(self.uri, storage)
        self.remote = is_remote(self.uri)
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "command": command or "vlp " + " ".join(sys.argv[1:2]), "started": time.time()}
        self.token: Optional[str] = None  # the ETag of our object on S3
        self.lost: Optional[str] = None
        self.made_folder = False  # local: the lock made its folder (removed again on release if left empty)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------------------------ store operations
    def body(self) -> bytes:
        return json.dumps({**self.record, "heartbeat": time.time()}).encode()

    def read(self) -> tuple[Optional[dict], Optional[str]]:
        """(the lock's record, its ETag on S3) or (None, None) when there is none."""
        try:
            if self.remote:
                self.fs.invalidate_cache(self.path)
                etag = self.fs.info(self.path).get("ETag")
                return json.loads(self.fs.cat_file(self.path)), etag
            with open(self.path, "rb") as f:
                return json.loads(f.read()), None
        except FileNotFoundError:
            return None, None
        except ValueError:  # a torn or foreign file: treated as a holder without heartbeat (stale)
            return {}, None

    def create(self) -> bool:
        """Create the lock exclusively; False when it exists."""
        try:
            if self.remote:
                self.token = self.fs.pipe_file(self.path, self.body(), mode="create").get("ETag")
                return True
            folder = os.path.dirname(self.path)
            self.made_folder = self.made_folder or not os.path.isdir(folder)
            self.fs.makedirs(folder, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self.body())
        return True

    def replace(self, etag: Optional[str]) -> bool:
        """Overwrite the lock if it is still the object ``etag`` names (S3) / still ours (local); False if not."""
        if self.remote:
            try:
                self.token = self.fs.pipe_file(self.path, self.body(), IfMatch=etag).get("ETag")
                return True
            except OSError:  # 412: someone else's object now
                return False
        holder, _ = self.read()
        if not holder or holder.get("owner") != self.record["owner"]:
            return False
        tmp = f"{self.path}.{self.record['owner']}"
        with open(tmp, "wb") as f:
            f.write(self.body())
        os.replace(tmp, self.path)
        return True

    def take_over(self, etag: Optional[str], stale: dict) -> bool:
        """Replace the stale lock ``stale``; of several writers doing so at once one succeeds."""
        if self.remote:
            return self.replace(etag)
        aside = f"{self.path}.stale-{self.record['owner']}"
        try:
            os.rename(self.path, aside)  # only one renamer finds the file
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read())
        except ValueError:
            moved = {}
        if moved != stale:
            try:  # another writer's fresh lock, moved by mistake: put back unless a third one is there
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return self.create()

    # ------------------------------------------------------------------------------------------------ the lock
    def acquire(self) -> "WriterLock":
        """Take the lock or raise WriterBusy naming the live holder; starts the heartbeat."""
        for _ in range(3):
            if self.create():
                break
            holder, etag = self.read()
            if holder is None:
                continue  # released meanwhile
            now = time.time()
            if self.alive(holder, now):
                folder = self.uri.rsplit("/", 1)[0]
                raise WriterBusy(f"{self.what} {folder} is being written by {describe(holder, now)}; wait for it to "
                                 f"finish, or if that run is gone remove {self.uri} (it is taken over by itself "
                                 f"{self.stale_s:.0f} s after the last heartbeat)")
            if self.take_over(etag, holder):
                break
        else:
            raise WriterBusy(f"{self.what}: could not take {self.uri} (other writers keep taking it)")
        self._thread = threading.Thread(target=self._beat, name="vlp-writer-lock", daemon=True)
        self._thread.start()
        return self

    def alive(self, holder: dict, now: float) -> bool:
        """Whether a holder still writes: a heartbeat within ``stale_s``, and on this host its process still runs
        (a run killed here is taken over at once, not after ``stale_s``)."""
        if now - float(holder.get("heartbeat", 0)) > self.stale_s:
            return False
        if holder.get("host") != self.record["host"] or not isinstance(holder.get("pid"), int):
            return True
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            if not self.renew():
                return

    def renew(self) -> bool:
        """One heartbeat; False (and :attr:`lost` set) when the lock is no longer ours."""
        if self.replace(self.token):
            return True
        holder, _ = self.read()
        self.lost = (f"{self.uri} was taken over by " + describe(holder, time.time())) if holder else \
            f"{self.uri} was removed"
        return False

    def restore(self) -> None:
        """Write the lock again after the whole folder was deleted (``output.overwrite``)."""
        if not self.create():
            self.replace(self.token)

    def release(self) -> None:
        """Stop the heartbeat; delete the lock when it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        holder, _ = self.read()
        if holder and holder.get("owner") == self.record["owner"]:
            self.fs.rm_file(self.path)
        folder = os.path.dirname(self.path)
        if self.made_folder and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # a run that failed its checks leaves no empty folder behind

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
