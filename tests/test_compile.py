"""``run.compile`` on a CPU: each method's training step through ``torch.compile``, its graphs,
graph breaks and recompiles counted against the numbers written here (with the reason of each
recompile), and the inductor step against the eager one.

Graph breaks and recompiles are dynamo's decisions, the same whatever backend compiles the
graphs, so the counts use ``backend="aot_eager"`` (dynamo + AOT autograd, no kernels generated):
inductor's C++ kernels take about a minute per model on two cores. Inductor itself runs on MOS's
ViT, the model ``make gpu-check`` compiles. The GPU's settings a CPU run does not take are set by
hand: channels-last inputs and weights (``run.channels_last``, CUDA only in ``build_parts``).
"""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from tests.test_gpu_paths import small
from train.distributed import init_distributed
from train.loop import COMPILED_MODULES, build_parts, compile_modules, train_step
from train.resolve import resolve_config

# The graphs dynamo builds in the first step of each method (small models of tests.test_gpu_paths
# at 32 px, UniVIP's instances at 16 px, channels-last), and why each graph after a function's
# first one is compiled. The functions: a timm backbone's ``forward`` (online and target
# backbone share it: one class) and torch's wrapper of every module compiled with
# ``nn.Module.compile`` whose forward is torch's own (the heads, ``nn.Sequential``).
GRAD_MODE = "grad_mode"  # the target encoder runs under no_grad: its own graph
SIZE = "size mismatch"  # another batch size: recompiled once with a dynamic batch dimension
HEAD = "_modules"  # the predictor after the projector: another module structure
PARAM = "_parameters"  # the same, told apart by a parameter's shape
RANGE = "<= x.size()[0] <="  # a dynamic batch outside the range its graph was compiled for
STRIDE = "stride mismatch"  # the same shape rank with other strides: made dynamic in them
EXPECTED = {
    # online backbone, target backbone (grad mode); projector, predictor (structure), target
    # projector (grad mode): 5 graphs, 3 recompiles
    "mos": {"graphs": 5, "recompiles": sorted([GRAD_MODE, HEAD, GRAD_MODE])},
    "mocov3": {"graphs": 5, "recompiles": sorted([GRAD_MODE, HEAD, GRAD_MODE])},
    "byol": {"graphs": 5, "recompiles": sorted([GRAD_MODE, PARAM, GRAD_MODE])},
    # per view: scenes [B] and instances [B*K] through each branch. Backbone: scenes, instances
    # (batch size: a dynamic batch from now on), target scenes (grad mode), target instances
    # (the target's graph, dynamic in the batch from its start, guards the batch to the range
    # its convolutions were traced for, 2..15, and the 16 instances fall outside); heads:
    # projector at B, at B*K (size), predictor (its parameters), target projector (grad mode)
    # backbone at 32 px (globals) and at 16 px (locals: size, dynamic from now on), the DINO
    # head (its own class's forward) on the globals' and, with other strides, the locals'
    # features, the target backbone and head on the globals (grad mode); the predictor is
    # the identity
    "dino": {"graphs": 6, "recompiles": sorted([SIZE, STRIDE, GRAD_MODE, GRAD_MODE])},
    "univip": {"graphs": 8, "recompiles": sorted([SIZE, SIZE, PARAM, GRAD_MODE, RANGE, GRAD_MODE])},
}


class _Recompiles(logging.Handler):
    """Dynamo's ``recompiles`` log: one record per recompile, the failed guards in its text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "Recompiling function" in text:
            # the guard that failed for the newest graph of the function is listed first
            self.reasons.append(text.split("triggered by the following guard failure(s):")[1])


@pytest.fixture
def recompiles():
    torch._dynamo.reset()
    counters.clear()
    torch._logging.set_logs(recompiles=True)
    handler = _Recompiles()
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    torch._logging.set_logs()
    torch._dynamo.reset()


def _reason(text: str) -> str:
    first = text.strip().splitlines()[0]
    for key in (PARAM, HEAD, GRAD_MODE, RANGE, SIZE, STRIDE):
        if key in first:
            return key
    return first


def _gpu_like_parts(method, out):
    """The parts of a small model for ``method`` on the CPU, with channels-last as on a GPU."""
    parts = build_parts(resolve_config(small(method, out)), init_distributed("cpu"))
    parts.model.to(memory_format=torch.channels_last)
    parts.channels_last = True
    parts.model.train()
    return parts


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mos", "mocov3", "univip", "byol", "dino"])
def test_compiled_step_graphs_breaks_and_recompiles(method, tmp_path, recompiles):
    parts = _gpu_like_parts(method, tmp_path)
    assert compile_modules(parts.model, backend="aot_eager") == COMPILED_MODULES
    limit = torch._dynamo.config.recompile_limit
    assert limit >= 8 * len(COMPILED_MODULES)
    batches = iter(parts.loader)
    values = train_step(parts, next(batches), 0)
    assert torch.isfinite(values).all()
    assert dict(counters["graph_break"]) == {}  # every compiled module is one whole graph
    expected = EXPECTED[method]
    assert _graphs() == expected["graphs"]
    assert sorted(_reason(r) for r in recompiles.reasons) == expected["recompiles"], (
        recompiles.reasons
    )
    # steady state: the next steps (new batches, new lr) reuse the graphs
    for step in (1, 2):
        train_step(parts, next(batches), step)
    assert _graphs() == expected["graphs"] and len(recompiles.reasons) == len(
        expected["recompiles"]
    )
    # the periodic kNN: a backbone in eval mode, no gradient, another batch size; a graph
    # more, still far from the limit
    parts.model.eval()
    with torch.no_grad():
        x = torch.randn(5, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        parts.model.target.backbone(x)
    assert _graphs() == expected["graphs"] + 1
    assert not any("recompile_limit" in r for r in recompiles.reasons)


@pytest.mark.slow
def test_inductor_step_matches_eager(tmp_path):
    """MOS's step compiled by inductor (the C++ kernels of a CPU) computes the eager step's
    loss terms on the same weights and batch, and trains. ``fallback_random``: inductor draws
    drop path's masks with torch's generator, as eager does, so that both see the same masks."""
    eager = _gpu_like_parts("mos", tmp_path / "eager")
    compiled = _gpu_like_parts("mos", tmp_path / "compiled")
    batch = next(iter(compiled.loader))
    out = {}
    with torch._inductor.config.patch(fallback_random=True):
        compiled.compiled = compile_modules(compiled.model)
        for name, parts in (("eager", eager), ("compiled", compiled)):
            torch.manual_seed(0)
            out[name] = parts.module(batch)
        for term in compiled.terms:
            got, want = out["compiled"][term].item(), out["eager"][term].item()
            assert got == pytest.approx(want, rel=1e-4), term
        for step in range(2):
            assert torch.isfinite(train_step(compiled, batch, step)).all()
    assert dict(counters["graph_break"]) == {}
