"""What a GPU check ran on: the device, the driver's CUDA, and each library's version or why it
is missing. Never fails: a node without DALI (or with an OpenCV lacking selective search) still
runs the checks that do not need it, and this report says which are missing."""

import importlib
import os
import sys

LIBRARIES = ("torch", "torchvision", "timm", "nvidia.dali", "cv2", "pyarrow", "webdataset")


def main() -> None:
    print("python", sys.version.split()[0], sys.executable)
    found = {}
    for name in LIBRARIES:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # an import that fails for any reason is a missing library here
            print(f"{name}: MISSING ({type(e).__name__}: {e})")
            continue
        found[name] = module
        print(f"{name}: {getattr(module, '__version__', 'version unknown')}")
    cv2 = found.get("cv2")
    if cv2 is not None and not hasattr(cv2, "ximgproc"):
        print("cv2: no ximgproc (opencv-contrib): shards build cannot run selective search here")
    torch = found.get("torch")
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
