"""Decode JPEGs exactly as the training pipeline does: DALI's ``fn.decoders.image`` (CPU).

Only ``ssl-cli shards verify --decode`` imports this module (and so DALI); the build itself
decides with header checks (:func:`shards.images.jpeg_info`) and needs no DALI.
"""

from __future__ import annotations

import numpy as np


class DaliDecoder:
    """``sizes(jpegs)`` -> per input ``(width, height)`` of the decoded image, or the error.

    A batch that fails is decoded one by one to name the sample that fails.
    """

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size
        self._pipes: dict[int, object] = {}
        self._feed: list[np.ndarray] = []

    def _pipe(self, n: int):
        if n not in self._pipes:
            from nvidia.dali import fn, pipeline_def, types

            @pipeline_def(batch_size=n, num_threads=1, device_id=None, prefetch_queue_depth=1)
            def decode():
                jpeg = fn.external_source(source=lambda: self._feed, batch=True, name="jpeg")
                # as pipeline.graph decodes: RGB, EXIF orientation applied (DALI's default)
                return fn.decoders.image(jpeg, device="cpu", output_type=types.RGB)

            pipe = decode()
            pipe.build()
            self._pipes[n] = pipe
        return self._pipes[n]

    def _run(self, jpegs: list[bytes]) -> list[tuple[int, int]]:
        self._feed = [np.frombuffer(j, dtype=np.uint8) for j in jpegs]
        try:
            (images,) = self._pipe(len(jpegs)).run()
        except Exception:
            self._pipes.pop(len(jpegs), None)  # a failed pipeline is not reused
            raise
        return [
            (a.shape[1], a.shape[0]) for a in (np.asarray(images[i]) for i in range(len(jpegs)))
        ]

    def sizes(self, jpegs: list[bytes]) -> list[tuple[int, int] | str]:
        out: list[tuple[int, int] | str] = []
        for start in range(0, len(jpegs), self.batch_size):
            batch = jpegs[start : start + self.batch_size]
            try:
                out.extend(self._run(batch))
                continue
            except Exception:  # noqa: BLE001 - find which one fails
                pass
            for j in batch:
                try:
                    out.extend(self._run([j]))
                except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError with a long trace
                    out.append(_short(str(e)))
        return out


def _short(message: str) -> str:
    """The operator's own words from DALI's multi-line error (after ``encountered:``)."""
    tail = message.split("encountered:", 1)[-1]
    lines = [
        ln.strip()
        for ln in tail.splitlines()
        if ln.strip() and "no longer valid" not in ln and "Critical error" not in ln
    ]
    return "DALI: " + (" ".join(lines)[:300] or "decode failed")
