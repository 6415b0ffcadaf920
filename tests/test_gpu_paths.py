"""The GPU code paths that a CPU can run: pinned-memory DLPack outputs, bf16 autocast steps,
the DALI graphs defined for ``device_id=0``, the loader's threads per rank, SyncBatchNorm and
DDP's buffers under a 2-process gloo group. What still needs a GPU: ``docs/gpu.md``."""

import ctypes
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pipeline.loader import _to_torch, default_parallelism
from pipeline.views import DecodeCropViews, MOSViews, MultiCropViews, UniVIPViews
from tests.test_pipeline_shards import photo_shards
from tests.test_train_loop import tiny
from train.distributed import init_distributed
from train.loop import (
    build_parts,
    compile_modules,
    convert_sync_batchnorm,
    distributed_model,
    train_step,
)
from train.losses.mos import soft_targets
from train.methods import build_model
from train.models import has_local_batchnorm
from train.resolve import resolve_config

METHODS = ["mos", "univip", "byol", "mocov3", "dino"]
# Smaller than test_train_loop's tiny models (a step in a few milliseconds, a compile in seconds)
# with every kind of layer of the real ones: ViT blocks and patch embedding; ResNet stem,
# stages, BatchNorm
SMALL_MODELS = {
    "vit": {
        "backbone": "vit_tiny_patch16_224",
        "img_size": 32,
        "patch_size": 8,
        "backbone_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
        "projector": [32, 32, 16],
        "predictor": [32, 16],
    },
    "resnet": {
        "backbone": "resnet18",
        "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8},
        "projector": [32, 16],
        "predictor": [32, 16],
    },
}


def small(method: str, out, **sections) -> dict:
    """``tests.test_train_loop.tiny``'s config layer with :data:`SMALL_MODELS`."""
    family = "vit" if method in ("mos", "mocov3", "dino") else "resnet"
    layer = tiny(method, out, model=SMALL_MODELS[family], **sections)
    if method == "dino":  # two 16-px local crops: a second input size, as DINO's
        vit = SMALL_MODELS["vit"]
        layer["model"] = {
            **vit,
            "backbone_kwargs": {**vit["backbone_kwargs"], "dynamic_img_size": True},
        }
        layer["data"] = {**layer["data"], "views": {"num_local": 2, "local_size": 16}}
        layer["loss"] = {"out_dim": 32}
    return layer


def with_hyper(parts, batch: dict, step: int) -> dict:
    """``batch`` with the method's own values of ``step``, as ``train_step`` hands them over."""
    hyper = {name: float(values[step]) for name, values in parts.schedules.method.items()}
    return {**batch, "hyper": hyper} if hyper else batch


# ------------------------------------------------------------------ pinned host memory (DLPack)

_DLPACK_CUDA_HOST = 3  # DLPack's kDLCUDAHost: pinned host memory


