"""Write N JPEG crops of the @sample photographs (scikit-image / scikit-learn) into OUT.

A data set of real photographs of a few hundred images, for benchmarks that need more
images than the 19 of @sample: crop i is a random crop (a quarter to all of the area, aspect
3:4 to 4:3) of photograph i mod 19, resized to at most 512 px on its longer side, JPEG
quality 90. The same N and seed give the same files.

    python scripts/sample-crops.py data/sample-crops 240
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from shards.sources import sample_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    photos = [(key, Image.open(path).convert("RGB")) for key, path in sample_files()]
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        key, img = photos[i % len(photos)]
        w, h = img.size
        area = w * h * rng.uniform(0.25, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch))
        scale = min(1.0, 512 / max(cw, ch))
        if scale < 1.0:
            crop = crop.resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)
        crop.save(args.out / f"{i:05d}_{key}.jpg", quality=90)
    print(f"wrote {args.n} crops into {args.out}")


if __name__ == "__main__":
    main()
