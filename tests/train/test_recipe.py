"""The training recipe's steps without Ray: micro-batch / accumulation grouping, the metrics record built by name
from the values summed over ranks, the run logs through storage.Appender (local and S3, and the report reading them back), and setup ->
train_step -> log -> export on a real DeepSpeed engine in a one-rank gloo group (Ray Train's restore / save
and the multi-worker paths are covered by tests/train/test_train.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import make_bucket, recipe_on_one_rank
from featrows import tokenise
from vlp.config import validate
from vlp.storage import StorageConfig, get_fs, read_appended
from vlp.train.config import TrainConfig
from vlp.train.recipe import (Counters, ModelSize, Reduced, RunLogs, StepStats, merge_counters,
                              micro_batches, step_metrics, take_group)

METRIC_KEYS = ["step", "epoch", "loss", "lr", "tokens_per_s", "samples_per_s", "compute_tokens_per_s",
               "compute_samples_per_s", "step_wall_s", "data_wait_s", "compute_s", "data_wait_frac", "padding_frac",
               "mfu", "peak_mem_bytes", "time"]  # metrics.jsonl's keys, in order, as before the recipe


def _rows(n: int, skip_every: int = 0) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"uid": f"s0:u{i}", "media_type": "video", "length": int(rng.integers(20, 300)),
             "skip": "over max_length" if skip_every and i % skip_every == 0 else ""} for i in range(n)]


def test_micro_batches_count_skips_and_the_dropped_tail():
    rows = _rows(53, skip_every=10)  # 6 skipped, 47 kept: windows of 16 -> 16, 16, 15 (tail: 3 micro-batches + 3)
    c = Counters()
    mbs = list(micro_batches(iter(rows), 4, 16, np.random.default_rng(0), True, False, c))
    assert c.skipped == {"over max_length": 6} and c.tail_dropped == 3
    assert [len(mb) for mb in mbs] == [4] * 11
    uids = [r["uid"] for mb in mbs for r in mb]
    assert len(set(uids)) == 44 and not {r["uid"] for r in rows if r["skip"]} & set(uids)
    # each window is grouped on its own: the first 4 micro-batches hold exactly the first window's rows
    first_window = [r["uid"] for r in rows if not r["skip"]][:16]
    assert sorted(uids[:16]) == sorted(first_window)
    assert merge_counters([{"skipped": {"a": 1}, "tail_dropped": 2}, {"skipped": {"a": 2, "b": 1}, "tail_dropped": 1}]) \
        == ({"a": 3, "b": 1}, 3)


def test_take_group_returns_a_short_group_at_the_end_of_the_stream():
    stream = iter([[{"uid": str(i)}] for i in range(5)])
    assert [len(take_group(stream, 2)) for _ in range(4)] == [2, 2, 1, 0]


def test_metrics_are_built_by_name_from_the_reduced_values():
    a = StepStats(loss=2.0, tokens=100, samples=4, data_wait_s=0.5, compute_s=1.5, padding_frac=0.1, uids=["x"])
    b = StepStats(loss=4.0, tokens=300, samples=4, data_wait_s=0.5, compute_s=2.5, padding_frac=0.3, uids=["y"])
    summed = [x + y for x, y in zip(Reduced.of(a).vector(), Reduced.of(b).vector())]  # what all_reduce(SUM) does
    red = Reduced.from_vector(summed)
    assert red == Reduced(loss=6.0, tokens=400.0, samples=8.0, data_wait_s=1.0, compute_s=4.0, padding_frac=0.4)
    m = step_metrics(7, 1, red, world=2, wall_s=4.0, lr=1e-3, size=ModelSize(1000, 10), peak_mem_bytes=123,
                     now=5.0)
    assert list(m) == METRIC_KEYS
    assert m["loss"] == 3.0 and m["padding_frac"] == pytest.approx(0.2) and m["data_wait_s"] == 0.5
    assert m["compute_s"] == 2.0 and m["compute_samples_per_s"] == 4.0 and m["compute_tokens_per_s"] == 200.0
    assert m["samples_per_s"] == 2.0 and m["tokens_per_s"] == 100.0 and m["step_wall_s"] == 4.0
    assert m["data_wait_frac"] == 0.2 and m["mfu"] is None and (m["step"], m["epoch"], m["lr"]) == (7, 1, 1e-3)
    gpu = step_metrics(7, 1, red, 2, 4.0, 1e-3, ModelSize(1000, 10, peak_flops=1e9), 123, 5.0)
    assert gpu["mfu"] == pytest.approx((4 * 1000 + 2 * 10) * 400 / 4.0 / 2 / 1e9)
    zero = step_metrics(1, 0, Reduced(0, 0, 0, 0, 0, 0), 1, 0.0, 1.0, ModelSize(1, 1, 1e9), 0, 0.0)
    assert zero["samples_per_s"] == zero["data_wait_frac"] == zero["compute_tokens_per_s"] == 0.0
    assert zero["mfu"] is None


def test_run_logs_append_locally_at_once(tmp_path):
    logs = RunLogs(str(tmp_path / "run"), tensorboard=True)
    for step in (1, 2):
        logs.write({"step": step, "loss": 1.0 / step, "mfu": None, "time": 0.0}, [f"u{step}", "v"])
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # before any flush
    logs.close()
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples == [{"step": 1, "uids": ["u1", "v"]}, {"step": 2, "uids": ["u2", "v"]}]
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    RunLogs(str(tmp_path / "run"), tensorboard=False).write({"step": 3}, [])  # a resumed run appends
    assert [json.loads(x)["step"] for x in read_appended(str(tmp_path / "run" / "metrics.jsonl")).splitlines()] \
        == [1, 2, 3]


def test_run_logs_on_s3_are_buffered_until_a_checkpoint_flushes_them(s3_server):
    make_bucket(s3_server, "runs")
    st = StorageConfig(endpoint_url=s3_server)
    run = "s3://runs/r1"
    logs = RunLogs(run, tensorboard=True, storage=st)
    assert logs.tb is not None and logs.tb_local is not None  # written locally, uploaded at each flush
    for step in (1, 2, 3):
        logs.write({"step": step, "loss": 0.5}, [f"u{step}"])
    assert read_appended(f"{run}/metrics.jsonl", st) == ""  # buffered: no PUT per step
    logs.flush()  # what save() does before each checkpoint
    assert [json.loads(x)["step"] for x in read_appended(f"{run}/metrics.jsonl", st).splitlines()] == [1, 2, 3]
    fs, _ = get_fs(run, st)
    first = {p: fs.size(p) for p in fs.glob("runs/r1/tensorboard/events.out.tfevents.*")}
    assert len(first) == 1  # the event file of steps 1-3, uploaded
    logs.write({"step": 4, "loss": 0.4}, ["u4"])
    logs.close()
    fs.invalidate_cache()
    after = {p: fs.size(p) for p in fs.glob("runs/r1/tensorboard/events.out.tfevents.*")}
    assert len(after) == 2 and all(after[p] == n for p, n in first.items())  # step 4 in a new file: no re-upload
    assert tensorboard_steps(fs, "runs/r1/tensorboard") == [1, 2, 3, 4]
    assert [json.loads(x)["uids"] for x in read_appended(f"{run}/samples.jsonl", st).splitlines()] == \
        [["u1"], ["u2"], ["u3"], ["u4"]]


def tensorboard_steps(fs, folder: str) -> list[int]:
    """The steps of train/loss in a TensorBoard folder on a store, over all its event files (TensorBoard's reader)."""
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as d:
        fs.get(f"{folder}/", d, recursive=True)
        acc = EventAccumulator(d)
        acc.Reload()
        return [e.step for e in acc.Scalars("train/loss")]


def _tokenised(n: int, mixed: bool = False) -> list[dict]:
    """n tokenised /2 rows: one video each, or (``mixed``) in turn a video, an image + a video, a text-only row."""
    from vlp.train.data import Tokenize

    rng = np.random.default_rng(0)
    kinds = [("video",), ("image", "video"), ()] if mixed else [("video",)]
    items = [kinds[i % len(kinds)] for i in range(n)]
    shapes = {"video": [264, 64], "image": [257, 64]}
    convs = [[{"from": "human", "value": "".join(f"<{m}>\n" for m in its) + "What color is the shape?"},
              {"from": "gpt", "value": "It is red." * (1 + i % 4)}] for i, its in enumerate(items)]
    cols = {"uid": [f"s0:u{i}" for i in range(n)], "media_type": [its[0] if len(its) == 1 else "mixed" if its
                                                                  else "text" for its in items],
            "modalities": [list(its) for its in items],
            "features": [[rng.standard_normal(shapes[m]).astype(np.float16).tobytes() for m in its] for its in items],
            "shape": [[np.asarray(shapes[m]) for m in its] for its in items], "mode": ["valley_pooled"] * n,
            "num_frames": [[8 if m == "video" else 1 for m in its] for its in items], "caption": [""] * n,
            "conversations": [json.dumps(c) for c in convs], "format": ["auto"] * n}
    return tokenise(cols, Tokenize("preset:tiny-llama", "vicuna_v1", 1024 if mixed else 512, "truncate", "valley"))


def test_step_inputs_of_a_mixed_micro_batch_are_per_item_lists_and_none_for_text_only():
    import torch

    from vlp.train.recipe import batch_inputs, probe_of

    rows = _tokenised(3, mixed=True)  # a video, an image + a video, a text-only row
    assert [r["skip"] for r in rows] == ["", "", ""]
    ids, labels, feats, modes, nfs, mods = batch_inputs(rows, "cpu", torch.float32)
    assert [len(f) if f is not None else None for f in feats] == [1, 2, None]
    assert [tuple(t.shape) for t in feats[1]] == [(257, 64), (264, 64)] and feats[1][0].dtype == torch.float32
    assert nfs == [[8], [1, 8], []] and modes == ["valley_pooled"] * 3
    assert mods == [["video"], ["image", "video"], []]  # for connectors that take an ItemContext
    assert [int((i == -200).sum()) for i in ids] == [1, 2, 0] and all(len(i) == len(l) for i, l in zip(ids, labels))
    np.testing.assert_array_equal(feats[1][1].numpy(), np.frombuffer(rows[1]["features"][1], np.float16)
                                  .reshape(264, 64).astype(np.float32))
    assert [int(r["length"]) for r in rows] == [len(i) - len(f or []) + sum(t.shape[0] for t in f or [])
                                                for i, f in zip(ids, feats)]  # visual tokens summed over items
    p = probe_of(rows[1])
    assert p["shape"] == [[257, 64], [264, 64]] and p["num_frames"] == [1, 8]
    assert p["modalities"] == ["image", "video"]
    assert probe_of(rows[2])["shape"] == [] and probe_of(rows[2])["num_frames"] == []


def test_the_probe_of_mixed_rows_and_an_old_single_item_probe_give_logits(one_rank, tmp_path):
    import torch

    from vlp.formats.export import probe_logits
    from vlp.models.videollm import ModelConfig, VideoLLM
    from vlp.train.recipe import probe_of

    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64, "llm": {"path": "preset:tiny-llama"}}))
    rows = _tokenised(3, mixed=True)
    for r in rows:  # two items, one, none: each runs, twice the same
        p = probe_of(r)
        assert torch.equal(probe_logits(model, p), probe_logits(model, p)) and torch.isfinite(probe_logits(model, p)).all()
    old = {**probe_of(rows[0]), "shape": [264, 64], "num_frames": 8}  # train_summary.json before per-item lists
    assert torch.equal(probe_logits(model, old), probe_logits(model, probe_of(rows[0])))


