"""The loader the trainer iterates: DALI view pipelines -> dicts of torch tensors.

::

    from pipeline.loader import ViewLoader
    from pipeline.views import MOSViews
    with ViewLoader(shards_dir, views=MOSViews(), batch_size=256, rank=rank,
                    world_size=world, seed=0, device="cuda") as loader:
        loader.load_state_dict(ckpt["loader"])        # optional: resume exactly there
        for epoch in range(loader.epoch, epochs):
            loader.set_epoch(epoch)                   # keeps a resumed mid-epoch position
            for batch in loader:                      # len(loader) batches, same on every rank
                ...
                ckpt["loader"] = loader.state_dict()  # {"epoch", "batch"} of the next batch

Batches (torch tensors on the loader's device; images float32 NCHW, ImageNet-normalized;
indices int64):

- ``MOSViews``: ``single1, single2, multi1, multi2 [B, 3, S, S]``, ``members1, members2
  [B, M]`` local batch indices of the sample of every object crop (order of
  :func:`pipeline.stitching.stitch_multiscale`), ``index [B]`` (rows of
  ``proposals.parquet``), ``layout1, layout2`` (:class:`~pipeline.stitching.StitchLayout`,
  the only entries that are not tensors).
- ``UniVIPViews``: ``scene1, scene2 [B, 3, 224, 224]``, ``instances [B, K, 3, 96, 96]``,
  ``index``, ``scene_boxes [B, 2, 4]``, ``instance_boxes [B, K, 4]``, ``flips [B, 2 + K]``.
- ``MultiCropViews``: ``crops`` (list, global crops first), ``index``, ``boxes [B, G + L, 4]``.

Epochs: ``len(loader) = N // (world_size * batch_size)``; the remainder opens the next epoch
(:mod:`pipeline.source`). The DALI pipeline is built once and runs from epoch to epoch; it is
rebuilt only when the position jumps (``load_state_dict``, ``set_epoch`` to another epoch).

Errors name the sample: DALI reports a failed decode without saying which sample; the loader
then decodes the samples of the failed batch (and the batches prefetched after it) one by one
with the same decoder and raises :class:`~pipeline.source.ShardError` naming the key and the
shard file of the first that fails. An error of the view source (boxes outside the image, a
truncated shard) is re-raised as the same ``ShardError``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.graph import view_pipeline

from .source import EpochPlan, ShardError, ShardIndex, ViewSource
from .views import ViewSet

if TYPE_CHECKING:
    from shards.location import ShardLocation
    from shards.remote import ShardCache

__all__ = ["ViewLoader", "default_parallelism"]


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device}")
    return device


# DLPack's device type of plain host memory (``kDLCPU``; ``kDLCUDAHost`` = 3 is pinned memory)
_DLPACK_CPU = 1


def default_parallelism(gpu: bool) -> tuple[int, int]:
    """DALI CPU threads and view-source processes for one rank: its share of the node's cores.

    The share is the cores this process may run on (its CPU affinity) divided by the ranks on
    this node (``LOCAL_WORLD_SIZE``, which torchrun sets; 1 otherwise), since every rank of a
    node starts its own loader. CPU: every core of the share as DALI threads, no worker
    processes (the view source runs in the DALI thread). GPU: half the share as threads and half
    as worker processes, at most 8 each (the loader's cap so far; not measured beyond it). One
    GPU on 16 cores: 8 + 8, as before; 8 ranks on 16 cores: 1 + 1 each, where sizing every
    rank from the node's cores started 8 x (8 + 8) threads and processes on 16 cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    ranks = int(local) if local.isdigit() and int(local) > 0 else 1
    share = max(1, cores // ranks)
    if not gpu:
        return share, 0
    return max(1, min(8, share // 2)), min(8, share // 2)


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor on its own device.

    CPU, in plain host memory: zero copy through DLPack; DALI's dynamic executor gives every
    run's outputs their own buffers, which live as long as the tensor. CPU in pinned memory
    (the CPU outputs of a pipeline with a GPU, such as the rows and extras of a GPU view
    pipeline): DLPack device type 3 (``kDLCUDAHost``), which ``torch.from_dlpack`` refuses, so
    a copy into plain host memory (``feed_ndarray``; these outputs are small int tensors). GPU:
    a copy on torch's current stream (ordered after DALI's work by ``feed_ndarray``), the path
    DALI's own torch iterator takes.
    """
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    from nvidia.dali.tensors import TensorListGPU

    t = tensor_list.as_tensor()
    if not isinstance(tensor_list, TensorListGPU):
        if int(t.__dlpack_device__()[0]) == _DLPACK_CPU:
            return torch.from_dlpack(t)
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype])
        return feed_ndarray(t, out)
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
    return out


def _decode_probe(device_id: int | None) -> Any:
    """A one-image pipeline with the view pipelines' decoder (``fn.decoders.image``, "mixed"
    on a GPU, "cpu" otherwise), fed through ``feed_input("jpeg", ...)``."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def probe():
        jpeg = fn.external_source(name="jpeg", dtype=types.UINT8)
        return fn.decoders.image(
            jpeg, device="mixed" if device_id is not None else "cpu", output_type=types.RGB
        )

    pipe = probe(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    pipe.build()
    return pipe


def first_undecodable(
    index: ShardIndex, rows: list[int], device_id: int | None = None
) -> tuple[int, str] | None:
    """The first of ``rows`` whose ``KEY.jpg`` DALI's decoder refuses, with its error; ``None``
    when every one decodes. One pipeline per failure (a failed DALI pipeline is unusable)."""
    pipe = None
    try:
        for row in rows:
            if pipe is None:
                pipe = _decode_probe(device_id)
            pipe.feed_input("jpeg", [index.read_jpeg(row).copy()])
            try:
                pipe.run()
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError or its own types
                return row, _dali_reason(e)
    finally:
        del pipe
    return None


def _dali_reason(error: BaseException) -> str:
    """The informative lines of a DALI error (without its traceback of the graph)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    noise = ("Critical error", "Current pipeline object", "which was used", "File ", "Error in ")
    noise += ("return ", "image = ")
    kept = [ln for ln in lines if not ln.startswith(noise) and ln != "encountered:"]
    return "; ".join(dict.fromkeys(kept)) or type(error).__name__


class ViewLoader:
    """Batches of views of the shards in ``shards_dir`` (see the module docstring).

    Args:
        shards_dir: output folder of ``ssl-cli shards build``, its URL, or the
            :class:`shards.remote.ShardCache` to read that URL through.
        views: a :class:`~pipeline.views.ViewSet`: ``MOSViews``, ``UniVIPViews``,
            ``MultiCropViews`` (or ``DecodeCropViews``), e.g. from :func:`view_set`.
        batch_size: per rank.
        rank, world_size: this process's part of the data (DDP).
        seed: the whole order and every random decision derive from it.
        device: ``"cpu"`` (DALI CPU operators) or ``"cuda[:N]"`` (GPU decoding and views).
        num_threads: DALI CPU threads [default: this rank's share of the node's cores on CPU,
            ``min(8, share // 2)`` with a GPU; :func:`default_parallelism`].
        workers: processes of the view source [default: 0 on CPU (in the DALI thread),
            ``min(8, share // 2)`` with a GPU].
        prefetch: batches DALI prepares ahead.
    """

    def __init__(
        self,
        shards_dir: str | Path | ShardLocation | ShardCache,
        views: ViewSet,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        workers: int | None = None,
        prefetch: int = 2,
    ):
        if not hasattr(views, "banks") or not hasattr(views, "plan_sample"):
            raise TypeError(f"views must be a view set (MOSViews, ...), got {views!r}")
        for name, v, lo in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("prefetch", prefetch, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        self.device = _device(device)
        threads, procs = default_parallelism(self.device.type == "cuda")
        self.num_threads = num_threads or threads
        self.workers = workers if workers is not None else procs
        if self.workers < 0 or self.num_threads < 1:
            raise ValueError("workers must be >= 0 and num_threads >= 1")
        self.views = views
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.prefetch = prefetch
        self.index = ShardIndex(shards_dir)
        self.plan = EpochPlan(len(self.index), batch_size, world_size, seed)
        self._epoch, self._batch = 0, 0
        self._pipe = None
        self._pipe_next: tuple[int, int] | None = None  # what the pipeline delivers next
        self._source: ViewSource | None = None
        self._closed = False

    # ------------------------------------------------------------------------ position

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        return self.plan.batches

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch``; a no-op when ``epoch`` is the current one (so that a
        position restored by :meth:`load_state_dict` survives the trainer's ``set_epoch``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch, self._batch = epoch, 0

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(
                f"invalid loader state {state} (epoch >= 0, 0 <= batch <= {len(self)})"
            )
        if batch == len(self):
            epoch, batch = epoch + 1, 0
        self._epoch, self._batch = epoch, batch

    # ---------------------------------------------------------------------- pipeline

    def _build(self) -> None:

        self._release()
        self._source = ViewSource(
            self.index, self.views, self.plan, self.rank, self._epoch, self._batch
        )
        self._extras = self._source.extras()  # the pipeline's extra outputs, in order
        self._pipe = view_pipeline(
            self._source,
            self.batch_size,
            self.device.index if self.device.type == "cuda" else None,
            self.num_threads,
            self.workers,
            self.prefetch,
        )
        self._pipe_next = (self._epoch, self._batch)

    def _release(self) -> None:
        pipe, self._pipe = self._pipe, None
        self._pipe_next = None
        if pipe is not None:
            pipe._shutdown()  # stops the executor and the source's worker processes now
            del pipe

    def _convert(self, outputs) -> dict[str, Any]:
        """DALI outputs -> the view set's batch dict. The rows and extras come from the host
        (small int tensors; the view set moves what it returns to the device of ``index``)."""
        banks = self.views.banks()
        index = _to_torch(outputs[0], self.device).reshape(-1).to(self.device, non_blocking=True)
        tensors = {b.name: _to_torch(o, self.device) for b, o in zip(banks, outputs[1:])}
        extras = {
            name: _to_torch(o, self.device)
            for name, o in zip(self._extras, outputs[1 + len(banks) :])
        }
        return self.views.assemble(tensors, extras, index)

    def __iter__(self):
        """The batches of the current epoch from the current position; afterwards the
        position is the start of the next epoch."""
        if self._closed:
            raise RuntimeError("the loader is closed")
        epoch, n = self._epoch, len(self)
        while self._epoch == epoch:
            if self._pipe is None or self._pipe_next != (self._epoch, self._batch):
                self._build()
            batch = self._convert(self._run())
            self._batch += 1
            if self._batch == n:
                self._end_epoch()
                self._epoch, self._batch = self._epoch + 1, 0
            else:
                self._pipe_next = (self._epoch, self._batch)
            yield batch

    def _end_epoch(self) -> None:
        """The source has raised StopIteration for the batch after the last: take it from the
        pipeline and reset it, which starts the next epoch's prefetching."""
        try:
            self._run()
        except StopIteration:
            self._pipe.reset()
            self._pipe_next = (self._epoch + 1, 0)
        else:  # pragma: no cover - the source guarantees the end of epoch
            raise RuntimeError("internal error: the view source did not end the epoch")

    def _run(self):
        """``pipe.run()``; a failure becomes an error naming the sample (module docstring)."""
        try:
            return self._pipe.run()
        except StopIteration:
            raise
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError or its own types
            self._release()  # a pipeline that failed cannot run again
            raise self._explain(e) from None

    def _explain(self, error: BaseException) -> Exception:
        text = str(error)
        for line in text.splitlines():  # the view source's own error, relayed by DALI
            if "ShardError: " in line:
                return ShardError(line.split("ShardError: ", 1)[1].strip())
        # the batch that failed is the one asked for or one of the `prefetch` queued after it
        positions, (epoch, batch) = [], (self._epoch, self._batch)
        for _ in range(self.prefetch + 1):
            if batch == len(self):
                epoch, batch = epoch + 1, 0
            positions.append((epoch, batch))
            batch += 1
        source = ViewSource(self.index, self.views, self.plan, self.rank, epoch, 0)
        for e, b in positions:  # the view source's work again, here: its errors name the sample
            for i in range(self.batch_size):
                try:
                    source.sample(e, b, i)
                except ShardError as found:
                    return found
        rows = [int(r) for e, b in positions for r in self.plan.rows(e, b, self.rank)]
        gpu = self.device.type == "cuda"
        found = first_undecodable(self.index, list(dict.fromkeys(rows)), self.device.index)
        if found is not None:
            row, reason = found
            return self.index.sample_error(
                row,
                f"its .jpg cannot be decoded by DALI's {'GPU (mixed)' if gpu else 'CPU'} "
                f"image decoder ({reason}); rebuild the shards without it",
            )
        where = ", ".join(f"epoch {e} batch {b}" for e, b in positions)
        return RuntimeError(
            f"the DALI pipeline on {self.index.root} failed at {where} (every sample of these "
            f"batches decodes on its own): {_dali_reason(error)}"
        )

    # ------------------------------------------------------------------------- cleanup

    def close(self) -> None:
        """Stop the pipeline and its worker processes, unmap the shards."""
        self._release()
        self.index.close()
        self._closed = True

    def __enter__(self) -> ViewLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:
            pass
