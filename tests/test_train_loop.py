"""The training loop on tiny models and synthetic data: learning, resume, NaN guard, DDP, outputs."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from train.checkpoint import list_checkpoints, load_checkpoint
from train.config import ConfigError
from train.loop import NonFiniteLossError, pretrain
from train.methods import get_method
from train.resolve import resolve_config
from train.synthetic import SyntheticLoader

VIT = {
    "backbone": "vit_tiny_patch16_224",
    "img_size": 32,
    "patch_size": 8,
    "backbone_kwargs": {"depth": 2},
    "projector": [64, 64, 32],
    "predictor": [64, 32],
}
RESNET = {
    "backbone": "resnet18",
    "projector": [64, 32],
    "predictor": [64, 32],
}


def tiny(method: str, out, **sections) -> dict:
    """A config layer for a model that trains in well under a second per step on a CPU."""
    layer = {
        "method": method,
        "data": {
            "synthetic": True,
            "batch_size": 8,
            "size": 32,
            "instance_size": 16,
            "num_instances": 2,
            "synthetic_samples": 32,
        },
        "model": dict(VIT if method in ("mos", "mocov3", "dino") else RESNET),
        "schedule": {"epochs": 2, "warmup_epochs": 1},
        "optim": {"base_lr": 0.032},  # lr 1e-3 at batch 8
        "run": {"out": str(out), "log_every": 1, "ckpt_every": 1000, "tensorboard": False},
    }
    for name, values in sections.items():
        layer[name] = {**layer.get(name, {}), **values}
    return layer


def quiet(_msg: str) -> None:
    pass


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


# ------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("method", ["mos", "univip", "byol", "mocov3"])
def test_a_few_steps_lower_the_loss(method, tmp_path):
    # constant lr (min_lr = peak), no weight decay: 30 steps over 4 repeated batches
    cfg = resolve_config(
        tiny(
            method,
            tmp_path,
            schedule={"epochs": 1, "steps": 30, "warmup_epochs": 0},
            optim={"min_lr": 1e-3, "weight_decay": 0.0, "weight_decay_end": 0.0},
            ema={"start": 0.99},
        )
    )
    result = pretrain(cfg, log=quiet)
    values = [m["loss"] for m in result["metrics"]]
    assert len(values) == 30 and all(np.isfinite(values))
    assert np.mean(values[-5:]) < np.mean(values[:5]) - 0.1, values
    for term in get_method(method).terms:  # every term is logged
        assert all(np.isfinite(m[term]) for m in result["metrics"])


# --------------------------------------------------------------------------------- resume


class Crash(Exception):
    pass


class CrashingLoader(SyntheticLoader):
    """Raises after handing out ``limit`` batches: a run killed mid-epoch."""

    def __init__(self, *args, limit: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit = limit
        self.served = 0

    def __iter__(self):
        for batch in super().__iter__():
            if self.served == self.limit:
                raise Crash(f"killed after {self.limit} batches")
            self.served += 1
            yield batch


def loader_for(cfg, **kwargs):
    d = cfg.data
    return CrashingLoader(
        get_method(cfg.method).views,
        d.batch_size,
        seed=cfg.run.seed,
        size=d.size,
        instance_size=d.instance_size,
        num_instances=d.num_instances,
        num_samples=d.synthetic_samples,
        **kwargs,
    )


@pytest.mark.parametrize("method", ["mos", pytest.param("univip", marks=pytest.mark.slow)])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(method, tmp_path):
    # drop path on (MOS) exercises the RNG restore; the crash falls mid-epoch, two steps after
    # the last checkpoint, whose metrics lines must be dropped on resume
    extra = {"model": {"drop_path_rate": 0.1}} if method == "mos" else {}
    whole = resolve_config(tiny(method, tmp_path / "whole", **extra), {"run": {"ckpt_every": 3}})
    pretrain(whole, log=quiet)

    cut = resolve_config(tiny(method, tmp_path / "cut", **extra), {"run": {"ckpt_every": 3}})
    with pytest.raises(Crash):
        pretrain(cut, loader=loader_for(cut, limit=5), log=quiet)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-00000003.pt"]
    assert len(losses(tmp_path / "cut")) == 5
    pretrain(cut, log=quiet)  # auto-resume from the run directory

    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert len(a) == len(b) == 8
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    sa = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-00000008.pt")
    sb = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step-00000008.pt")
    for key, value in sa["model"].items():
        torch.testing.assert_close(sb["model"][key], value, rtol=0, atol=1e-6)
    sessions = json.loads((tmp_path / "cut" / "run.json").read_text())["sessions"]
    assert [s["start_step"] for s in sessions] == [0, 3]


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = resolve_config(tiny("byol", tmp_path), {"schedule": {"steps": 2}})
    pretrain(cfg, log=quiet)
    changed = resolve_config(tiny("byol", tmp_path), {"schedule": {"steps": 4}})
    with pytest.raises(ConfigError, match="schedule.steps: checkpoint 2, now 4"):
        pretrain(changed, log=quiet)
    # logging keys may change; a finished run has nothing left to do
    relogged = resolve_config(
        tiny("byol", tmp_path), {"schedule": {"steps": 2}, "run": {"log_every": 5}}
    )
    assert pretrain(relogged, log=quiet)["metrics"] == []


def test_explicit_resume_from_another_run_directory(tmp_path):
    first = resolve_config(tiny("mocov3", tmp_path / "a"), {"run": {"ckpt_every": 2}})
    with pytest.raises(Crash):
        pretrain(first, loader=loader_for(first, limit=3), log=quiet)
    second = resolve_config(tiny("mocov3", tmp_path / "b"), {"run": {"ckpt_every": 2}})
    result = pretrain(second, resume=tmp_path / "a" / "checkpoints" / "step-00000002.pt", log=quiet)
    assert [m["step"] for m in result["metrics"]] == list(range(3, 9))


# ------------------------------------------------------------------------------ NaN guard


class PoisonedLoader(SyntheticLoader):
    """Batch number ``bad`` (0-based, counted over the run) is all NaN."""

    def __init__(self, *args, bad: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad = bad
        self.served = 0

    def __iter__(self):
        for batch in super().__iter__():
            if self.served == self.bad:
                batch = {
                    k: v * float("nan") if v.is_floating_point() else v for k, v in batch.items()
                }
            self.served += 1
            yield batch


@pytest.mark.parametrize("log_every", [1, 3])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(log_every, tmp_path):
    cfg = resolve_config(
        tiny("univip", tmp_path), {"run": {"log_every": log_every, "ckpt_every": 2}}
    )
    d = cfg.data
    loader = PoisonedLoader(
        "univip",
        8,
        size=d.size,
        instance_size=d.instance_size,
        num_instances=2,
        num_samples=32,
        bad=4,
    )
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at step 5 \(loss=nan, scene=nan"
    ):
        pretrain(cfg, loader=loader, log=quiet)
    # checkpoints at steps 2 and 4; none at step 6, the first one due after the bad step
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002.pt", "step-00000004.pt"]
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(json.loads(line)["step"] <= 4 for line in open(tmp_path / "metrics.jsonl"))


# -------------------------------------------------------------------------------- outputs


def test_run_directory_contents(tmp_path):
    cfg = resolve_config(
        tiny("mos", tmp_path),
        {"run": {"log_every": 2, "ckpt_every": 3, "keep_last": 2, "tensorboard": True}},
    )
    lines = []
    pretrain(cfg, log=lines.append)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000006.pt", "step-00000008.pt"]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for key in ("epoch", "lr", "wd", "momentum", "loss", "m2s", "m2m", "s2s", "images_per_s"):
        assert key in records[0]
    info = json.loads((tmp_path / "run.json").read_text())
    session = info["sessions"][0]
    for key in ("git", "versions", "device", "command", "world_size"):
        assert key in session
    assert session["versions"]["torch"] == torch.__version__
    assert (
        resolve_config(__import__("yaml").safe_load((tmp_path / "config.yaml").read_text())) == cfg
    )
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert any("step 8/8" in line for line in lines)  # no TTY: one log line per logging step
    # checkpoints hold only tensors and primitives
    state = torch.load(list_checkpoints(tmp_path)[-1], weights_only=True)
    assert state["step"] == 8 and state["loader"] == {"epoch": 1, "batch": 4}
    assert len(state["rng"]) == 1 and isinstance(state["rng"][0]["torch"], torch.Tensor)


def test_schedules_reach_the_optimizer(tmp_path):
    cfg = resolve_config(tiny("mos", tmp_path))
    result = pretrain(cfg, log=quiet)
    lrs = [m["lr"] for m in result["metrics"]]
    wds = [m["wd"] for m in result["metrics"]]
    moms = [m["momentum"] for m in result["metrics"]]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-3)  # 4 warmup steps, then cosine
    assert wds[0] == pytest.approx(0.04) and wds == sorted(wds)  # 0.04 -> 0.4
    assert moms[0] == pytest.approx(0.992) and moms == sorted(moms)


# ------------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    cfg = resolve_config(
        tiny("mos", out, model={"drop_path_rate": 0.1}),
        {"data": {"batch_size": 16}, "run": {"ckpt_every": 4}},
    )
    result = pretrain(cfg, log=quiet)
    torch.save({"metrics": result["metrics"]}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.ddp
def test_two_process_gloo_run(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    # parameters identical on both ranks: rank 0 wrote the checkpoint, and every rank's
    # losses were computed from the same gathered keys and the same synced gradients
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert len(ranks[0]["metrics"]) == 4  # 32 samples / global batch 16 * 2 epochs
    for m in ranks[0]["metrics"] + ranks[1]["metrics"]:
        assert np.isfinite(m["loss"])
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # the two ranks drew different drop-path masks (per-rank RNG streams)
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def _ddp_resume_worker(rank: int, world: int, port: int, out: str, crash_after: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    cfg = resolve_config(
        tiny("mos", out, model={"drop_path_rate": 0.1}),
        {"data": {"batch_size": 16, "synthetic_samples": 48}, "run": {"ckpt_every": 2}},
    )
    loader = None
    if crash_after:
        d = cfg.data
        loader = CrashingLoader(
            "mos", 8, rank=rank, world_size=world, size=d.size, num_samples=48, limit=crash_after
        )
    try:
        pretrain(cfg, loader=loader, log=quiet)
    except Crash:
        pass  # both ranks die at the same step; pretrain() has left the process group


@pytest.mark.ddp
@pytest.mark.slow
def test_two_process_resume_matches_an_uninterrupted_run(tmp_path):
    world = 2
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    mp.spawn(_ddp_resume_worker, args=(world, _free_port(), whole, 0), nprocs=world, join=True)
    mp.spawn(_ddp_resume_worker, args=(world, _free_port(), cut, 4), nprocs=world, join=True)
    assert [p.name for p in list_checkpoints(cut)] == ["step-00000002.pt", "step-00000004.pt"]
    mp.spawn(_ddp_resume_worker, args=(world, _free_port(), cut, 0), nprocs=world, join=True)
    a, b = losses(whole), losses(cut)
    assert len(a) == len(b) == 6  # 48 samples / 16 * 2 epochs
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


def _ddp_param_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from train.distributed import init_distributed
    from train.loop import build_parts, train_step

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    cfg = resolve_config(tiny("univip", out), {"data": {"batch_size": 16}})
    info = init_distributed("cpu")
    parts = build_parts(cfg, info)
    parts.loader.set_epoch(0)
    values = [train_step(parts, batch, step) for step, batch in enumerate(parts.loader)]
    flat = torch.cat([p.detach().flatten() for p in parts.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    torch.save(
        {"same": all(torch.equal(gathered[0], g) for g in gathered), "values": torch.stack(values)},
        os.path.join(out, f"params{rank}.pt"),
    )
    dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_keeps_parameters_identical_across_ranks(tmp_path):
    world = 2
    mp.spawn(_ddp_param_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for r in range(world):
        result = torch.load(tmp_path / f"params{r}.pt")
        assert result["same"]
        assert torch.isfinite(result["values"]).all()


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_autocast_and_compile(precision, tmp_path):
    cfg = resolve_config(
        tiny("mos", tmp_path),
        {"run": {"device": "cuda", "precision": precision, "compile": True, "ckpt_every": 4}},
    )
    result = pretrain(cfg, log=quiet)
    assert all(np.isfinite(m["loss"]) for m in result["metrics"])
    state = load_checkpoint(result["checkpoint"])
    assert (state["scaler"] != {}) == (precision == "fp16")
    # resume on the GPU continues the run
    more = resolve_config(
        tiny("mos", tmp_path),
        {"run": {"device": "cuda", "precision": precision, "compile": True, "ckpt_every": 4}},
    )
    assert pretrain(more, log=quiet)["metrics"] == []


@pytest.mark.gpu
def test_gpu_univip_bf16_channels_last(tmp_path):
    cfg = resolve_config(tiny("univip", tmp_path), {"run": {"device": "cuda"}})
    result = pretrain(cfg, log=quiet)
    assert all(np.isfinite(m["loss"]) for m in result["metrics"])
