"""Issue 10, trainer side: what pretrain, plot, export and eval do with hostile inputs.

Every test makes its own input in ``tmp_path`` (shards are copied from the session's photo
shards and then damaged): atomic metrics trim (6), decode errors naming the sample (8), shards
checked against the manifest and boxes against the image (9), only finite checkpoints and the
resume after a non-finite stop (10), plot on odd metrics lines (19), eval at another input
size (20), disk full during a checkpoint (21), export over a checkpoint (24), temporaries of an
interrupted save (26).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import shards.atomic as atomic_module
import train.checkpoint as checkpoint_module
import train.loop as loop_module
from tests.test_train_loop import PoisonedLoader, quiet, tiny
from train.checkpoint import CheckpointWriteError, list_checkpoints, load_checkpoint
from train.config import ConfigError
from train.loop import NonFiniteLossError, pretrain
from train.methods import get_method
from train.resolve import resolve_config
from train.runlog import trim_metrics

warnings.filterwarnings("ignore", message=".*external source.*not used.*")


def short(method, out, steps=4, **sections):
    sections.setdefault("schedule", {"epochs": 1, "steps": steps, "warmup_epochs": 0})
    return tiny(method, out, **sections)


def dead_pid() -> int:
    """The PID of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ 6: metrics trim is atomic


def test_trim_metrics_replaces_the_file_and_a_crash_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    lines.insert(2, json.dumps({"note": "no step, written by another tool"}))
    original = "".join(f"{line}\n" for line in lines)
    path.write_text(original)

    def killed(src, dst):  # the process dies between writing the new file and the rename
        raise OSError(errno.EIO, "killed")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        trim_metrics(path, 3)
    assert path.read_text() == original  # the history is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary left

    monkeypatch.undo()
    trim_metrics(path, 3)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("step") for r in kept] == [1, 2, None, 3]


# --------------------------------------------------------------------------- shards to damage


def _copy_shards(tmp_path):
    pytest.importorskip("nvidia.dali")
    from tests.test_pipeline_shards import photo_shards

    dst = tmp_path / "shards"
    shutil.copytree(photo_shards(), dst)
    return dst


def _where(shards, ext="jpg", need_boxes=False):
    """(row, key, tar path, offset, size) of the first sample (with boxes, if asked)."""
    from pipeline.source import ShardIndex

    index = ShardIndex(shards)
    try:
        table = index.jpg if ext == "jpg" else index.boxes
        row = next(r for r in range(len(index)) if not need_boxes or index.boxes[r, 1] >= 16)
        off, size = (int(v) for v in table[row])
        return row, index.keys[row], index.tars[int(index.shard[row])], off, size
    finally:
        index.close()


def _patch(path, offset, data: bytes):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def real_cfg(method, out, shards, steps=2, **run):
    layer = short(method, out, steps=steps)
    layer["data"].update(synthetic=False, shards=str(shards), batch_size=4, size=32)
    layer["run"].update(run)
    return resolve_config(layer)


# -------------------------------------------------------- 8: decode errors name key and shard


def test_an_undecodable_jpeg_is_named_by_key_and_shard(tmp_path):
    from pipeline.loader import ViewLoader
    from pipeline.source import ShardError
    from pipeline.views import MOSViews

    shards = _copy_shards(tmp_path)
    _, key, tar, off, size = _where(shards)
    _patch(tar, off + 2, bytes(size - 2))  # SOI, then zeros: same size, DALI cannot decode it
    with ViewLoader(shards, MOSViews(size=64), batch_size=4, seed=0) as loader:
        with pytest.raises(ShardError, match=rf"{tar.name}: sample '{key}': its \.jpg cannot"):
            for epoch in range(2):
                loader.set_epoch(epoch)
                for _ in loader:
                    pass


def test_the_eval_loader_names_an_undecodable_sample(tmp_path):
    pytest.importorskip("nvidia.dali")
    from pipeline.eval import EvalLoader
    from pipeline.source import ShardError
    from tests.test_eval_loader import labelled_shards

    shards = tmp_path / "labelled"
    shutil.copytree(labelled_shards(), shards)
    _, key, tar, off, size = _where(shards)
    _patch(tar, off + 2, bytes(size - 2))
    with EvalLoader(shards, size=32, batch_size=2, num_threads=1) as loader:
        with pytest.raises(ShardError, match=rf"{tar.name}: sample '{key}': its \.jpg cannot"):
            list(loader)


def test_pretrain_names_the_undecodable_sample(tmp_path):
    from pipeline.source import ShardError

    shards = _copy_shards(tmp_path)
    _, key, tar, off, size = _where(shards)
    _patch(tar, off + 2, bytes(size - 2))
    cfg = real_cfg("byol", tmp_path / "run", shards, steps=3)  # one epoch: every sample
    with pytest.raises(ShardError, match=rf"{tar.name}: sample '{key}'"):
        pretrain(cfg, log=quiet, verify_shards=False)  # past the sha256 check
    assert list_checkpoints(tmp_path / "run") == []


