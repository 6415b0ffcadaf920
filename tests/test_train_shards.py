"""The trainer on real shards through pipeline.loader (DALI, CPU): every method runs, and a run
killed mid-epoch resumes to the same losses as an uninterrupted one."""

import json

import numpy as np
import pytest

from tests.conftest import encode, photo
from tests.test_train_loop import quiet, tiny
from train.distributed import init_distributed
from train.loop import build_loader, pretrain
from train.methods import resolve_config

pytest.importorskip("nvidia.dali")

NAMES = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from shards.build import BuildParams, build_shards
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
    return resolve_config(layer, {"run": {"log_every": 1, **run}})


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mos", "univip", "byol", "mocov3"])
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
    from train.demo import demo_pretrain

    short = {"schedule": {"steps": 3}}
    results = demo_pretrain(shards, tmp_path, log=quiet, progress=False, overrides=short)
    for method in ("mos", "univip"):
        assert results[method]["checkpoint"].endswith("step-00000003.pt")
        assert np.isfinite(results[method]["last"]["loss"])
    # finished runs: the second call resumes and has nothing to do
    again = demo_pretrain(shards, tmp_path, log=quiet, progress=False, overrides=short)
    assert again["mos"]["last"] is None
