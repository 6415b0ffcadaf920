"""DINO: the loss against a loop-by-loop reference, the centre over gloo ranks, the head, the
schedules, the passes of a step, the frozen last layer, exact resume and the printed recipe."""

import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from torch import nn

from cli.main import main as cli
from tests.test_train_loop import VIT, Crash, loader_for, quiet, tiny
from train.checkpoint import load_checkpoint
from train.loop import pretrain
from train.losses.dino import DINOConfig, DINOLoss, teacher_temp_schedule
from train.methods import build_model
from train.models import DINOHead, WeightNormLinear
from train.optim import clip_gradients
from train.resolve import resolve_config

K = 12  # prototypes in the loss tests


def dino_layer(out, **sections) -> dict:
    """A tiny DINO run on synthetic data: a 2-block ViT on 32-px globals and 16-px locals."""
    layer = tiny("dino", out, **sections)
    layer["model"] = {**VIT, "backbone_kwargs": {"depth": 2, "dynamic_img_size": True}}
    layer["data"] = {**layer["data"], "views": {"num_local": 3, "local_size": 16}}
    layer["loss"] = {"out_dim": 64, **sections.get("loss", {})}
    return layer


# ------------------------------------------------------------------------------------- loss


def reference_loss(student, teacher, center, student_temp, teacher_temp):
    """Eq. 3 written out sample by sample and class by class in Python floats."""
    student = [s.double().tolist() for s in student]
    teacher = [t.double().tolist() for t in teacher]
    center = center.double().flatten().tolist()

    def softmax(row):
        top = max(row)
        e = [math.exp(x - top) for x in row]
        return [x / sum(e) for x in e]

    terms = []
    for i, t_view in enumerate(teacher):
        for v, s_view in enumerate(student):
            if v == i:
                continue
            per_sample = []
            for t_row, s_row in zip(t_view, s_view):
                p_t = softmax([(t - c) / teacher_temp for t, c in zip(t_row, center)])
                p_s = softmax([s / student_temp for s in s_row])
                per_sample.append(-sum(a * math.log(b) for a, b in zip(p_t, p_s)))
            terms.append(sum(per_sample) / len(per_sample))
    return sum(terms) / len(terms), len(terms)


def test_loss_matches_the_loop_by_loop_reference_and_centres_by_ema():
    g = torch.Generator().manual_seed(0)
    b, n_local = 5, 3
    teacher = [torch.randn(b, K, generator=g) * 3 for _ in range(2)]
    student = [torch.randn(b, K, generator=g) * 3 for _ in range(2 + n_local)]
    loss = DINOLoss(K, student_temp=0.1, center_momentum=0.9)
    loss.center.copy_(torch.randn(1, K, generator=g))
    center0 = loss.center.clone()

    out = loss(student, teacher, teacher_temp=0.05)
    expected, pairs = reference_loss(student, teacher, center0, 0.1, 0.05)
    assert pairs == 2 * (2 + n_local) - 2  # every teacher global against every other view
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    # eq. 4: c <- 0.9 c + 0.1 * mean of the teacher outputs of both global views
    mean = torch.cat(teacher).mean(0, keepdim=True)
    torch.testing.assert_close(loss.center, 0.9 * center0 + 0.1 * mean)


def test_the_teacher_temperature_sharpens_and_the_loss_takes_float32_under_bf16():
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(4, K, generator=g) for _ in range(2)]
    student = [torch.randn(4, K, generator=g) for _ in range(4)]
    sharp = DINOLoss(K)(student, teacher, teacher_temp=0.04)["loss"]
    flat = DINOLoss(K)(student, teacher, teacher_temp=1.0)["loss"]
    assert sharp.item() != pytest.approx(flat.item(), rel=1e-3)
    half = DINOLoss(K)([s.bfloat16() for s in student], [t.bfloat16() for t in teacher], 0.04)
    ref, _ = reference_loss(
        [s.bfloat16() for s in student], [t.bfloat16() for t in teacher], torch.zeros(K), 0.1, 0.04
    )
    assert half["loss"].dtype == torch.float32
    assert half["loss"].item() == pytest.approx(ref, rel=1e-5)