# ----------------------------------------------- 9: shards against the manifest, boxes on read


def test_a_flipped_byte_is_refused_before_training(tmp_path):
    from pipeline.source import ShardError

    shards = _copy_shards(tmp_path)
    _, _, tar, off, size = _where(shards)
    raw = tar.read_bytes()
    _patch(tar, off + size // 2, bytes([raw[off + size // 2] ^ 0x01]))
    lines = []
    with pytest.raises(ShardError, match=rf"{tar}: sha256 .* differs from .*manifest.json"):
        pretrain(real_cfg("byol", tmp_path / "run", shards), log=lines.append)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_the_shard_check_caches_digests_of_unchanged_files(tmp_path):
    from pipeline.source import ShardError, check_shards

    shards = _copy_shards(tmp_path)
    cache = tmp_path / "run" / "shards-checked.json"
    first = check_shards(shards, cache=cache)
    assert first["hashed"] == first["shards"] == 3 and cache.is_file()
    again = check_shards(shards, cache=cache)
    assert again["hashed"] == 0 and again["cached"] == 3  # the fast path
    # a changed byte changes mtime and ctime even if the size stays: hashed again, refused
    _, _, tar, off, _ = _where(shards)
    raw = tar.read_bytes()
    _patch(tar, off + 40, bytes([raw[off + 40] ^ 0xFF]))
    with pytest.raises(ShardError, match=f"{tar.name}: sha256"):
        check_shards(shards, cache=cache)
    assert check_shards(shards, sha256=False, cache=cache)["hashed"] == 0  # sizes only


def test_a_truncated_tar_or_a_missing_index_names_the_file(tmp_path):
    from cli.train_cmds import pretrain as pretrain_cmd

    shards = _copy_shards(tmp_path)
    tar = shards / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    args = ["--method", "byol", "--data", str(shards), "--out", str(tmp_path / "run")]
    for extra in ([], ["--no-verify-shards"]):
        result = CliRunner().invoke(pretrain_cmd, args + extra)
        assert result.exit_code == 1, result.output  # an error, not a usage error (2)
        assert f"{tar}: 5000 bytes" in result.output and "truncated" in result.output
        assert "offset must be non-negative" not in result.output

    shards2 = _copy_shards(tmp_path / "b")
    (shards2 / "shard-000002.idx").unlink()
    args = ["--method", "byol", "--data", str(shards2), "--out", str(tmp_path / "run2")]
    result = CliRunner().invoke(pretrain_cmd, args)
    assert result.exit_code == 1, result.output
    assert "Usage:" not in result.output
    assert f"{shards2 / 'shard-000002.idx'}: DALI index of shard-000002.tar missing" in (
        result.output
    )


def test_the_index_refuses_a_tar_shorter_than_its_entries(tmp_path):
    from pipeline.source import ShardError, ShardIndex

    shards = _copy_shards(tmp_path)
    tar = shards / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(ShardError, match=r"shard-000000.tar: .* the tar is truncated"):
        ShardIndex(shards)


@pytest.mark.parametrize("workers", [0, 1])
def test_boxes_outside_the_image_are_refused_when_read(tmp_path, workers):
    import pickle

    from pipeline.loader import ViewLoader
    from pipeline.source import ShardError, ShardIndex
    from pipeline.views import UniVIPViews

    shards = _copy_shards(tmp_path)
    row, key, tar, off, _ = _where(shards, "boxes", need_boxes=True)
    _patch(tar, off, np.array([0, 0, 5000, 10], "<i4").tobytes())
    index = ShardIndex(shards)
    with pytest.raises(ShardError, match=rf"{tar}: sample '{key}': 1 of \d+ boxes outside"):
        index.read_boxes(row)
    worker_copy = pickle.loads(pickle.dumps(index))  # no keys: the name from the tar header
    assert worker_copy.keys is None and worker_copy.key(row) == key
    index.close()
    views = UniVIPViews(size=32, instance_size=16, k=2)
    with ViewLoader(shards, views, batch_size=4, seed=0, workers=workers) as loader:
        with pytest.raises(ShardError, match=rf"sample '{key}': 1 of \d+ boxes outside"):
            for epoch in range(2):
                loader.set_epoch(epoch)
                for _ in loader:
                    pass


# ------------------------------------------------------------------- 10: only finite weights


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    # the loss of step 4 is computed before step 4's update, and is finite; the update makes a
    # weight infinite: the checkpoint due at step 4 must not be written
    original = loop_module.train_step

    def step_then_blow_up(parts, batch, step):
        values = original(parts, batch, step)
        if step == 3:
            with torch.no_grad():
                next(parts.model.parameters()).fill_(float("inf"))
        return values

    monkeypatch.setattr(loop_module, "train_step", step_then_blow_up)
    cfg = resolve_config(short("byol", tmp_path, steps=6), {"run": {"ckpt_every": 2}})
    with pytest.raises(NonFiniteLossError, match="non-finite weights .* after step 4"):
        pretrain(cfg, log=quiet)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002.pt"]
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert json.loads((tmp_path / "non-finite.json").read_text())["step"] == 4


def _poisoned(cfg):
    d = cfg.data
    return PoisonedLoader(
        get_method(cfg.method).views,
        d.batch_size,
        size=d.size,
        instance_size=d.instance_size,
        num_instances=d.num_instances,
        num_samples=d.synthetic_samples,
        bad=4,
    )


def test_resume_after_a_non_finite_stop_may_lower_the_lr_or_clip(tmp_path):
    layer = short("univip", tmp_path, steps=8)  # PoisonedLoader poisons UniVIP's batch dict
    cfg = resolve_config(layer, {"run": {"ckpt_every": 2}})
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 5"):
        pretrain(cfg, loader=_poisoned(cfg), log=quiet)
    assert list_checkpoints(tmp_path)[-1].name == "step-00000004.pt"
    base_lr = cfg.optim.base_lr
    # a higher lr, or any other key, is still refused
    higher = resolve_config(layer, {"run": {"ckpt_every": 2}, "optim": {"base_lr": base_lr * 2}})
    with pytest.raises(ConfigError, match="optim.base_lr: checkpoint"):
        pretrain(higher, log=quiet)
    other = resolve_config(
        layer, {"run": {"ckpt_every": 2}, "optim": {"base_lr": base_lr / 2, "weight_decay": 0.5}}
    )
    with pytest.raises(ConfigError, match="optim.weight_decay: checkpoint") as refused:
        pretrain(other, log=quiet)
    assert "optim.base_lr" not in str(refused.value).split("differs")[1].split("\n  (")[0]
    # the advice of the message: a lower lr and clipping
    fixed = resolve_config(
        layer,
        {"run": {"ckpt_every": 2}, "optim": {"base_lr": base_lr / 2, "clip_grad": 1.0}},
    )
    lines = []
    result = pretrain(fixed, log=lines.append)
    assert [m["step"] for m in result["metrics"]] == [5, 6, 7, 8]
    said = [line for line in lines if "after the non-finite stop at step 5" in line]
    assert said and "optim.base_lr" in said[0] and "optim.clip_grad" in said[0]
    session = json.loads((tmp_path / "run.json").read_text())["sessions"][-1]
    assert len(session["changed_after_non_finite"]) == 2
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])["config"]["optim"]["clip_grad"] == 1.0


