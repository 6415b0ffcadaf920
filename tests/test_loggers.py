"""Where the metrics go (train.runlog.RunLog): metrics.jsonl, TensorBoard with the config as text
and hparams, Weights & Biases (offline) across a resume; a missing wandb; the ETA."""

import json
import struct
import sys
import time
import types
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.test_train_loop import Crash, loader_for, quiet, tiny
from train.config import ConfigError, to_dict
from train.loop import _format_eta, eta_seconds, pretrain
from train.resolve import resolve_config
from train.resume import check_resume_config
from train.runinfo import redact_command
from train.runlog import WANDB_FILE, RunLog, flatten_config

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # a W&B API key's shape, 40 characters


# ----------------------------------------------------------------------- W&B offline files


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version),
    then a LevelDB-style log of 32 KiB blocks, each record ``crc32, length, type`` + data, a
    record split over blocks as FIRST, MIDDLE..., LAST."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of an offline run's ``.wandb`` file once it holds the run's ``exit`` record.
    ``run.finish()`` can return before W&B's service process has written the file out (seen on
    loaded machines), so this waits for the writer, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(wandb_records(path))
        except Exception:  # noqa: BLE001 - a record caught half-written; read again
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout:.0f} s")
        time.sleep(0.2)


def read_offline_run(run_dir: Path) -> dict:
    """``{"id", "config", "history": [{key: value}], "summary": {key: value}}`` of one offline
    W&B run directory (``RUN/wandb/offline-run-*``)."""
    (path,) = run_dir.glob("*.wandb")
    out: dict = {"id": None, "config": {}, "history": [], "summary": {}}

    def key(item):
        return item.key or "/".join(item.nested_key)

    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            for item in record.run.config.update:
                out["config"][key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
    return out


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its settings and caches in ``tmp_path``, a fake API key in the environment."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_API_KEY": FAKE_KEY,
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
    }.items():
        monkeypatch.setenv(var, value)


def test_wandb_offline_run_then_resume_continues_the_same_wandb_run(tmp_path, offline_wandb):
    run = tmp_path / "run"
    layer = {"run": {"ckpt_every": 3, "wandb": {"project": "ssl-tests", "mode": "offline"}}}
    cfg = resolve_config(tiny("mos", run), layer)
    with pytest.raises(Crash):  # killed after step 5; the last checkpoint is step 3
        pretrain(cfg, loader=loader_for(cfg, limit=5), log=quiet)
    first_id = json.loads((run / WANDB_FILE).read_text())["id"]
    result = pretrain(cfg, log=quiet)  # auto-resume at step 3

    assert [m["step"] for m in result["metrics"]] == [4, 5, 6, 7, 8]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 7, 8]  # cut at 3, then 4..8
    assert json.loads((run / WANDB_FILE).read_text()) == {"id": first_id, "last_step": 8}

    runs = sorted((run / "wandb").glob("offline-run-*"), key=lambda p: p.name)
    assert len(runs) == 2  # one per start, both of the same W&B run
    first, second = (read_offline_run(p) for p in runs)
    assert first["id"] == second["id"] == first_id
    for part in (first, second):
        assert part["config"]["method"] == "mos"
        assert part["config"]["optim"]["base_lr"] == cfg.optim.base_lr
        assert part["config"]["run"]["wandb"]["project"] == "ssl-tests"
    # W&B cannot rewind: steps 4 and 5, which it has, are not sent again after the resume
    assert [h["_step"] for h in first["history"]] == [1, 2, 3, 4, 5]
    assert [h["_step"] for h in second["history"]] == [6, 7, 8]
    by_step = {r["step"]: r for r in lines}
    for h in first["history"] + second["history"]:
        assert h["train/loss"] == pytest.approx(by_step[h["_step"]]["loss"])
        assert h["train/lr"] == pytest.approx(by_step[h["_step"]]["lr"])
    assert second["summary"]["train/loss"] == pytest.approx(result["metrics"][-1]["loss"])
    assert second["summary"]["_step"] == 8

    # no credential in what the run directory records
    for path in run.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert not any("key" in k.lower() for k in flatten_dict(saved))


