"""The trainer on real shards through pipeline.loader (DALI, CPU): every method runs, and a run
killed mid-epoch resumes to the same losses as an uninterrupted one."""

import json

import numpy as np
import pytest

from tests.conftest import encode, photo
from tests.test_train_loop import quiet, tiny
from train.data import build_loader
from train.distributed import init_distributed
from train.loop import pretrain
from train.resolve import resolve_config

pytest.importorskip("nvidia.dali")

NAMES = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shards.build import build_shards
    from shards.process import BuildParams
    from shards.proposals import SearchParams

    tmp = tmp_path_factory.mktemp("train_shards")
    src = tmp / "images"
    src.mkdir()
    for i, name in enumerate(NAMES):  # 8 images: 4 photographs at two sizes
        for size in ((240, 180), (200, 260)):
            (src / f"{name}_{size[0]}_{i}.jpg").write_bytes(encode(photo(name, size)))
    out = tmp / "shards"
    params = BuildParams(search=SearchParams(max_side=128), shard_size=4)
    build_shards(str(src), out, params, workers=2, progress=False, log=quiet)
    return out


def real(method, out, shards_dir, **run):
    layer = tiny(method, out)
    layer["data"].update(synthetic=False, shards=str(shards_dir), batch_size=4, size=32)
    if method == "dino":  # two 16-px local crops through a ViT that takes both sizes
        layer["model"]["backbone_kwargs"] = {"depth": 2, "dynamic_img_size": True}
        layer["data"]["views"] = {"num_local": 2, "local_size": 16}
        layer["loss"] = {"out_dim": 64}
    return resolve_config(layer, {"run": {"log_every": 1, **run}})


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mos", "univip", "byol", "mocov3", "dino"])
def test_every_method_trains_on_shards(method, shards, tmp_path):
    result = pretrain(real(method, tmp_path, shards), log=quiet)
    assert len(result["metrics"]) == 4  # 8 images / batch 4 * 2 epochs
    assert all(np.isfinite(m["loss"]) for m in result["metrics"])


class Crash(Exception):
    pass


class KilledAfter:
    """The real loader, killed after ``limit`` batches."""

    def __init__(self, inner, limit):
        self.inner, self.limit, self.served = inner, limit, 0

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def close(self):
        self.inner.close()

    def __iter__(self):
        for batch in self.inner:
            if self.served == self.limit:
                raise Crash()
            self.served += 1
            yield batch


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mos", "univip"])
def test_resume_on_shards_matches_an_uninterrupted_run(method, shards, tmp_path):
    whole = real(method, tmp_path / "whole", shards, ckpt_every=3)
    pretrain(whole, log=quiet)
    cut = real(method, tmp_path / "cut", shards, ckpt_every=3)
    inner = build_loader(cut, init_distributed("cpu"))
    with pytest.raises(Crash):
        pretrain(cut, loader=KilledAfter(inner, 2 + 1), log=quiet)  # dies mid-epoch 1
    inner.close()
    pretrain(cut, log=quiet)
    a = [json.loads(x)["loss"] for x in open(tmp_path / "whole" / "metrics.jsonl")]
    b = [json.loads(x)["loss"] for x in open(tmp_path / "cut" / "metrics.jsonl")]
    assert len(a) == len(b) == 4
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_demo_configs_train_on_shards(shards, tmp_path):
    from train.tools.demo import demo_pretrain

    short = {"schedule": {"steps": 3}}
    results = demo_pretrain(shards, tmp_path, log=quiet, progress=False, overrides=short)
    for method in ("mos", "univip"):
        assert results[method]["checkpoint"].endswith("step-00000003.pt")
        assert np.isfinite(results[method]["last"]["loss"])
    # finished runs: the second call resumes and has nothing to do
    again = demo_pretrain(shards, tmp_path, log=quiet, progress=False, overrides=short)
    assert again["mos"]["last"] is None


def test_demo_digits_idx_round_trip(tmp_path):
    """The demo's labelled set: scikit-learn's digits written as IDX, read back unchanged."""
    sklearn = pytest.importorskip("sklearn.datasets")
    from shards.sources import read_idx
    from train.tools.demo import DIGITS_BANK, write_digits_idx

    folder = write_digits_idx(tmp_path / "idx")
    digits = sklearn.load_digits()
    train = read_idx(folder / "digits-train-images-idx3-ubyte.gz")
    test_labels = read_idx(folder / "digits-test-labels-idx1-ubyte.gz")
    assert train.shape == (DIGITS_BANK, 32, 32) and train.dtype == np.uint8
    assert test_labels.tolist() == digits.target[DIGITS_BANK:].tolist()
    # the upscaled scan keeps the digit: its 8x8 block means follow the original (r > 0.95)
    blocks = train[5].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(blocks.ravel(), digits.images[5].ravel())[0, 1] > 0.95
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    write_digits_idx(folder)  # idempotent: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


@pytest.mark.slow
def test_demo_knn_on_digits_beats_chance(shards, tmp_path):
    pytest.importorskip("sklearn.datasets")
    from train.tools.demo import demo_evaluate, demo_pretrain, next_steps

    results = demo_pretrain(
        shards, tmp_path, methods=("mos",), log=quiet, progress=False,
        overrides={"schedule": {"steps": 2}},
    )  # fmt: skip
    lines = []
    reports = demo_evaluate(tmp_path, {"mos": results["mos"]["checkpoint"]}, log=lines.append)
    report = reports["mos"]
    assert report["branch"] == "target" and report["step"] == 2
    # 10 classes: features paired with the wrong labels would score about 10%
    assert 25.0 < report["top1"] <= report["top5"] <= 100.0
    assert any(line.startswith("mos: kNN top-1") for line in lines)
    assert (tmp_path / "digits" / "bank" / "manifest.json").is_file()
    text = next_steps(tmp_path)
    assert f"ssl-cli plot {tmp_path / 'mos'}" in text and "--format hf" in text