def test_resume_without_a_non_finite_stop_still_refuses_a_lower_lr(tmp_path):
    layer = short("byol", tmp_path, steps=4)
    pretrain(resolve_config(layer, {"run": {"ckpt_every": 2}}), log=quiet)
    lower = resolve_config(layer, {"schedule": {"steps": 4}, "optim": {"base_lr": 0.001}})
    with pytest.raises(ConfigError, match="optim.base_lr: checkpoint"):
        pretrain(lower, log=quiet)


def test_an_infinite_lr_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="optim.base_lr"):
        pretrain(resolve_config(short("byol", tmp_path, optim={"base_lr": float("inf")})))
    assert not list_checkpoints(tmp_path)


# ----------------------------------------------------------------- 19: plot on odd metrics


def test_plot_skips_and_counts_lines_without_a_numeric_step(tmp_path):
    from train.outputs.plots import plot_run, read_metrics

    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"note": "a line of another tool"},  # first line, no step and no number: ZeroDivision
        {"step": None, "loss": 3.0},
        {"step": "7", "loss": 2.0},
        [1, 2, 3],
        {"step": True, "loss": 9.0},
        {"step": 1, "loss": 2.0, "term": 1.0},
        {"step": 2, "loss": 1.5},  # a term missing on one line
        {"step": 2, "eval/knn_top1": 10.0, "eval/knn_top5": None},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    metrics = read_metrics(run)
    assert metrics.skipped == [1, 2, 3, 4, 5]
    said = []
    out = plot_run(run, tmp_path / "curves.png", log=said.append)
    assert (
        out.is_file() and "5 line(s) without a numeric step skipped (line 1, 2, 3, 4, 5)" in said[0]
    )

    (run / "metrics.jsonl").write_text(json.dumps({"step": "x"}) + "\n")
    with pytest.raises(ValueError, match="no training steps logged yet .1 line"):
        plot_run(run, tmp_path / "curves.png", log=said.append)