def flatten_dict(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys += flatten_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


def test_wandb_named_after_the_run_directory_with_tags(tmp_path, offline_wandb):
    run = tmp_path / "my-run"
    layer = {"run": {"wandb": {"project": "p", "mode": "offline", "tags": ["a", "b"]}}}
    cfg = resolve_config(tiny("byol", run, schedule={"steps": 2, "warmup_epochs": 0}), layer)
    pretrain(cfg, log=quiet)
    (path,) = (run / "wandb").glob("offline-run-*/*.wandb")
    (record,) = [r for r in finished_records(path) if r.WhichOneof("record_type") == "run"]
    assert record.run.display_name == "my-run" and list(record.run.tags) == ["a", "b"]
    assert record.run.project == "p"


# ------------------------------------------------------------------------ W&B step handling


class FakeWandb(types.ModuleType):
    """A stand-in ``wandb`` module: records init's arguments and every ``log``; the server's
    next step is ``starting_step`` (what an online resume reports)."""

    def __init__(self, starting_step: int = 0):
        super().__init__("wandb")
        self.starting_step = starting_step
        self.inits: list[dict] = []
        self.logged: list[tuple[int, dict]] = []
        self.finished: list[int] = []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        wandb = self

        class Run:
            starting_step = wandb.starting_step

            def log(self, data, step):
                wandb.logged.append((step, dict(data)))

            def finish(self, exit_code=0):
                wandb.finished.append(exit_code)

        return Run()


def test_runlog_sends_only_steps_beyond_what_wandb_has(tmp_path, monkeypatch):
    fake = FakeWandb(starting_step=6)  # the W&B run already has steps up to 5
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = resolve_config(
        tiny("byol", tmp_path), {"run": {"wandb": {"project": "p", "entity": "team"}}}
    )
    (tmp_path / WANDB_FILE).write_text(json.dumps({"id": "abc123", "last_step": 4}))
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
    )
    with RunLog(tmp_path, cfg, start=3) as log:
        for step in (4, 5, 6):
            log.write({"step": step, "loss": float(step), "lr": 0.1})
        log.write({"step": 6, "eval/knn_top1": 50.0, "eval/knn_top5": 80.0})
    (init,) = fake.inits
    assert init["id"] == "abc123" and init["resume"] == "allow"
    assert init["project"] == "p" and init["entity"] == "team" and init["mode"] == "online"
    assert init["name"] == tmp_path.name and init["dir"] == str(tmp_path)
    assert init["config"] == to_dict(cfg)
    # 4 and 5 are in metrics.jsonl (cut at 3, then written again) but not sent to W&B again
    assert fake.logged == [
        (6, {"train/loss": 6.0, "train/lr": 0.1}),
        (6, {"eval/knn_top1": 50.0, "eval/knn_top5": 80.0}),
    ]
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [
        1,
        2,
        3,
        4,
        5,
        6,
        6,
    ]
    assert fake.finished == [0]
    assert json.loads((tmp_path / WANDB_FILE).read_text()) == {"id": "abc123", "last_step": 6}