def _centre_worker(rank, world, port, teacher, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss = DINOLoss(teacher[0].shape[1], center_momentum=0.9)
        share = teacher[0].shape[0] // world
        mine = [t[rank * share : (rank + 1) * share] for t in teacher]
        for _ in range(3):  # three updates: the EMA compounds the same on every rank
            loss.update_center(torch.cat(mine))
        torch.save(loss.center, os.path.join(out_dir, f"center{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [1, 2])
def test_the_centre_is_the_same_on_gloo_ranks_as_on_one_process_with_the_whole_batch(
    world, tmp_path
):
    g = torch.Generator().manual_seed(2)
    teacher = [torch.randn(8, K, generator=g) for _ in range(2)]
    whole = DINOLoss(K, center_momentum=0.9)
    for _ in range(3):
        whole.update_center(torch.cat(teacher))
    mp.spawn(
        _centre_worker, args=(world, _free_port(), teacher, str(tmp_path)), nprocs=world, join=True
    )
    for rank in range(world):
        torch.testing.assert_close(torch.load(tmp_path / f"center{rank}.pt"), whole.center)


# ------------------------------------------------------------------------- head, schedules


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_weight_norm_linear_is_torch_weight_norm_with_its_keys():
    torch.manual_seed(0)
    ours = WeightNormLinear(6, 5)
    with torch.no_grad():
        ours.weight_g.mul_(torch.rand(5, 1) + 0.5)
    theirs = nn.utils.weight_norm(nn.Linear(6, 5, bias=False))
    assert set(theirs.state_dict()) == set(ours.state_dict()) == {"weight_g", "weight_v"}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(ours(x), theirs(x))


def test_dino_head_normalises_the_bottleneck_and_freezes_g():
    head = DINOHead(16, (32, 32, 8), 20, norm_last_layer=True)
    layers = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [layer.out_features for layer in layers] == [32, 32, 8]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert not head.last_layer.weight_g.requires_grad
    assert torch.all(head.last_layer.weight_g == 1)
    # with g = 1 every output is a cosine between the l2-normalised bottleneck and a prototype
    x = torch.randn(4, 16)
    z = nn.functional.normalize(head.mlp(x), dim=-1)
    v = nn.functional.normalize(head.last_layer.weight_v, dim=-1)
    torch.testing.assert_close(head(x), z @ v.T)
    assert head(x).abs().max() <= 1 + 1e-5
    assert DINOHead(16, (8,), 20, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_teacher_temperature_warms_up_by_epoch_as_the_reference():
    cfg = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    temps = teacher_temp_schedule(cfg, steps_per_epoch=2, total_steps=10)
    # main_dino.py: np.linspace(0.04, 0.07, 3) per epoch, then 0.07, indexed by the epoch
    expected = np.repeat([0.04, 0.055, 0.07, 0.07, 0.07], 2)
    np.testing.assert_allclose(temps, expected)
    constant = teacher_temp_schedule(DINOConfig(), steps_per_epoch=2, total_steps=5)
    np.testing.assert_allclose(constant, 0.04)


def test_per_parameter_clipping_is_dinos():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5: scaled to 1
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5: untouched
    clip_gradients([a, b], 1.0, per_param=True)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) / (5 + 1e-6))
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))


