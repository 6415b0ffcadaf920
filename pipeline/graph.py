"""The DALI pipelines: one graph per view set, decoding every sample once.

Reading: :func:`view_pipeline` reads through our own :class:`~pipeline.source.ViewSource`, a
parallel ``fn.external_source`` that slices the JPEG bytes (and proposal boxes) out of the
memory-mapped tars at the offsets of the DALI ``.idx`` files, in the order of
:class:`~pipeline.source.EpochPlan`. Why not ``fn.readers.webdataset`` (which reads the same
shards, see :func:`webdataset_pipeline`): the UniVIP windows need each sample's boxes and a
numpy step (Algorithm 1) before any crop, and every view set needs exact resume. With the
reader, the windows would come from a per-sample Python operator between the reader and the
crops (a second Python stage in the middle of the graph), its shuffle is a buffer whose state
at a mid-epoch position cannot be restored, and its ``pad_last_batch`` repeats samples. Our
source does the numpy work in worker processes ahead of the graph, owns per-rank sharding,
the seeded per-epoch order, the remainder rule and the resume position ``(epoch, batch)``, and
draws every random decision, so a batch is a pure function of ``(seed, epoch, batch)``.
Decoding and every pixel operation stay in DALI.

The graph: ``fn.decoders.image`` (``device="mixed"`` on a GPU: nvJPEG, with the hardware JPEG
decoder where present; ``"cpu"`` otherwise), then per bank (:class:`~pipeline.views.Bank`):
one ``fn.resize`` per frame with the frame's window as region of interest (antialiased; a
reversed window flips), ``fn.stack`` into a sequence, and one chain over the sequence with
per-frame arguments (:func:`pipeline.augment.apply_photometric`: blur, crop of the blur
margin, colour, solarization), then ``fn.crop_mirror_normalize`` to float32 ``[F, 3, s, s]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.verify import load_manifest

from .augment import IMAGENET_MEAN, IMAGENET_STD, apply_photometric
from .source import ViewSource

__all__ = ["source_layout", "view_pipeline", "webdataset_pipeline"]

_MEAN = [255.0 * m for m in IMAGENET_MEAN]
_STD = [255.0 * s for s in IMAGENET_STD]


def source_layout(source: ViewSource) -> tuple[list[tuple[str, str]], list[str]]:
    """The external source's outputs as ``(bank, field)`` pairs, and the extras' names."""
    outputs = [("", "jpeg"), ("", "row")]
    for bank in source.banks:
        outputs += [(bank.name, f) for f in bank.fields]
    extras = source.extras()
    outputs += [("extra", name) for name in extras]
    return outputs, extras


def view_pipeline(
    source: ViewSource,
    batch_size: int,
    device_id: int | None,
    num_threads: int,
    workers: int,
    prefetch: int = 2,
) -> Any:
    """Build the DALI pipeline of ``source``'s view set. Outputs, in order: the rows ``[1]``,
    one float32 ``[F, 3, s, s]`` sequence per bank, then the extras (int32)."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    outputs, extras = source_layout(source)

    @pipeline_def
    def graph():
        nodes = fn.external_source(
            source=source,
            num_outputs=len(outputs),
            batch=False,
            **({"parallel": True, "prefetch_queue_depth": prefetch} if workers > 0 else {}),
        )
        named = dict(zip(outputs, nodes))
        image = fn.decoders.image(
            named[("", "jpeg")], device="mixed" if gpu else "cpu", output_type=types.RGB
        )
        results = [named[("", "row")]]
        for bank in source.banks:
            windows = named[(bank.name, "windows")]
            side = bank.render_size
            frames = [
                fn.resize(
                    image,
                    roi_start=windows[f, 0:2],
                    roi_end=windows[f, 2:4],
                    size=[side, side],
                    antialias=True,
                )
                for f in range(bank.frames)
            ]
            seq = fn.stack(*frames, axis=0, axis_name="F")
            if bank.photometric:
                solarize = named.get((bank.name, "solarize"))
                if gpu and solarize is not None:
                    solarize = solarize.gpu()
                seq = apply_photometric(
                    seq,
                    named[(bank.name, "colour")],
                    named.get((bank.name, "sigma")),
                    named.get((bank.name, "window")),
                    solarize,
                    crop=bank.size if bank.margin else None,
                )
            crop = {"crop": (bank.size, bank.size)} if bank.margin and not bank.photometric else {}
            results.append(
                fn.crop_mirror_normalize(
                    seq,
                    dtype=types.FLOAT,
                    output_layout="FCHW",
                    mean=_MEAN,
                    std=_STD,
                    **crop,
                )
            )
        results += [named[("extra", name)] for name in extras]
        return tuple(results)

    pipe = graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        py_num_workers=max(workers, 1),
        py_start_method="spawn",
        exec_dynamic=True,  # every run's outputs get their own buffers (zero-copy to torch)
    )
    pipe.build()
    return pipe


def webdataset_pipeline(
    shards_dir,
    batch_size: int,
    shard_id: int = 0,
    num_shards: int = 1,
    device_id: int | None = None,
    num_threads: int = 1,
    random_shuffle: bool = False,
    seed: int = 0,
    size: int = 224,
) -> Any:
    """DALI's own reader on the same shards: ``(jpeg bytes, boxes [N*4] int32, image shape,
    one random resized crop of side size)``; padded last batch, named ``"Reader"``.

    The shard format contract (``KEY.jpg`` + raw int32 ``KEY.boxes``, one ``.idx`` per tar) is
    what ``fn.readers.webdataset`` reads directly; kept as a check of that contract and as an
    alternative reading path.
    """

    from nvidia.dali import fn, pipeline_def, types

    root = Path(shards_dir)
    manifest = load_manifest(root)
    tars = [str(root / s["name"]) for s in manifest["shards"]]
    idxs = [str(root / s["index"]) for s in manifest["shards"]]
    gpu = device_id is not None

    @pipeline_def
    def graph():
        jpeg, boxes = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=["jpg", "boxes"],
            dtypes=[types.UINT8, types.INT32],
            missing_component_behavior="empty",
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=random_shuffle,
            pad_last_batch=True,
            name="Reader",
        )
        image = fn.decoders.image(jpeg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        crop = fn.random_resized_crop(image, size=[size, size])
        return jpeg, boxes, image.shape(), crop

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    pipe.build()
    return pipe
