"""Facts about the machine that reports and run records state."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Where each library's version is read: the module's ``__version__`` when the module is loaded
# (what actually ran), else the first of the distributions that is installed.
_LIBRARIES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "ssl-cli": (None, ("ssl-cli",)),
    "torch": ("torch", ("torch",)),
    "torchvision": ("torchvision", ("torchvision",)),
    "timm": ("timm", ("timm",)),
    "numpy": ("numpy", ("numpy",)),
    "pillow": ("PIL", ("pillow",)),
    "pyarrow": ("pyarrow", ("pyarrow",)),
    "webdataset": ("webdataset", ("webdataset",)),
    "opencv": (
        "cv2",
        (
            "opencv-contrib-python-headless",
            "opencv-contrib-python",
            "opencv-python-headless",
            "opencv-python",
        ),
    ),
    "dali": (
        "nvidia.dali",
        ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110"),
    ),
    "tensorboard": ("tensorboard", ("tensorboard",)),
    "wandb": ("wandb", ("wandb",)),
}


def library_module(name: str) -> str | None:
    """The module the library ``name`` (a key of ``_LIBRARIES``) is imported as; ``None`` for
    a distribution without one of its own (``ssl-cli``)."""
    return _LIBRARIES[name][0]


def library_version(name: str) -> str | None:
    """The version of the library ``name`` (a key of ``_LIBRARIES``), ``None`` when it is not
    installed."""

    module, dists = _LIBRARIES[name]
    loaded = sys.modules.get(module) if module else None
    version = getattr(loaded, "__version__", None)
    if isinstance(version, str):
        return version
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def library_versions(*names: str) -> dict[str, str | None]:
    """``python`` and the version of each library in ``names`` (``None``: not installed): the
    one collector behind the versions of manifests, run records and benchmark reports."""
    return {"python": platform.python_version(), **{n: library_version(n) for n in names}}