def test_recipe_values_and_print_config():
    cfg = resolve_config({"method": "dino"})
    assert cfg.loss == DINOConfig(
        out_dim=65536,
        norm_last_layer=True,
        student_temp=0.1,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
        center_momentum=0.9,
        freeze_last_layer=1,
    )
    assert (cfg.optim.name, cfg.optim.base_lr, cfg.optim.min_lr) == ("adamw", 5e-4, 1e-6)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.4)
    assert (cfg.optim.clip_grad, cfg.optim.clip_per_param) == (3.0, True)
    assert (cfg.ema.start, cfg.ema.end, cfg.schedule.warmup_epochs) == (0.996, 1.0, 10)
    assert cfg.model.projector == (2048, 2048, 256) and cfg.model.drop_path_rate == 0.1
    assert cfg.data.views["num_local"] == 8 and cfg.data.views["local_size"] == 96
    result = CliRunner().invoke(cli, ["pretrain", "--method", "dino", "--print-config"])
    assert result.exit_code == 0, result.output
    for line in ("out_dim: 65536", "teacher_temp: 0.07", "warmup_teacher_temp_epochs: 30",
                 "clip_per_param: true", "num_local: 8"):  # fmt: skip
        assert line in result.output
    bad = CliRunner().invoke(
        cli, ["pretrain", "--method", "dino", "--print-config", "--set", "loss.student_temp=0"]
    )
    assert bad.exit_code != 0 and "student_temp must be > 0" in bad.output


# ------------------------------------------------------------------------------ the step


def test_a_step_sends_globals_through_both_and_locals_through_the_student(tmp_path):
    cfg = resolve_config(dino_layer(tmp_path))
    model, _ = build_model(cfg)
    calls = {"online": [], "target": []}
    for name in calls:
        backbone = getattr(model, name).backbone
        backbone.register_forward_hook(
            lambda m, args, out, name=name: calls[name].append(tuple(args[0].shape))
        )
    b = 4
    crops = [torch.randn(b, 3, 32, 32) for _ in range(2)] + [
        torch.randn(b, 3, 16, 16) for _ in range(3)
    ]
    out = model({"crops": crops, "hyper": {"teacher_temp": 0.04}})
    # one backbone call per crop size (MultiCropWrapper), the teacher on the globals only
    assert sorted(calls["online"]) == [(2 * b, 3, 32, 32), (3 * b, 3, 16, 16)]
    assert calls["target"] == [(2 * b, 3, 32, 32)]
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert isinstance(model.predictor, nn.Identity)


def test_the_last_layer_is_frozen_in_the_first_epoch_only(tmp_path):
    # 4 batches per epoch, 8 steps; freeze_last_layer = 1: steps 1-4 leave it, 5-8 train it
    cfg = resolve_config(
        dino_layer(tmp_path, schedule={"epochs": 2, "warmup_epochs": 0}, run={"ckpt_every": 4})
    )
    torch.manual_seed(cfg.run.seed)  # as the trainer builds it
    model, _ = build_model(cfg)
    start = model.online.projector.last_layer.weight_v.detach().clone()
    result = pretrain(cfg, log=quiet)
    assert [m["freeze_last_layer"] for m in result["metrics"]] == [1.0] * 4 + [0.0] * 4
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*.pt"))
    key = "online.projector.last_layer.weight_v"
    after_epoch_0 = load_checkpoint(ckpts[0])["model"][key]
    final = load_checkpoint(ckpts[-1])["model"][key]
    torch.testing.assert_close(after_epoch_0, start, rtol=0, atol=0)
    assert not torch.equal(final, start)
    assert all(np.isfinite(m["loss"]) for m in result["metrics"])


def test_resume_is_exact_centre_included(tmp_path):
    extra = {"model": {"drop_path_rate": 0.1}, "run": {"ckpt_every": 3}}
    whole = resolve_config(dino_layer(tmp_path / "whole"), extra)
    pretrain(whole, log=quiet)
    cut = resolve_config(dino_layer(tmp_path / "cut"), extra)
    with pytest.raises(Crash):
        pretrain(cut, loader=loader_for(cut, limit=5, num_local=3, local_size=16), log=quiet)
    pretrain(cut, log=quiet)

    def losses(run):
        return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]

    a, b = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert len(a) == len(b) == 8
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    sa = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-00000008.pt")["model"]
    sb = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step-00000008.pt")["model"]
    assert "loss.center" in sa and sa["loss.center"].abs().sum() > 0
    for key, value in sa.items():
        torch.testing.assert_close(sb[key], value, rtol=0, atol=1e-6)