def test_a_failed_run_is_marked_failed_in_wandb(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = resolve_config(tiny("byol", tmp_path), {"run": {"wandb": {"project": "p"}}})
    with pytest.raises(Crash):
        pretrain(cfg, loader=loader_for(cfg, limit=2), log=quiet)
    assert [s for s, _ in fake.logged] == [1, 2] and fake.finished == [1]
    assert len(fake.inits[0]["id"]) == 16  # a new id, kept for the next start
    assert json.loads((tmp_path / WANDB_FILE).read_text())["id"] == fake.inits[0]["id"]


def test_wandb_disabled_or_without_a_project_needs_no_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    for i, wandb in enumerate(({"project": "p", "mode": "disabled"}, {"project": ""})):
        cfg = resolve_config(tiny("byol", tmp_path / str(i)), {"run": {"wandb": wandb}})
        with RunLog(cfg.run.out, cfg) as log:
            log.write({"step": 1, "loss": 1.0})
        assert not (Path(cfg.run.out) / WANDB_FILE).exists()


# ----------------------------------------------------------------------------- wandb missing


def test_wandb_on_but_not_installed_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    run = tmp_path / "run"
    cfg = resolve_config(tiny("byol", run), {"run": {"wandb": {"project": "p"}}})
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[wandb\]'"):
        pretrain(cfg, log=quiet)
    assert not run.exists()  # nothing was built, trained or written

    from cli.train_cmds import pretrain as pretrain_cmd

    result = CliRunner().invoke(
        pretrain_cmd,
        ["--synthetic", "--method", "byol", "--out", str(run), "--steps", "2"]
        + ["--set", "run.wandb.project=p", "--set", "run.wandb.mode=offline"],
    )
    assert result.exit_code == 1, result.output
    assert "wandb cannot be imported" in result.output
    assert "pip install -e '.[wandb]'" in result.output
    assert not (run / "checkpoints").exists()


# ------------------------------------------------------------------------------ TensorBoard


def test_tensorboard_holds_the_config_as_text_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    cfg = resolve_config(
        tiny("mos", run, schedule={"steps": 4, "warmup_epochs": 0}),
        {"run": {"tensorboard": True, "ckpt_every": 2}},
    )
    pretrain(cfg, log=quiet)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/m2s", "train/lr", "train/images_per_s"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]

    (text,) = events.Tensors("config/text_summary")
    body = text.tensor_proto.string_val[0].decode()
    assert body.startswith("```yaml\n") and body.endswith("```")
    assert resolve_config(yaml.safe_load(body[len("```yaml\n") : -3])) == cfg
    assert text.step == 0

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    flat = flatten_config(cfg)
    assert set(hparams) == set(flat)
    assert hparams["optim.base_lr"].number_value == pytest.approx(cfg.optim.base_lr)
    assert hparams["method"].string_value == "mos"
    assert hparams["model.backbone"].string_value == cfg.model.backbone
    assert hparams["model.projector"].string_value == json.dumps(list(cfg.model.projector))
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metrics = [m.name.tag for m in experiment.experiment.metric_infos]
    assert metrics == ["train/loss", "train/m2s", "train/m2m", "train/s2s"]

    # a resume from step 2 purges the events after it and writes the config at step 2 again
    (run / "checkpoints" / "step-00000004.pt").unlink()
    pretrain(cfg, log=quiet)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [t.step for t in events.Tensors("config/text_summary")] == [0, 2]


# ------------------------------------------------------------------------------ resume keys


def test_run_wandb_may_change_on_resume(tmp_path):
    saved = to_dict(resolve_config(tiny("byol", tmp_path)))
    changed = resolve_config(
        tiny("byol", tmp_path),
        {"run": {"wandb": {"project": "p", "entity": "e", "mode": "offline", "tags": ["x"]}}},
    )
    assert check_resume_config(changed, saved) == []
    other = resolve_config(tiny("byol", tmp_path), {"optim": {"weight_decay": 0.5}})
    with pytest.raises(ConfigError, match="optim.weight_decay"):
        check_resume_config(other, saved)


# ------------------------------------------------------------------------------------- ETA


def test_eta_is_the_cumulative_rate_since_the_start():
    # 10 steps done of 110 since a start at step 0, in 20 s of training: 2 s a step
    assert eta_seconds(10, 0, 110, 20.0) == pytest.approx(200.0)
    # resumed at 100: only the 10 steps of this start count, not the 100 before it
    assert eta_seconds(110, 100, 200, 5.0) == pytest.approx(45.0)
    # 20 steps in 100 s (whatever the last window took): 5 s a step for the 20 left
    assert eta_seconds(20, 0, 40, 100.0) == pytest.approx(100.0)
    assert eta_seconds(0, 0, 10, 0.0) is None and eta_seconds(5, 5, 10, 1.0) is None
    assert _format_eta(None) == "?" and _format_eta(3725.4) == "1:02:05"


def test_the_log_line_eta_uses_training_time_since_the_start(tmp_path, monkeypatch):
    """A fake clock: each training step takes 1 s and a checkpoint save 100 s; the ETA on the
    log line after step 2 of 8 is 6 steps at 1 s, not skewed by the save at step 1."""
    import train.loop as loop_module

    clock = {"now": 0.0}
    monkeypatch.setattr(loop_module.time, "perf_counter", lambda: clock["now"])
    original_step, original_save = loop_module.train_step, loop_module._save

    def step(parts, batch, i):
        clock["now"] += 1.0
        return original_step(parts, batch, i)

    def save(*args):
        clock["now"] += 100.0
        return original_save(*args)

    monkeypatch.setattr(loop_module, "train_step", step)
    monkeypatch.setattr(loop_module, "_save", save)
    cfg = resolve_config(tiny("byol", tmp_path), {"run": {"ckpt_every": 1, "progress": False}})
    lines: list[str] = []
    result = pretrain(cfg, log=lines.append)
    etas = [line.rsplit("eta ", 1)[1] for line in lines if line.startswith("step ")]
    assert etas == [f"0:00:{8 - s:02d}" for s in range(1, 9)]
    assert all(m["images_per_s"] == pytest.approx(8.0) for m in result["metrics"])


# ---------------------------------------------------------------------------------- secrets


def test_the_recorded_command_line_holds_no_secret():
    argv = ["ssl-cli", "pretrain", "--api-key", "s3cret", "--set", "run.x.token=s3cret"]
    argv += ["WANDB_API_KEY=s3cret", "--out", "RUN", "--password=s3cret", "--steps", "3"]
    assert redact_command(argv) == [
        "ssl-cli",
        "pretrain",
        "--api-key",
        "***",
        "--set",
        "run.x.token=***",
        "WANDB_API_KEY=***",
        "--out",
        "RUN",
        "--password=***",
        "--steps",
        "3",
    ]
