"""Typed config: recipes, layering, unknown keys and wrong types as errors naming the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from train.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    dump_yaml,
    from_dict,
    load_yaml,
    parse_assignment,
    to_dict,
)
from train.methods import METHODS, build_model, get_method
from train.resolve import resolve_config
from train.schedules import peak_lr


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_recipe_resolves_and_round_trips(name):
    cfg = resolve_config({"method": name})
    assert cfg.method == name
    assert isinstance(cfg.loss, get_method(name).loss_config)
    again = resolve_config(to_dict(cfg))
    assert again == cfg
    assert resolve_config(yaml.safe_load(dump_yaml(to_dict(cfg)))) == cfg


def test_recipes_follow_the_papers():
    mos = resolve_config({"method": "mos"})
    assert (mos.ema.start, mos.ema.end) == (0.992, 1.0)  # MOS appendix D
    assert (mos.optim.name, mos.optim.weight_decay, mos.optim.weight_decay_end) == (
        "adamw",
        0.04,
        0.4,
    )
    assert mos.model.projector == (4096, 4096, 256) and mos.model.predictor == (4096, 256)
    assert mos.loss.temperature == 0.2 and mos.model.drop_path_rate == 0.1
    uni = resolve_config({"method": "univip"})
    assert (uni.ema.start, uni.optim.name, uni.optim.weight_decay) == (0.99, "sgd", 1e-4)
    assert peak_lr(uni) == pytest.approx(0.4)  # 0.2 per 256; ORL: lr 0.4 at batch 512
    assert uni.schedule.warmup_epochs == 4 and uni.model.backbone == "resnet50"


def test_layers_later_wins_and_method_comes_from_any_layer():
    cfg = resolve_config(
        {"method": "univip", "optim": {"base_lr": 0.3}},
        {"optim": {"base_lr": 0.4}, "data": {"batch_size": 64}},
    )
    assert cfg.method == "univip" and cfg.optim.base_lr == 0.4 and cfg.data.batch_size == 64
    assert cfg.optim.name == "sgd"  # the recipe stays under the layers


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"optim": {"bogus": 1}}, "unknown key 'optim.bogus'; valid keys here: name, base_lr"),
        ({"bogus": {}}, "unknown key 'bogus'"),
        (
            {"optim": {"base_rl": 1}},
            r"unknown key 'optim.base_rl' \(did you mean 'optim.base_lr'\?\)",
        ),
        ({"run": {"tensorbord": False}}, r"\(did you mean 'run.tensorboard'\?\)"),
        ({"run": {"wandb": {"projekt": "x"}}}, r"\(did you mean 'run.wandb.project'\?\)"),
        ({"loss": {"eps": 1}}, "unknown key 'loss.eps'"),
        ({"optim": {"base_lr": "fast"}}, "optim.base_lr: expected float, got str 'fast'"),
        ({"data": {"batch_size": 2.5}}, "data.batch_size: expected int, got float 2.5"),
        ({"data": {"batch_size": True}}, "data.batch_size: expected int, got bool True"),
        ({"run": {"compile": "yes"}}, "run.compile: expected bool"),
        ({"run": {"device": "tpu"}}, "run.device: expected one of 'auto', 'cpu', 'cuda'"),
        ({"model": {"projector": [64, "x"]}}, r"model.projector\[1\]: expected int"),
        ({"optim": {"betas": [0.9]}}, "optim.betas: expected 2 values"),
        ({"model": "vit"}, "model: expected a mapping"),
        (
            {"method": "simclr"},
            "unknown method 'simclr'; choose one of: byol, dino, mocov3, mos, univip",
        ),
        ({"schedule": {"epochs": 0}}, "schedule.epochs: must be >= 1"),
        ({"ema": {"start": 1.5}}, r"ema.start: must be in \[0, 1\]"),
        ({"data": {"views": {"size": object()}}}, "data.views.size: expected a plain value"),
    ],
)
def test_bad_config_errors_name_the_key(layer, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(layer)


def test_method_specific_loss_sections():
    assert (
        resolve_config({"method": "univip", "loss": {"sinkhorn_iters": 7}}).loss.sinkhorn_iters == 7
    )
    assert (
        resolve_config({"method": "mocov3", "loss": {"temperature": 0.1}}).loss.temperature == 0.1
    )
    with pytest.raises(ConfigError, match="unknown key 'loss.temperature'"):
        resolve_config({"method": "univip", "loss": {"temperature": 0.1}})


def test_from_dict_accepts_int_for_float_and_lists_for_tuples():
    model = from_dict(ModelConfig, {"drop_path_rate": 0, "projector": [8, 4]})
    assert model.drop_path_rate == 0.0 and isinstance(model.drop_path_rate, float)
    assert model.projector == (8, 4)
    assert from_dict(DataConfig, {"workers": None}).workers is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        from_dict(DataConfig, {}).batch_size = 3


def test_yaml_reads_exponents_as_floats_and_json(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: mos\noptim:\n  base_lr: 1e-3\n  min_lr: 5E-7\n")
    cfg = resolve_config(load_yaml(path))
    assert cfg.optim.base_lr == 1e-3 and cfg.optim.min_lr == 5e-7
    js = tmp_path / "c.json"
    js.write_text('{"method": "byol", "data": {"batch_size": 32}}')
    assert resolve_config(load_yaml(js)).data.batch_size == 32
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(bad)


def test_parse_assignment():
    assert parse_assignment("optim.base_lr=1e-3") == {"optim": {"base_lr": 1e-3}}
    assert parse_assignment("model.projector=[8, 4]") == {"model": {"projector": [8, 4]}}
    assert parse_assignment("data.workers=null") == {"data": {"workers": None}}
    for bad in ("optim.base_lr", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_assignment(bad)


def test_to_dict_is_plain():
    d = to_dict(resolve_config({"method": "mos"}))
    assert isinstance(d["model"]["projector"], list)
    assert d["loss"]["temperature"] == 0.2
    assert TrainConfig().replace(method="byol").method == "byol"


CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_resolve_and_build(path):
    cfg = resolve_config(load_yaml(path))
    model, _ = build_model(cfg)  # the timm name and sizes are valid
    if cfg.method == "dino":  # the DINO head: its MLP ends at the bottleneck, then prototypes
        head = model.online.projector
        assert head.mlp[-1].out_features == cfg.model.projector[-1]
        assert head.last_layer.weight_v.shape == (cfg.loss.out_dim, cfg.model.projector[-1])
        return
    assert (
        model.online.projector[-1 if not cfg.model.projector_last_bn else -2].out_features
        == cfg.model.projector[-1]
    )
