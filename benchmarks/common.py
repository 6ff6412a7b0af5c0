"""What both benchmarks share: synthetic data, a calibrated network, timing, peak memory, the table."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from annsnn.data import Split  # noqa: E402
from annsnn.models import build_model  # noqa: E402


def network(smoke: bool, rnl: bool = True, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """VGG-16 for 32x32 RGB images, or (smoke) the small CNN for 8x8 grey images."""
    torch.manual_seed(seed)
    if smoke:
        shape = dict(num_classes=10, in_channels=1, image_size=8, mean=[0.5], std=[0.5])
        return build_model("small_cnn", rnl=rnl, **shape), shape
    shape = dict(num_classes=10, in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    return build_model("vgg16", rnl=rnl, **shape), shape


def synthetic_images(n: int, shape: dict, seed: int = 0) -> Split:
    """``n`` random uint8 images with random labels (labels can be replaced by a network's predictions)."""
    g = torch.Generator().manual_seed(seed)
    size, channels = shape["image_size"], shape["in_channels"]
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, shape["num_classes"], (n,), generator=g)
    return Split(x, y)


@torch.no_grad()
def calibrate(model: torch.nn.Module, data: Split, device: torch.device, passes: int = 3) -> torch.nn.Module:
    """A few training-mode forward passes, so BatchNorm statistics and RNL maxima are realistic."""
    model.to(device).train()
    for i in range(passes):
        model(data.x[i * 64:(i + 1) * 64].to(device).float() / 255)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[object, float, float]:
    """``(result, seconds, peak memory in MB)``: CUDA peak allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return result, seconds, peak


def memory_kind(device: torch.device) -> str:
    return "CUDA peak allocated" if device.type == "cuda" else "process peak RSS (high-water mark so far)"


def print_table(title: str, rows: dict, unit: str, ratios: dict, device: torch.device) -> None:
    print(f"\n{title}")
    print(f"{'method':44s} {unit:>22s} {'seconds':>9s} {'peak MB':>9s}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:44s} {'-':>22s}   {row['error']}")
            continue
        print(f"{row['label'][:44]:44s} {row['throughput']:22,.0f} {row['seconds']:9.2f} {row['peak_mb']:9,.0f}")
    print(f"(peak memory: {memory_kind(device)})")
    for name, value in ratios.items():
        print(f"{name:44s} {value:8.2f}x")


def write_report(args, benchmark: str, device: torch.device, rows: dict, ratios: dict, **extra) -> int:
    """Write the JSON report (``args.out``) shared by both benchmarks; exit code 1 if no method ran."""
    from annsnn.pipeline import environment
    from annsnn.utils import write_json

    report = {"benchmark": benchmark, "smoke": args.smoke, "device": str(device), **extra,
              "peak_memory": memory_kind(device), "environment": environment(),
              "command": " ".join(sys.argv), "methods": rows, "ratios": ratios}
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0 if any("throughput" in v for v in rows.values()) else 1
