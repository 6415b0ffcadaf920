"""Progress lines of the long loops when stderr is not a terminal: the linear probes, ``ssl-cli
bench pipeline`` and ``ssl-cli bench train``; the ETA at the cumulative rate."""

import re
import warnings

import pytest
import torch
from torch import nn

from pipeline.bench import Progress, bench_pipeline, eta_seconds, format_duration
from tests.test_pipeline_shards import photo_shards
from tests.test_train_loop import quiet, tiny
from train.eval.probes import (
    LinearProbeConfig,
    PaperProbeConfig,
    train_linear_probe,
    train_paper_probe,
)
from train.resolve import resolve_config
from train.tools.bench import bench_train

warnings.filterwarnings("ignore", message=".*external source.*not used.*")

TIMING = re.compile(r"\d+:\d\d:\d\d elapsed, ETA (\d+:\d\d:\d\d|\?)$")


class FakeClock:
    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


# ----------------------------------------------------------------------------------- the ETA


def test_eta_uses_the_cumulative_rate():
    # 3 of 10 units in 30 s: 10 s a unit so far, whatever the last one took
    assert eta_seconds(30.0, 3, 10) == pytest.approx(70.0)
    assert eta_seconds(30.0, 10, 10) == 0.0
    assert eta_seconds(45.0, 12, 10) == 0.0  # past the end: nothing left, never negative
    assert eta_seconds(0.0, 0, 10) is None and eta_seconds(5.0, 0, 10) is None


def test_format_duration():
    assert format_duration(None) == "?"
    assert format_duration(0) == "0:00:00"
    assert format_duration(59.9) == "0:00:59"
    assert format_duration(3 * 3600 + 25 * 60 + 7.5) == "3:25:07"
    assert format_duration(-3) == "0:00:00"


def test_progress_throttles_and_counts_from_its_start():
    lines = []
    # start at t=100; a slow first unit (25 s) then fast ones (1 s each)
    progress = Progress(lines.append, every=5.0, clock=FakeClock(100.0))
    assert not progress.due(104.9)
    assert progress.due(105.0)
    line = progress.say("phase: 1/10 units", 1, 10, now=125.0)
    assert line == "phase: 1/10 units; 0:00:25 elapsed, ETA 0:03:45" and lines == [line]
    assert not progress.due(129.9) and progress.due(130.0)  # next line 5 s after the last
    progress.say("phase: 3/10 units", 3, 10, now=127.0)
    # the cumulative rate: 27 s for 3 units (9 s each), not the last window's 1 s a unit
    assert lines[-1] == "phase: 3/10 units; 0:00:27 elapsed, ETA 0:01:03"


def test_a_silent_progress_is_never_due():
    progress = Progress(None, every=0.0, clock=FakeClock(0.0))
    assert not progress.due(1e9)


# ---------------------------------------------------------------------------- linear probes


def _features(n=96, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g) + 3.0 * nn.functional.one_hot(y, d).float()
    return x, y


def test_the_fast_probe_logs_epoch_lines_through_the_callback():
    x, y = _features()
    config = LinearProbeConfig(epochs=4, batch_size=32)
    lines = []
    logged = train_linear_probe(x, y, 3, config, log=lines.append, log_every=0)
    assert [line.split(":")[0] for line in lines] == [
        f"linear probe (fast) epoch {i}/4" for i in range(1, 5)
    ]
    assert all(TIMING.search(line) for line in lines), lines
    assert lines[-1].endswith("ETA 0:00:00")
    losses = [float(re.search(r"loss ([\d.]+),", line).group(1)) for line in lines]
    assert losses[-1] < losses[0]  # the mean training loss of each epoch
    # logging changes nothing, and no log is the default (quiet)
    silent = train_linear_probe(x, y, 3, config)
    for a, b in zip(logged.state_dict().values(), silent.state_dict().values()):
        assert torch.equal(a, b)


def test_the_fast_probe_logs_first_and_last_epochs_between_intervals():
    x, y = _features()
    lines = []
    train_linear_probe(x, y, 3, LinearProbeConfig(epochs=6, batch_size=32), log=lines.append)
    assert [line.split(":")[0] for line in lines] == [
        "linear probe (fast) epoch 1/6",
        "linear probe (fast) epoch 6/6",
    ]


