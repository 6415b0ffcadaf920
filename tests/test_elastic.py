"""torchrun at the scale the trainer is built for, on loopback: a rank killed with SIGKILL is
restarted by torchrun and the run resumes by itself to the weights of an uninterrupted run, bit
for bit; two "nodes" of one process each equal one node of two processes."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_train_loop import tiny
from train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from train.distributed import restart_store_problem

STEPS = 48
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SSL_CLI = str(Path(sys.executable).parent / "ssl-cli")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path) -> Path:
    """BYOL with a ResNet-18 on synthetic 32-px views: a step of a few tenths of a second on
    two processes, long enough to be killed in the middle."""
    layer = tiny("byol", "unused", schedule={"epochs": 3, "steps": STEPS, "warmup_epochs": 0})
    layer["data"].update(batch_size=8, synthetic_samples=128)
    layer["run"].update(ckpt_every=6, keep_last=2, log_every=6, progress=False)
    del layer["run"]["out"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(layer))
    return path


def _env() -> dict:
    env = dict(os.environ)
    # every attempt gets a rendezvous store of its own (restart_store_problem: with the shared
    # one a restarted rank can read a dead rank's address); a collective that hangs anyway
    # fails within a minute and torchrun restarts the group, instead of waiting 30 minutes
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               SSL_CLI_DIST_TIMEOUT="60", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # fmt: skip
    return env


def _torchrun(config, out, nnodes=1, nproc=2, port=None, restarts=0, **popen):
    port = port or _port()
    cmd = [TORCHRUN, f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=ssl-cli-test",
           "--local-addr=127.0.0.1", "--monitor-interval=0.5",
           SSL_CLI, "pretrain", "--config", str(config), "--out", str(out),
           "--device", "cpu"]  # fmt: skip
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)  # fmt: skip


def _finish(proc, timeout=900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _weights(run) -> dict:
    return load_checkpoint(latest_checkpoint(run))["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    config = _config(tmp)
    _finish(_torchrun(config, tmp / "whole"))
    return config, tmp / "whole"


@pytest.mark.slow
def test_a_rank_killed_by_sigkill_is_restarted_and_the_run_ends_bit_for_bit(
    uninterrupted, tmp_path
):
    config, whole = uninterrupted
    out = tmp_path / "killed"
    proc = _torchrun(config, out, restarts=4)
    deadline = time.monotonic() + 300
    killed = None
    while killed is None and time.monotonic() < deadline:  # after the second checkpoint
        if len(list_checkpoints(out)) >= 2 and proc.poll() is None:
            ranks = {_rank_of(p): p for p in _children(proc.pid)}
            if 1 in ranks:
                os.kill(ranks[1], signal.SIGKILL)
                killed = latest_checkpoint(out).name
        time.sleep(0.05)
    assert killed is not None, "the run ended before a rank could be killed"
    log = _finish(proc)
    last = load_checkpoint(latest_checkpoint(out))
    assert last["step"] == STEPS
    a, b = _weights(whole), last["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the restarted group started again from a checkpoint by itself, not from step 0
    starts = [int(m) for m in re.findall(r"byol: steps (\d+)/48", log)]
    assert starts[0] == 0 and any(s > 0 for s in starts[1:]), starts
    assert "shares its rendezvous store" not in log  # each attempt had a store of its own


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_node_of_two(uninterrupted, tmp_path):
    config, whole = uninterrupted
    port = _port()
    out = tmp_path / "two_nodes"
    nodes = [_torchrun(config, out, nnodes=2, nproc=1, port=port) for _ in range(2)]
    for node in nodes:
        _finish(node)
    a, b = _weights(whole), _weights(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_shared_rendezvous_store_is_named_before_a_restart_can_hang(monkeypatch):
    """torchrun's own environment for its workers: the shared store with restarts allowed is
    the case where a restarted rank can read a dead rank's address."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_store_problem()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart: nothing to read stale
    assert restart_store_problem() is None
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # the variable exported
    assert restart_store_problem() is None
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")  # not under torchrun
    assert restart_store_problem() is None