def _as_pinned_capsule(capsule):
    """``capsule`` (a legacy ``dltensor`` DLPack capsule) relabelled as pinned host memory, as
    DALI hands out the CPU outputs of a pipeline that has a GPU. DLManagedTensor starts with
    DLTensor ``{void *data; DLDevice {int32 device_type; int32 device_id}; ...}``."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get(capsule, b"dltensor")
    ctypes.c_int32.from_address(address + ctypes.sizeof(ctypes.c_void_p)).value = _DLPACK_CUDA_HOST
    return capsule


class _PinnedTensor:
    """A DALI TensorCPU as a pipeline with a GPU returns it: in pinned memory (device type 3)."""

    def __init__(self, tensor):
        self._tensor = tensor

    def __dlpack_device__(self):
        return (_DLPACK_CUDA_HOST, 0)

    def __dlpack__(self, **_kwargs):
        # a capsule of a torch copy (its deleter does not look at the device type, DALI's would)
        data = torch.from_numpy(np.array(self._tensor))
        return _as_pinned_capsule(torch.utils.dlpack.to_dlpack(data))

    def __getattr__(self, name):  # shape(), dtype, copy_to_external(), ...
        return getattr(self._tensor, name)


class _PinnedTensorList:
    def __init__(self, tensor_list):
        self._tensor_list = tensor_list

    def as_tensor(self):
        return _PinnedTensor(self._tensor_list.as_tensor())


def test_torch_refuses_pinned_dlpack_and_to_torch_copies_it():
    from nvidia.dali.tensors import TensorListCPU

    rows = np.arange(12, dtype=np.int32).reshape(4, 3)
    pinned = _PinnedTensorList(TensorListCPU(rows))
    # the premise: this torch does not take DLPack's CUDA-host device type
    with pytest.raises(BufferError, match="device_type"):
        torch.from_dlpack(pinned.as_tensor())
    out = _to_torch(pinned, torch.device("cpu"))
    assert out.dtype == torch.int32 and out.device.type == "cpu"
    assert torch.equal(out, torch.from_numpy(rows))
    # a copy: the DALI buffer may be reused once the tensor is handed over
    plain = TensorListCPU(rows)
    assert _to_torch(plain, torch.device("cpu")).data_ptr() == plain.as_tensor().data_ptr()
    assert out.data_ptr() != pinned.as_tensor().data_ptr()


# ---------------------------------------------------------------------------- bf16 autocast


def test_mos_soft_targets_stay_float32_under_bf16_autocast():
    members_q = torch.tensor([[0, 1, 2], [3, 3, 1]])
    members_k = torch.arange(4)[:, None]
    exact = soft_targets(members_q, members_k, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = soft_targets(members_q, members_k, 4)
    assert got.dtype == torch.float32
    assert torch.equal(got, exact)
    assert got[0, 0].item() == pytest.approx(1 / 3, abs=1e-7)  # bf16 would give 0.33398


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_step(method, tmp_path):
    """One step of each method under bf16 autocast, on the CPU's autocast (the GPU runs it with
    CUDA's; ``resolve_precision`` allows bf16 only on CUDA, so the parts are switched here):
    the loss terms are finite, within bf16's precision of the fp32 ones on the same weights
    and batch, and the step updates the weights without a scaler (bf16 needs none)."""
    cfg = resolve_config(small(method, tmp_path))
    parts = build_parts(cfg, init_distributed("cpu"))
    parts.model.train()
    batch = with_hyper(parts, next(iter(parts.loader)), 0)
    torch.manual_seed(0)
    with torch.no_grad():
        fp32 = parts.module(batch)
    parts.precision = "bf16"
    assert not parts.scaler.is_enabled()
    torch.manual_seed(0)
    with torch.no_grad(), parts.autocast():
        bf16 = parts.module(batch)
    for term in parts.terms:
        assert bf16[term].item() == pytest.approx(fp32[term].item(), rel=0.05, abs=0.02), term
        if method in ("mos", "mocov3", "dino"):  # their losses reduce in float32
            assert bf16[term].dtype == torch.float32
        # BYOL's and UniVIP's 2 - 2 cos come out in bf16 here: CPU autocast runs
        # cosine_similarity in bf16, CUDA autocast in float32 (its float32 op list has it)
    before = [p.detach().clone() for p in parts.model.online.parameters()]
    values = train_step(parts, batch, parts.schedules.total_steps // 2)  # lr > 0 after warm-up
    assert torch.isfinite(values).all()
    after = list(parts.model.online.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


# --------------------------------------------------------------- DALI graphs for a GPU device

# Every operator of the view graphs, by (operator, device), when defined for device_id=0: the
# decoder is "mixed" (nvJPEG), every pixel operator after it runs on the GPU, and only the
# source's small per-sample arguments (windows, per-frame parameters) stay on the CPU.
CPU_ARGUMENTS = {"ExternalSource", "_TensorSubscript", "PerFrame"}
PIXEL_OPS_GPU = {
    # MOS's banks with a blur margin crop it off after the blur (pipeline.augment)
    "mos": {"Resize", "Stack", "GaussianBlur", "ColorTwist", "Crop", "Cast",
            "_ArithmeticGenericOp", "CropMirrorNormalize"},
    "univip": {"Resize", "Stack", "GaussianBlur", "ColorTwist", "Cast",
               "_ArithmeticGenericOp", "CropMirrorNormalize"},
    "multicrop": {"Resize", "Stack", "GaussianBlur", "ColorTwist", "Cast",
                  "_ArithmeticGenericOp", "CropMirrorNormalize"},
    "decode+crop": {"Resize", "Stack", "CropMirrorNormalize"},
}  # fmt: skip


def _defined_graph(views, monkeypatch):
    """The view pipeline of ``views`` defined for GPU 0 as far as DALI goes without a device:
    the Python graph (every operator, its device, DALI's argument checks) is built, and the
    backend, the first step that needs CUDA, is shown to refuse."""
    import nvidia.dali as dali

    from pipeline.graph import view_pipeline
    from pipeline.source import EpochPlan, ShardIndex, ViewSource

    defined = []

    def build_graph_only(pipe):  # Pipeline.build without its backend (DALI 2.4's internals)
        pipe._build_graph()
        defined.append(pipe)

    monkeypatch.setattr(dali.Pipeline, "build", build_graph_only)
    index = ShardIndex(photo_shards())
    source = ViewSource(index, views, EpochPlan(len(index), 4, 1, 0), 0, 0, 0)
    # the GPU loader's defaults: worker processes for the source, a few DALI threads
    view_pipeline(source, 4, 0, 2, 2)
    (pipe,) = defined
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pipe._init_pipeline_backend()
    return {(type(op._op).__name__, op._op.device) for op in pipe._ops}


@pytest.mark.parametrize(
    "name,views",
    [
        ("mos", MOSViews(size=64)),
        ("univip", UniVIPViews(size=64, instance_size=32)),
        ("multicrop", MultiCropViews()),
        ("decode+crop", DecodeCropViews()),
    ],
    ids=["mos", "univip", "multicrop", "decode+crop"],
)
def test_view_graphs_defined_for_gpu_0(name, views, monkeypatch):
    from nvidia.dali.ops import _registry

    ops = _defined_graph(views, monkeypatch)
    registry = {"cpu": _registry.cpu_ops(), "gpu": _registry.gpu_ops()}
    registry["mixed"] = _registry.mixed_ops()
    for op, device in ops:
        schema = "decoders__Image" if op == "Image" else op
        if op != "ExternalSource":  # a Python operator, not in the backend's registry
            assert schema in registry[device], (op, device)
    assert ("Image", "mixed") in ops
    on_cpu = {op for op, device in ops if device == "cpu"}
    assert on_cpu <= CPU_ARGUMENTS, on_cpu - CPU_ARGUMENTS
    on_gpu = {op for op, device in ops if device == "gpu"}
    assert on_gpu == PIXEL_OPS_GPU[name]


# ------------------------------------------------------------------------- threads per rank


@pytest.mark.parametrize(
    "cores,local_world,gpu,expected",
    [
        (16, None, True, (8, 8)),  # one GPU on a 16-core node: as before
        (16, "8", True, (1, 1)),  # 8 ranks on 16 cores: 16 threads and processes in all
        (64, "8", True, (4, 4)),
        (2, None, True, (1, 1)),
        (2, None, False, (2, 0)),  # CPU: every core of the share as DALI threads
        (16, "4", False, (4, 0)),
    ],
)
def test_loader_threads_are_a_share_of_the_node(cores, local_world, gpu, expected, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert default_parallelism(gpu) == expected
    threads, workers = expected
    ranks = int(local_world or 1)
    assert ranks * (threads + workers) <= max(cores, ranks)


def test_evaluation_loaders_take_the_same_share(monkeypatch):
    """The evaluation loaders run on every rank as well (a distributed kNN splits the rows), so
    their DALI threads are the rank's share too, not the node's cores."""
    from pipeline.eval import EvalLoader
    from pipeline.eval_objects import ObjectLoader
    from tests.test_eval_loader import labelled_shards
    from tests.test_eval_objects import composed_shards

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with EvalLoader(labelled_shards("train"), size=32, batch_size=4) as loader:
        assert loader.num_threads == 2  # 16 cores / 8 ranks, CPU: the whole share
        assert sum(len(batch["label"]) for batch in loader) == 10
    with ObjectLoader(composed_shards(), size=32, batch_size=10) as loader:
        assert loader.num_threads == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with EvalLoader(labelled_shards("train"), size=32, batch_size=4, num_threads=1) as loader:
        assert loader.num_threads == 1  # given: kept


# ------------------------------------------------------- SyncBatchNorm and DDP, 2-process gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_bn_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    result = {}
    try:
        for method in ("univip", "mos"):
            cfg = resolve_config(small(method, out))
            torch.manual_seed(0)
            plain, _ = build_model(cfg)
            torch.manual_seed(0)
            synced, _ = build_model(cfg)
            convert_sync_batchnorm(synced)
            bn = nn.modules.batchnorm._BatchNorm
            kinds = [type(m) for m in synced.modules() if isinstance(m, bn)]
            state = synced.state_dict()
            # a checkpoint of a SyncBN run loads into a single-process model and back
            plain.load_state_dict(state, strict=True)
            synced.load_state_dict(plain.state_dict(), strict=True)
            # inference (no statistics to sync) is the plain model's, on a CPU too
            x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            plain.eval(), synced.eval()
            with torch.no_grad():
                same = torch.equal(plain.online.backbone(x), synced.online.backbone(x))
                same &= torch.equal(
                    plain.predictor(plain.online([x])[0]), synced.predictor(synced.online([x])[0])
                )
            # training-mode SyncBatchNorm needs a GPU: the one line no CPU test passes
            synced.train()
            try:
                synced.online.projector(torch.randn(4, synced.online.backbone.num_features))
                refused = ""
            except ValueError as e:
                refused = str(e)
            # DDP takes SyncBatchNorm on GPU modules only; its buffers decision is made from
            # the model (has_local_batchnorm): shown here for the per-rank BatchNorm of a CPU run
            try:
                distributed_model(synced, info)
                ddp_refused = ""
            except ValueError as e:
                ddp_refused = str(e)
            result[method] = {
                "kinds": kinds,
                "keys": list(state),
                "plain_keys": list(plain.state_dict()),
                "same": bool(same),
                "refused": refused,
                "ddp_refused": ddp_refused,
                "local_bn": (has_local_batchnorm(synced), has_local_batchnorm(plain)),
                "broadcast": distributed_model(plain, info).broadcast_buffers,
                "compiled": compile_modules(synced, backend="eager"),
            }
        torch.save(result, os.path.join(out, f"sync{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_sync_batchnorm_under_a_gloo_group(tmp_path):
    world = 2
    mp.spawn(_sync_bn_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        result = torch.load(tmp_path / f"sync{rank}.pt", weights_only=False)
        for method, r in result.items():
            # every BatchNorm of backbone, heads and target converted
            assert r["kinds"] and set(r["kinds"]) == {nn.SyncBatchNorm}, method
            # the checkpoint's keys are the plain model's, in the same order
            assert r["keys"] == r["plain_keys"], method
            assert any(k.endswith("running_mean") for k in r["keys"])
            assert r["same"], method
            assert "SyncBatchNorm expected input tensor to be on GPU" in r["refused"], method
            assert "SyncBatchNorm layers only work with GPU modules" in r["ddp_refused"]
            # SyncBN everywhere: DDP does not re-send the (equal) statistics; per-rank BN: it does
            assert r["local_bn"] == (False, True) and r["broadcast"] is True, method
        # torch.compile leaves the modules holding SyncBatchNorm eager: a ResNet's all, a ViT's
        # heads (its backbone has none)
        assert result["univip"]["compiled"] == ()
        assert result["mos"]["compiled"] == ("online.backbone", "target.backbone")


# ----------------------------------------------------------------------- GPU memory (GPU only)


@pytest.mark.gpu
def test_gpu_memory_of_the_device_stays_flat_across_epochs():
    """DALI allocates from its own memory pool, which ``torch.cuda.memory_allocated`` does not
    see: the device's used memory (``mem_get_info``) sees both. After two warm-up epochs and
    with both pools' free blocks released, more epochs leave it where it was."""
    from nvidia.dali.backend import ReleaseUnusedMemory

    from pipeline.loader import ViewLoader

    def used() -> int:
        torch.cuda.synchronize()
        ReleaseUnusedMemory()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        return total - free

    with ViewLoader(photo_shards(), MOSViews(), batch_size=4, seed=0, device="cuda") as loader:
        for _ in range(2):
            for _ in loader:
                pass
        base = used()
        for _ in range(5):
            for _ in loader:
                pass
        assert used() <= base + 32 * 2**20  # 32 MiB: pool granularity, not a leak per epoch