class _Loader:
    """The parts of :class:`pipeline.eval.ProbeTrainLoader` the paper probe uses, on CPU."""

    device, size = torch.device("cpu"), 4

    def __init__(self, batches=3, batch_size=8, classes=3):
        g = torch.Generator().manual_seed(0)
        self.batches = [
            {
                "image": torch.randn(batch_size, 3, 4, 4, generator=g),
                "label": torch.randint(0, classes, (batch_size,), generator=g),
            }
            for _ in range(batches)
        ]

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_the_paper_probe_logs_every_epoch_with_elapsed_and_eta():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 6))
    lines = []
    _, history = train_paper_probe(
        backbone, _Loader(), 3, PaperProbeConfig(epochs=3, batch_size=8), log=lines.append
    )
    assert len(history) == len(lines) == 3
    assert lines[0].startswith("linear probe (paper) epoch 1/3: loss")
    assert all(TIMING.search(line) for line in lines), lines
    assert lines[-1].endswith("ETA 0:00:00")


# ---------------------------------------------------------------------------------- benches


def test_bench_pipeline_says_its_phase_while_it_runs():
    lines = []
    report = bench_pipeline(
        photo_shards(),
        "univip",
        batch_size=4,
        device="cpu",
        seconds=0.3,
        rounds=1,
        baseline_workers=0,
        log=quiet,
        progress=lines.append,
        progress_every=0,  # every check: a line
    )
    assert all(v > 0 for v in report["images_per_s"].values())
    assert any(
        line.startswith("bench pipeline: round 1/1, ours, warm-up: 1/2 batches") for line in lines
    )
    named = {line.split(",")[1].strip() for line in lines}
    assert named == {"ours", "torchvision", "decode+crop"}  # each warm-up batch said
    # a round ends at its first batch past 0.3 s: a slow contestant may not get a line in it
    measuring = [line for line in lines if ", measuring: " in line]
    assert measuring and all(re.search(r"measuring: \d+ batches, \d+/0.3 s;", x) for x in measuring)
    assert all(TIMING.search(line) for line in lines), lines
    # the ETA of the whole benchmark: three measurements to go through, a number once one began
    assert re.search(r"ETA \d", measuring[-1])


def test_bench_pipeline_progress_can_be_off(capsys):
    bench_pipeline(
        photo_shards(),
        "mos",
        batch_size=4,
        device="cpu",
        seconds=0,
        rounds=1,
        baseline=False,
        log=quiet,
        progress=None,
        progress_every=0,
    )
    assert capsys.readouterr().err == ""


def test_bench_train_says_its_phase_while_it_runs(tmp_path):
    cfg = resolve_config(tiny("mos", tmp_path / "run"))
    lines = []
    report = bench_train(
        cfg,
        steps=3,
        warmup=2,
        synthetic_only=True,
        log=quiet,
        progress=lines.append,
        progress_every=0,
    )
    assert report["synthetic"]["steps"] == 3
    assert [line.split(";")[0] for line in lines] == [
        "bench train: synthetic, warm-up: 1/2 steps",
        "bench train: synthetic, warm-up: 2/2 steps",
        "bench train: synthetic, timed: 1/3 steps",
        "bench train: synthetic, timed: 2/3 steps",
        "bench train: synthetic, timed: 3/3 steps",
    ]
    assert all(TIMING.search(line) for line in lines), lines
    assert lines[-1].endswith("ETA 0:00:00")


def test_bench_train_progress_goes_to_stderr_by_default(tmp_path, capsys):
    cfg = resolve_config(tiny("mos", tmp_path / "run"))
    bench_train(cfg, steps=2, warmup=1, synthetic_only=True, log=quiet, progress_every=0)
    err = capsys.readouterr().err
    assert "bench train: synthetic, timed: 2/2 steps" in err


def test_ssl_cli_eval_linear_fast_shows_epoch_lines_on_stderr():
    from tests.test_eval_cli import common, invoke

    result = invoke("linear", *common(), "--epochs", 3, "--probe-batch-size", 4, "--lr", 0.5)
    assert result.exit_code == 0, result.output
    epochs = [line for line in result.stderr.splitlines() if "linear probe (fast) epoch" in line]
    assert epochs[0].startswith("linear probe (fast) epoch 1/3: loss")
    assert epochs[-1].startswith("linear probe (fast) epoch 3/3: loss")
    assert all(TIMING.search(line) for line in epochs), epochs
    assert "linear probe (fast) epoch" not in result.stdout  # the result alone on stdout


def test_bench_train_against_a_baseline_names_the_round_and_method(tmp_path):
    cfg = resolve_config(tiny("mos", tmp_path / "run"))
    lines = []
    report = bench_train(
        cfg,
        steps=1,
        warmup=0,
        baseline="mocov3",
        log=quiet,
        progress=lines.append,
        progress_every=0,
    )
    assert report["ratio_to_baseline"] > 0
    assert [line.split(";")[0] for line in lines] == [
        f"bench train: round {r}/2, {m}, timed: 1/1 steps"
        for r in (1, 2)
        for m in ("mos", "mocov3")
    ]
