"""One writer per output folder: the lock object on local disk and on the loopback S3 server (refusal naming the
holder, stale takeover by exactly one of two racers, heartbeats, a lost lock noticed, release)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from conftest import make_bucket
from vlp.storage import StorageConfig, get_fs, join
from vlp.writer_lock import LOCK_NAME, WriterBusy, WriterLock


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(folder, storage) on local disk or in a fresh bucket of the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    endpoint = request.getfixturevalue("s3_server")
    bucket = f"lock-{uuid.uuid4().hex[:8]}"
    make_bucket(endpoint, bucket)
    return f"s3://{bucket}/features", StorageConfig(endpoint_url=endpoint)


def holder(folder: str, storage) -> dict:
    fs, path = get_fs(join(folder, LOCK_NAME), storage)
    fs.invalidate_cache()
    return json.loads(fs.cat_file(path))


def plant(folder: str, storage, **record) -> None:
    """Another writer's lock, as it would have written it."""
    fs, path = get_fs(join(folder, LOCK_NAME), storage)
    if "://" not in folder:
        fs.makedirs(folder, exist_ok=True)
    fs.pipe_file(path, json.dumps({"owner": "other", "host": "node-7", "pid": 4242, "command": "vlp precompute",
                                   "started": time.time() - 60, **record}).encode())


def test_a_second_writer_is_refused_naming_the_holder_until_the_first_releases(place):
    folder, storage = place
    first = WriterLock(folder, "output.uri", storage, command="vlp precompute").acquire()
    with pytest.raises(WriterBusy) as e:
        WriterLock(folder, "output.uri", storage).acquire()
    msg = str(e.value)
    assert "\n" not in msg and "vlp precompute" in msg and f"pid {first.record['pid']}" in msg
    assert first.record["host"] in msg and LOCK_NAME in msg
    first.release()
    with WriterLock(folder, "output.uri", storage) as second:
        assert holder(folder, storage)["owner"] == second.record["owner"]
    fs, path = get_fs(join(folder, LOCK_NAME), storage)
    fs.invalidate_cache()
    assert not fs.exists(path)  # released


def test_a_live_holder_is_respected_and_a_stale_one_taken_over(place):
    folder, storage = place
    plant(folder, storage, heartbeat=time.time() - 5)
    with pytest.raises(WriterBusy, match="node-7"):
        WriterLock(folder, "output.uri", storage, stale_s=300).acquire()
    plant(folder, storage, heartbeat=time.time() - 600)  # killed 10 minutes ago
    lock = WriterLock(folder, "output.uri", storage, stale_s=300).acquire()
    assert holder(folder, storage)["owner"] == lock.record["owner"]
    lock.release()


def test_of_two_writers_taking_over_a_stale_lock_exactly_one_wins(place):
    folder, storage = place
    plant(folder, storage, heartbeat=time.time() - 600)
    start, results = threading.Barrier(2), []

    def take():
        start.wait()
        try:
            results.append(WriterLock(folder, "output.uri", storage, stale_s=300).acquire())
        except WriterBusy as e:
            results.append(e)

    threads = [threading.Thread(target=take) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    won = [r for r in results if isinstance(r, WriterLock)]
    assert len(won) == 1 and sum(isinstance(r, WriterBusy) for r in results) == 1
    assert holder(folder, storage)["owner"] == won[0].record["owner"]
    won[0].release()


def test_heartbeats_renew_the_lock(place):
    folder, storage = place
    lock = WriterLock(folder, "output.uri", storage, beat_s=0.1).acquire()
    first = holder(folder, storage)["heartbeat"]
    deadline = time.time() + 10
    while holder(folder, storage)["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.1)
    assert holder(folder, storage)["heartbeat"] > first
    lock.release()


def test_a_lock_taken_over_while_its_writer_stalled_is_noticed_and_left_alone(place):
    folder, storage = place
    lock = WriterLock(folder, "output.uri", storage, beat_s=3600).acquire()  # beats only when told here
    assert lock.renew() is True and lock.lost is None
    plant(folder, storage, heartbeat=time.time())  # another writer took it over meanwhile
    assert lock.renew() is False and "node-7" in lock.lost
    lock.release()
    assert holder(folder, storage)["owner"] == "other"  # not ours: left in place


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    plant(str(tmp_path), None, host=socket.gethostname(), pid=int(dead.stdout), heartbeat=time.time())
    lock = WriterLock(str(tmp_path), "output.uri", stale_s=300).acquire()  # a fresh heartbeat, but nobody there
    assert holder(str(tmp_path), None)["owner"] == lock.record["owner"]
    lock.release()
