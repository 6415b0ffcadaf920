"""The methods as their papers write them: which views go through which branch, the momentum
encoder, the stitching grid, the recipes, and the options that keep the other forms."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from cli.train_cmds import pretrain
from pipeline.views import MOSViews
from tests.test_train_loop import RESNET, VIT  # the tiny models of the loop tests
from train.data import synthetic_loader
from train.loop import convert_sync_batchnorm
from train.methods import build_model
from train.optim import build_optimizer
from train.resolve import resolve_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tiny_cfg(method: str, **sections):
    layer = {
        "method": method,
        "data": {"batch_size": 4, "size": 32, "instance_size": 16, "num_instances": 2},
        "model": dict(VIT if method in ("mos", "mocov3") else RESNET),
    }
    for name, values in sections.items():
        layer[name] = {**layer.get(name, {}), **values}
    return resolve_config(layer)


# ------------------------------------------------------------------------ momentum encoder


def test_target_branch_is_deterministic_in_train_mode():
    """Stochastic depth stays on the online encoder only (MoCo v3, DINO, PatchMix)."""
    torch.manual_seed(0)
    model, _ = build_model(tiny_cfg("mos", model={"drop_path_rate": 0.5}))
    model.train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        online = [model.online.backbone(x) for _ in range(2)]
        target = [model.target.backbone(x) for _ in range(2)]
    assert not torch.equal(online[0], online[1])  # drop path is active online
    torch.testing.assert_close(target[0], target[1], rtol=0, atol=0)
    # same weights: the target is the online encoder without its stochastic layers
    model.online.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.online.backbone(x), target[0])


# ---------------------------------------------------------------------------- MOS passes


class Recorder(nn.Module):
    """Wraps a backbone and records the view ids (constant image values) of every call."""

    def __init__(self, inner: nn.Module, calls: list) -> None:
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x):
        self.calls.append(sorted({round(v) for v in x.mean(dim=(1, 2, 3)).tolist()}))
        return self.inner(x)


def mos_batch(b=4, size=32):
    """Views filled with their id (1 single1, 2 single2, 3 multi1, 4 multi2), 2x2 members."""
    views = {name: torch.full((b, 3, size, size), float(i + 1)) for i, name in enumerate(
        ("single1", "single2", "multi1", "multi2")
    )}  # fmt: skip
    cyc = (torch.arange(b)[:, None] + torch.arange(4)[None, :]) % b
    return {**views, "members1": cyc, "members2": cyc.roll(1, dims=1), "index": torch.arange(b)}


@pytest.mark.parametrize(
    "form, online, target",
    [
        ("paper", [[1, 4]], [[1, 2, 3]]),  # section 3.2: 2 + 3 passes in one call per branch
        ("symmetric", [[1, 2, 3, 4]], [[1, 2, 3, 4]]),  # 4 + 4
    ],
)
def test_mos_step_sends_the_papers_views_through_each_branch(form, online, target):
    torch.manual_seed(0)
    model, _ = build_model(tiny_cfg("mos", loss={"form": form}))
    calls = {"online": [], "target": []}
    model.online.backbone = Recorder(model.online.backbone, calls["online"])
    model.target.backbone = Recorder(model.target.backbone, calls["target"])
    out = model(mos_batch())
    assert calls == {"online": online, "target": target}
    assert set(out) == {"loss", "m2s", "m2m", "s2s"} and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_resnet_views_get_their_own_backbone_call():
    """ORL/BYOL: one BN batch per view (``batch_views: per_view``, the default for BN nets)."""
    torch.manual_seed(0)
    model, _ = build_model(tiny_cfg("byol"))
    assert model.online.group_views is False and model.target.group_views is False
    calls: list = []
    model.online.backbone = Recorder(model.online.backbone, calls)
    crops = [torch.full((4, 3, 32, 32), float(i)) for i in (1, 2)]
    model({"crops": crops, "index": torch.arange(4)})
    assert calls == [[1], [2]]
    grouped, _ = build_model(tiny_cfg("byol", model={"batch_views": "grouped"}))
    assert grouped.online.group_views is True
    vit, _ = build_model(tiny_cfg("mos"))  # LayerNorm: grouping is exact, so auto groups
    assert vit.online.group_views is True


def test_sync_batchnorm_reaches_the_backbone():
    model, _ = build_model(tiny_cfg("univip"))
    convert_sync_batchnorm(model)
    for enc in (model.online, model.target):
        norms = [
            m for m in enc.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert not any(
        isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules()
    )  # heads too: every BN is synchronised


# ----------------------------------------------------------------------- freeze_patch_embed


def test_frozen_patch_embed_is_left_out_of_training():
    torch.manual_seed(0)
    cfg = tiny_cfg("mocov3")  # MoCo v3's recipe freezes it (--stop-grad-conv1)
    assert cfg.model.freeze_patch_embed is True
    model, _ = build_model(cfg)
    frozen = list(model.online.backbone.patch_embed.parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    opt = build_optimizer(model, cfg.optim)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in frozen)
    before = [p.clone() for p in frozen]
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    model({"crops": crops, "index": torch.arange(4)})["loss"].backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, frozen, strict=True))
    assert tiny_cfg("mos").model.freeze_patch_embed is False  # MOS / PatchMix train it
    with pytest.raises(ValueError, match="patch_embed"):
        build_model(tiny_cfg("byol", model={"freeze_patch_embed": True}))


# --------------------------------------------------------------------------- stitching grid


def test_both_stitched_views_of_a_batch_share_r():
    views = MOSViews(size=32)
    rng = np.random.default_rng(0)
    layouts = [views.plan_batch(rng) for _ in range(200)]
    assert all(a.grid == b.grid for a, b in layouts)
    assert {a.grid for a, _ in layouts} == {1, 2}  # r is still drawn, per batch
    # scales are drawn per view: some batches stitch the two views at different s
    assert any(a.scales != b.scales for a, b in layouts if a.grid == 2)
    free = MOSViews(size=32, shared_grid=False)
    assert any(a.grid != b.grid for a, b in (free.plan_batch(rng) for _ in range(200)))
    with pytest.raises(ValueError, match="shared_grid"):
        MOSViews(size=32, shared_grid="yes")


def test_synthetic_mos_batches_share_r_and_follow_the_recipe_sets():
    from train.distributed import DistInfo

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    cfg = tiny_cfg("mos", data={"synthetic": True, "synthetic_samples": 16})
    loader = synthetic_loader(cfg, info)
    grids = [(b["layout1"].grid, b["layout2"].grid) for _ in range(3) for b in loader]
    assert all(r1 == r2 for r1, r2 in grids) and {r for r, _ in grids} <= {1, 2}
    fixed = tiny_cfg("mos", data={"synthetic": True, "views": {"grid_choices": [2]}})
    assert all(b["layout1"].grid == 2 for b in synthetic_loader(fixed, info))


# --------------------------------------------------------------------------------- recipes


def print_config(*args) -> dict:
    result = CliRunner().invoke(pretrain, [*args, "--print-config"])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


@pytest.mark.parametrize("source", ["recipe", "config"])
@pytest.mark.parametrize("method", ["univip", "byol"])
def test_orl_coco_recipe(method, source):
    args = (
        ["--method", method]
        if source == "recipe"
        else ["--config", str(CONFIGS / f"{method}_r50_coco.yaml")]
    )
    cfg = print_config(*args)
    assert cfg["optim"]["name"] == "sgd" and cfg["optim"]["base_lr"] == 0.2  # ORL: 0.4 at 512
    assert cfg["data"]["batch_size"] == 512 and cfg["optim"]["weight_decay"] == 1e-4
    assert cfg["schedule"] == {"epochs": 800, "steps": None, "warmup_epochs": 4}
    assert cfg["ema"] == {"start": 0.99, "end": 1.0}
    assert cfg["model"]["batch_views"] == "per_view" and cfg["model"]["sync_bn"] is True
    if method == "univip":
        loss = cfg["loss"]
        assert loss["sinkhorn_eps"] == 0.1 and loss["sinkhorn_iters"] == 50  # OTA
        assert loss["cosine_marginals"] is False  # eq. 9-10: raw dot products
        assert loss["scene_form"] == "mse"  # ORL: 2 - 2 cos


@pytest.mark.parametrize("source", ["recipe", "config"])
def test_mos_recipe_is_the_papers_form(source):
    args = (
        ["--method", "mos"]
        if source == "recipe"
        else ["--config", str(CONFIGS / "mos_vits16_coco.yaml")]
    )
    cfg = print_config(*args)
    assert cfg["loss"]["form"] == "paper" and cfg["loss"]["scale_by_2tau"] is False
    assert [cfg["loss"][f"weight_{t}"] for t in ("m2s", "m2m", "s2s")] == [1.0, 1.0, 1.0]
    assert cfg["data"]["views"]["grid_choices"] == [1, 2]
    assert cfg["data"]["views"]["scale_choices"] == [1, 2]
    assert cfg["ema"]["start"] == 0.992 and cfg["model"]["drop_path_rate"] == 0.1


def test_mos_cifar_recipe():
    cfg = print_config("--config", str(CONFIGS / "mos_vitt2_cifar.yaml"))
    assert cfg["ema"] == {"start": 0.0, "end": 1.0}  # appendix D: cosine from 0 to 1.0
    assert cfg["optim"]["base_lr"] == 2e-3  # PatchMix ViT-T CIFAR, per 256
    assert cfg["optim"]["weight_decay"] == cfg["optim"]["weight_decay_end"] == 0.1
    assert cfg["data"]["batch_size"] == 512 and cfg["schedule"]["warmup_epochs"] == 100
    assert cfg["model"]["patch_size"] == 2 and cfg["data"]["size"] == 32


@pytest.mark.parametrize(
    "ablation, grids, scales",
    [
        ("mos_table5_r1_s1", [1], [1]),
        ("mos_table5_r2", [2], [1]),
        ("mos_table5_rs_sampled", [1, 2], [1, 2]),
    ],
)
def test_table5_ablations_stack_on_the_recipe(ablation, grids, scales):
    base = str(CONFIGS / "mos_vits16_coco.yaml")
    cfg = print_config(
        "--config", base, "--config", str(CONFIGS / "ablations" / f"{ablation}.yaml")
    )
    views = cfg["data"]["views"]
    assert views["grid_choices"] == grids and views["scale_choices"] == scales
    assert views["shared_grid"] is True  # the base file's other keys are kept
    assert cfg["optim"]["base_lr"] == 5e-4 and cfg["schedule"]["epochs"] == 800
    MOSViews(size=cfg["data"]["size"], **views)  # a valid view set


def test_later_config_files_win_key_by_key(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("method: byol\noptim:\n  base_lr: 0.5\n  momentum: 0.8\n")
    second.write_text("optim:\n  base_lr: 0.25\n")
    cfg = print_config("--config", str(first), "--config", str(second))
    assert cfg["method"] == "byol" and cfg["optim"]["base_lr"] == 0.25
    assert cfg["optim"]["momentum"] == 0.8


def test_unknown_mos_form_is_a_config_error():
    result = CliRunner().invoke(
        pretrain, ["--method", "mos", "--set", "loss.form=both", "--print-config"]
    )
    assert result.exit_code == 2 and "loss.form" in result.output


@pytest.mark.parametrize("key", ["base_lr", "min_lr", "weight_decay", "clip_grad"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_optimizer_values_must_be_finite(key, value):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match=f"optim.{key}: must be finite"):
        resolve_config({"method": "mos", "optim": {key: value}})
