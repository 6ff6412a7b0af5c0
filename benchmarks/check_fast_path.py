"""The fast path against the reference simulator on the same weights: the accuracy curve at every t.

    python benchmarks/check_fast_path.py --out check.json          # VGG-16 briefly trained on synthetic data
    python benchmarks/check_fast_path.py --checkpoint runs/full/stage2.pt --data-root DIR --out check.json
    TRITON_INTERPRET=1 python benchmarks/check_fast_path.py --smoke  # a tiny network on CPU

For each fast-path precision (bfloat16, float16, float32) it reports the largest difference from the
reference curve over ``t = 1..T`` in percentage points and the steps where it exceeds 0.1; for
float32 also whether the curves are identical and whether every layer's spikes are identical on one
batch (spike for spike). Without a checkpoint the network is trained for a moment on synthetic images
whose class sets their brightness, so that predictions differ between images and the curves rise.
"""
from __future__ import annotations

import argparse
import sys

import torch

import common
from annsnn.convert import convert, neurons, reset, set_steps
from annsnn.data import Dataset, Split
from annsnn.kernels import fuse_for_speed
from annsnn.pipeline import environment
from annsnn.simulate import simulate
from annsnn.train import Stage1Config, evaluate, load_model, train_stage1
from annsnn.utils import write_json


def bright_images(n: int, shape: dict, seed: int) -> Split:
    """Noisy images whose class sets the brightness of the first channel: learnable in a few epochs."""
    split = common.synthetic_images(n, shape, seed)
    x = split.x // 4
    x[:, 0] += (split.y * 20).to(torch.uint8)[:, None, None]
    return Split(x, split.y)


def layer_spikes(net: torch.nn.Module, x: torch.Tensor, T: int, chunk: int) -> dict[str, torch.Tensor]:
    """Every neuron layer's output (by name, ``net.`` prefix removed) over ``T`` steps."""
    layers = {n.removeprefix("net."): m for n, m in neurons(net).items()}
    record: dict[str, list] = {n: [] for n in layers}
    hooks = [m.register_forward_hook(lambda mod, i, out, n=n: record[n].append(out.float()))
             for n, m in layers.items()]
    reset(net)
    with torch.no_grad():
        for t0 in range(0, T, chunk):
            set_steps(net, min(chunk, T - t0))
            net(x.repeat(min(chunk, T - t0), 1, 1, 1))
    for h in hooks:
        h.remove()
    return {n: torch.cat(r) for n, r in record.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="an annsnn checkpoint (stage1.pt or stage2.pt); default: synthetic data")
    p.add_argument("--data-root", default="data", help="where the checkpoint's dataset is (with --checkpoint)")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny network on CPU (set TRITON_INTERPRET=1)")
    p.add_argument("--T", type=int, default=None, help="time steps (default 256; 16 with --smoke)")
    p.add_argument("--images", type=int, default=None, help="test images (default: all, or 2000 synthetic)")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--chunk", type=int, default=16)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    # True float32 in both engines: TF32 convolutions and matmuls would round differently in each
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    T = args.T or (16 if args.smoke else 256)
    if args.checkpoint:
        from annsnn.data import load_dataset
        model, payload = load_model(args.checkpoint, device=device)
        info = payload["config"]["dataset"]
        test = load_dataset(info["name"], args.data_root, limit=info.get("limit")).test
        source = f"checkpoint {args.checkpoint}, test split"
    else:
        model, shape = common.network(args.smoke)
        n = 2000 if args.smoke else 10000
        train, test = bright_images(n, shape, seed=0), bright_images(args.images or (64 if args.smoke else 2000),
                                                                         shape, seed=1)
        data = Dataset("synthetic", train, test, test, [str(i) for i in range(10)], tuple(shape["mean"]),
                       tuple(shape["std"]))
        cfg = Stage1Config(epochs=4, batch_size=64 if args.smoke else 128, lr=0.05, aug={}, amp=True,
                           channels_last=True)
        train_stage1(model.to(device), data, cfg, device=device)
        source = f"synthetic images (class = brightness), network trained {cfg.epochs} epochs on {n}"
    test = test.subset(args.images)
    snn = convert(model)
    ann_acc = evaluate(model, test, device=device)["acc"]
    kw = dict(T=T, batch_size=args.batch, chunk=args.chunk, device=device)
    reference = simulate(snn, test, engine="reference", **kw)
    report = {"benchmark": "check_fast_path", "source": source, "n": reference.n, "T": T, "ann_acc": ann_acc,
              "environment": environment(), "command": " ".join(sys.argv), "reference": reference.acc, "fast": {}}
    print(f"{source}: {reference.n} images, T={T}; ANN {ann_acc:.2f}%, reference SNN at T: {reference.acc[-1]:.2f}%")
    for name in ("bfloat16", "float16", "float32"):
        fast = simulate(snn, test, engine="fast", dtype=getattr(torch, name), **kw)
        diff = [abs(a - b) for a, b in zip(reference.acc, fast.acc)]
        over = [t for t, d in enumerate(diff, 1) if d > 0.1]
        row = {"acc": fast.acc, "max_diff_pp": max(diff), "steps_over_0.1pp": over,
               "identical": fast.acc == reference.acc}
        report["fast"][name] = row
        print(f"{name:9s} largest |difference| {row['max_diff_pp']:.3f} pp; over 0.1 pp at "
              f"{len(row['steps_over_0.1pp'])} of {T} steps; identical curve: {row['identical']}")
    x = (test.x[:64].float() / 255).to(device)
    ref, got = layer_spikes(snn, x, 32, 16), layer_spikes(fuse_for_speed(snn, torch.float32), x, 32, 16)
    same = {layer: bool(torch.equal(ref[layer], got[layer])) for layer in ref}
    report["float32_spike_for_spike"] = same
    print(f"float32 spike for spike on {len(x)} images, 32 steps: {sum(same.values())} of {len(same)} layers identical")
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