def test_recipe_steps_train_log_and_export_on_one_rank(one_rank, tmp_path):
    from vlp.formats.export import load_model, probe_logits

    cfg = validate(TrainConfig, {
        "run_name": "r", "data": {"sets": [{"uri": "unused"}], "template": "vicuna_v1", "max_length": 512},
        "model": {"vision_hidden_size": 64, "llm": {"path": "preset:tiny-llama", "trainable": True}},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
        "batch": {"global_size": 4, "micro_size": 2}, "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "scaling": {"num_workers": 1}})
    run_dir = str(tmp_path / "run")
    recipe = recipe_on_one_rank(cfg, run_dir, 4)
    rows = _tokenised(8)
    stream = micro_batches(iter(rows + rows), 2, 8, np.random.default_rng(0), True, False, recipe.counters)
    t_mark, losses = 0.0, []
    for _ in range(4):  # the same 8 rows twice: a learning step lowers the loss on them
        group = take_group(stream, cfg.batch.grad_accum)
        stats = recipe.train_step(group, data_wait_s=0.25)
        assert stats.samples == 4 and stats.tokens == sum(int(r["length"]) for mb in group for r in mb)
        assert stats.data_wait_s == 0.25 and stats.compute_s > 0 and len(stats.uids) == 4
        t_mark = recipe.log(stats, 0, t_mark)
        losses.append(stats.loss)
    assert all(math.isfinite(x) for x in losses) and losses[2] + losses[3] < losses[0] + losses[1]
    recipe.logs.close()
    metrics = [json.loads(x) for x in read_appended(f"{run_dir}/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(list(m) == METRIC_KEYS for m in metrics)
    assert [m["loss"] for m in metrics] == losses and metrics[-1]["data_wait_s"] == 0.25
    recipe.export(recipe.gather_counters())
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_metrics"] == metrics[-1] and summary["tail_dropped"] == 0
    model, _, _ = load_model(f"{run_dir}/export")  # the export holds the trained weights: the probe agrees
    assert torch.allclose(probe_logits(model, summary["probe"]), torch.tensor(summary["probe"]["logits"]), atol=1e-4)


def test_the_report_reads_metrics_from_an_s3_run_folder(s3_server, tmp_path, monkeypatch):
    """A run folder on an object store: the report reads metrics.jsonl's parts (storage.read_appended)."""
    from s3fs import S3FileSystem

    from vlp.synth.report import make_report

    make_bucket(s3_server, "reports")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # how a run on a non-AWS store is configured (no storage cfg)
    S3FileSystem.clear_instance_cache()  # a cached client would keep the endpoint it was made with
    try:
        logs = RunLogs("s3://reports/run", tensorboard=False)
        for step, loss in ((1, 2.0), (2, 1.5)):
            logs.write({"step": step, "loss": loss, "samples_per_s": 10.0, "data_wait_frac": 0.1,
                        "padding_frac": 0.05}, ["u"])
        logs.close()
        md = make_report(tmp_path / "report", {"stage1": "s3://reports/run"}, {}, {}).read_text()
    finally:
        S3FileSystem.clear_instance_cache()  # later tests must not inherit this endpoint
    assert "| stage1 | 2 | 2.000 | 1.500 |" in md


def test_each_part_trains_at_its_own_learning_rate_under_zero2(one_rank, tmp_path):
    """optim.lr_by_part: one AdamW group per part; through DeepSpeed's ZeRO-2 optimizer the LLM, at 1e-12, stays
    where it was while the connector, at optim.lr, moves; the logged lr is optim.lr's."""
    from vlp.train.recipe import param_groups

    cfg = validate(TrainConfig, {
        "run_name": "r", "data": {"sets": [{"uri": "unused"}], "template": "vicuna_v1", "max_length": 512},
        "model": {"vision_hidden_size": 64, "llm": {"path": "preset:tiny-llama", "trainable": True}},
        "optim": {"lr": 1e-2, "lr_by_part": {"llm": 1e-12}, "warmup_ratio": 0.0, "schedule": "constant"},
        "batch": {"global_size": 4, "micro_size": 2}, "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "scaling": {"num_workers": 1}})
    recipe = recipe_on_one_rank(cfg, str(tmp_path / "run"), 2)
    net = recipe.engine.module
    groups = param_groups(net, cfg.optim)
    assert [g["lr"] for g in groups] == [1e-12, 1e-2]  # llm, connector (the model's module order)
    assert sum(len(g["params"]) for g in groups) == len([p for p in net.parameters() if p.requires_grad])
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    stream = micro_batches(iter(_tokenised(8)), 2, 8, np.random.default_rng(0), True, False, recipe.counters)
    recipe.log(recipe.train_step(take_group(stream, cfg.batch.grad_accum)), 0, 0.0)
    recipe.logs.close()
    moved = {k: float((net.state_dict()[k] - v).abs().max()) for k, v in before.items()}
    assert max(v for k, v in moved.items() if k.startswith("llm.")) < 1e-9, moved
    assert min(v for k, v in moved.items() if k.startswith("connector.")) > 1e-4, moved
    assert json.loads(read_appended(f"{tmp_path}/run/metrics.jsonl").splitlines()[0])["lr"] == 1e-2


@pytest.mark.parametrize("stage,offload", [(2, {"offload_optimizer": {"device": "cpu"}}),
                                           (3, {"offload_optimizer": {"device": "cpu"},
                                                "offload_param": {"device": "cpu"}})])
def test_offloaded_optimizer_trains_on_the_cpu_accelerator(one_rank, tmp_path, stage, offload):
    """deepspeed.offload_optimizer cpu (ZeRO-2; ZeRO-3 with the weights offloaded too) on DeepSpeed's CPU
    accelerator: the engine steps with DeepSpeedCPUAdam (the op DeepSpeed builds on first use) over host-memory
    partitions, and the same rows trained twice lower the loss, as without offload."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cfg = validate(TrainConfig, {
        "run_name": "r", "data": {"sets": [{"uri": "unused"}], "template": "vicuna_v1", "max_length": 512},
        "model": {"vision_hidden_size": 64, "llm": {"path": "preset:tiny-llama", "trainable": True}},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
        "batch": {"global_size": 4, "micro_size": 2},
        "deepspeed": {"zero_stage": stage, "precision": "fp32", **offload}, "scaling": {"num_workers": 1}})
    recipe = recipe_on_one_rank(cfg, str(tmp_path / "run"), 4)
    assert isinstance(recipe.engine.basic_optimizer, DeepSpeedCPUAdam)
    zero = recipe.engine.config["zero_optimization"]
    assert {k: zero[k]["device"] for k in offload} == {k: "cpu" for k in offload}
    rows = _tokenised(8)
    stream = micro_batches(iter(rows + rows), 2, 8, np.random.default_rng(0), True, False, recipe.counters)
    losses = [recipe.train_step(take_group(stream, cfg.batch.grad_accum)).loss for _ in range(4)]
    recipe.logs.close()
    assert all(math.isfinite(x) for x in losses) and losses[2] + losses[3] < losses[0] + losses[1], losses
