"""What a GPU check ran on: the device, torch's CUDA build, and each library's version or why it
does not import. A missing library is reported, not fatal: a node without DALI (or with an
OpenCV lacking selective search) still runs the checks that do not need it. Versions come from
the product's own collector (``shards.sysinfo``, standard library only besides numpy)."""

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shards.sysinfo import library_module, library_version  # noqa: E402

LIBRARIES = ("torch", "torchvision", "timm", "dali", "opencv", "pyarrow", "webdataset")


def main() -> None:
    print("python", sys.version.split()[0], sys.executable)
    for name in LIBRARIES:
        module = library_module(name)
        try:  # imported, not only looked up: an installed DALI may still fail to load
            importlib.import_module(module)
        except Exception as e:  # any failure to import is a missing library here
            print(f"{module}: MISSING ({type(e).__name__}: {e})")
            continue
        print(f"{module}: {library_version(name)}")
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and not hasattr(cv2, "ximgproc"):
        print("cv2: no ximgproc (opencv-contrib): shards build cannot run selective search here")
    torch = sys.modules.get("torch")
    if torch is not None:
        print("torch cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                print(
                    f"device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm {p.major}{p.minor}"
                )
        else:
            print("device: cpu (no CUDA device visible)")
    print("cpu cores:", os.cpu_count(), "usable:", len(os.sched_getaffinity(0)))


if __name__ == "__main__":
    main()