# -------------------------------------------------------------- 20: eval at another input size


def test_a_vit_is_evaluated_at_another_size_by_resampling_its_position_embedding(tmp_path):
    from train.eval.features import fit_input_size, load_backbone

    cfg = resolve_config(short("mos", tmp_path, steps=1, model={"img_size": 64}, data={"size": 64}))
    pretrain(cfg, log=quiet)
    backbone, _ = load_backbone(tmp_path)
    with pytest.raises(ValueError, match=r"--size 30: .* multiples of 8 \(8, 16, 24"):
        fit_input_size(backbone, 30)
    note = fit_input_size(backbone, 32)
    assert "from 8x8 to 4x4 patches" in note
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 192)
    assert fit_input_size(backbone, 32) is None  # already there

    pytest.importorskip("nvidia.dali")
    from tests.test_eval_loader import labelled_shards
    from train.eval.classify import knn_eval

    shards = labelled_shards()
    report = knn_eval(tmp_path, shards, shards, k=2, size=32, batch_size=4, device="cpu")
    assert report["size"] == 32 and "4x4 patches" in report["input_size_change"]


# ------------------------------------------------------------------- 21: disk full, clearly


def test_disk_full_during_a_checkpoint_says_so_and_keeps_the_old_one(tmp_path, monkeypatch):
    cfg = resolve_config(short("byol", tmp_path, steps=4), {"run": {"ckpt_every": 2}})
    real_save = torch.save
    calls = []

    def full(state, f):
        calls.append(state["step"])
        if state["step"] == 4:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, f)

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(CheckpointWriteError, match=r"no space left on .*checkpoints: "):
        pretrain(cfg, log=quiet)
    d = tmp_path / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["step-00000002.pt"]  # no temporary left
    assert load_checkpoint(d / "step-00000002.pt")["step"] == 2


def test_torch_s_hidden_write_error_is_reported_as_disk_full(tmp_path, monkeypatch):
    """torch's zip writer turns a failed write into ``[enforce fail at inline_container.cc]``;
    the real OSError is recovered."""

    class FullFile:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    # checkpoints are written through shards.atomic: its open() gets the full disk
    monkeypatch.setattr(
        atomic_module, "open", lambda p, m, **kw: FullFile(open(p, m, **kw)), raising=False
    )
    state = {"format": 1, "w": torch.zeros(10_000)}
    with pytest.raises(CheckpointWriteError, match="no space left on") as e:
        checkpoint_module.save_checkpoint(state, tmp_path, 3, keep_last=2)
    assert e.value.errno == errno.ENOSPC and "inline_container" not in str(e.value)
    assert list((tmp_path / "checkpoints").iterdir()) == []


# ------------------------------------------------------------- 24: export over a checkpoint


def test_export_refuses_to_overwrite_a_checkpoint(tmp_path):
    import hashlib

    from train.outputs.export import export_backbone

    run = tmp_path / "run"
    pretrain(resolve_config(short("byol", run, steps=2)), log=quiet)
    ckpt = list_checkpoints(run)[-1]
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="checkpoint folder"):
        export_backbone(run, ckpt)
    with pytest.raises(ValueError, match="checkpoint folder"):
        export_backbone(run, run / "checkpoints" / "backbone.pth")
    elsewhere = tmp_path / "kept.pt"
    shutil.copy(ckpt, elsewhere)
    with pytest.raises(ValueError, match="is a pretraining checkpoint"):
        export_backbone(run, elsewhere)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [ckpt.name]
    export_backbone(run, tmp_path / "backbone.pth")  # anywhere else: as before
    export_backbone(run, tmp_path / "backbone.pth")  # and again over an export


# --------------------------------------------- 26: temporaries of an interrupted save, cleaned


def test_temporaries_of_an_interrupted_save_are_removed_and_said(tmp_path):
    cfg = resolve_config(short("byol", tmp_path, steps=2), {"run": {"ckpt_every": 1}})
    pid = dead_pid()
    (tmp_path / "checkpoints").mkdir(parents=True)
    stale = [
        tmp_path / "checkpoints" / f".step-00000001.pt.tmp-{pid}-1",
        tmp_path / f".metrics.jsonl.tmp-{pid}-1",
    ]
    for p in stale:
        p.write_bytes(b"half a file")
    foreign = tmp_path / "checkpoints" / "notes.tmp-1"  # not ours: left alone
    foreign.write_text("x")
    lines = []
    pretrain(cfg, log=lines.append)
    assert not any(p.exists() for p in stale) and foreign.exists()
    said = [line for line in lines if line.startswith("removed 2 temporary file(s)")]
    assert said and f".step-00000001.pt.tmp-{pid}-1" in said[0]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001.pt", "step-00000002.pt"]
