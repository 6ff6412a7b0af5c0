"""Simulation throughput, three ways in one process on one device, in image-timesteps per second.

    python benchmarks/bench_simulate.py --out simulate.json          # VGG-16, 32x32, T=256 (a GPU)
    python benchmarks/bench_simulate.py --smoke --out simulate.json  # a tiny network on CPU, seconds

* ``step_by_step``: the reference simulator one step per layer call, batch 100 (the published code's way);
* ``spikingjelly``: the network exported to SpikingJelly 2.0 multi-step IF neurons
  (:func:`annsnn.interop.to_spikingjelly`), the whole ``T`` in one chunk;
* ``annsnn``: annsnn's simulator, ``engine="auto"``: the fused Triton fast path on CUDA, the plain-torch
  multi-step reference on CPU.

On CUDA it adds ``annsnn_reference`` (the plain-torch multi-step simulator in float32) and, with
``--cuda-graph``, ``annsnn_cuda_graph``. Inputs are synthetic; labels are the ANN's own predictions,
so every method's accuracy at ``T`` (``acc_at_T``) is its agreement with the ANN. Each method runs once
untimed on a few images first (Triton compilation, cuDNN's choices).
"""
from __future__ import annotations

import argparse
import sys

import torch

import common
from annsnn.convert import convert
from annsnn.data import Split
from annsnn.pipeline import environment
from annsnn.simulate import simulate
from annsnn.utils import write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny network, few images, CPU: checks that it runs")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--T", type=int, default=None, help="time steps (default 256; 8 with --smoke)")
    p.add_argument("--images", type=int, default=None,
                   help="images for annsnn (default 10000; slower methods use fewer)")
    p.add_argument("--batch", type=int, default=1000, help="annsnn fast path: batch size")
    p.add_argument("--chunk", type=int, default=16, help="annsnn: time steps per layer call")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="annsnn fast path: layer precision")
    p.add_argument("--cuda-graph", action="store_true", help="also time the fast path with CUDA graphs")
    p.add_argument("--skip", nargs="*", default=[], help="methods to leave out")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    torch.backends.cudnn.benchmark = True  # the same for every method
    if args.smoke:
        torch.set_num_threads(1)  # tiny work: one thread is as fast, and immune to a busy machine
    T = args.T or (8 if args.smoke else 256)
    n_main = args.images or (48 if args.smoke else 10000)
    dtype = getattr(torch, args.dtype)

    model, shape = common.network(args.smoke)
    pool = common.synthetic_images(max(n_main, 256), shape)
    common.calibrate(model, pool, device)
    with torch.no_grad():  # labels: the ANN's predictions, so accuracy is agreement with the ANN
        labels = torch.cat([model(pool.x[i:i + 500].to(device).float() / 255).argmax(1).cpu()
                            for i in range(0, len(pool), 500)])
    data = Split(pool.x, labels)
    snn = convert(model)

    fast = device.type == "cuda"
    methods: dict[str, dict] = {
        "step_by_step": dict(label="step-by-step, batch 100", net=snn, images=24 if args.smoke else 300,
                             kw=dict(engine="reference", chunk=1, batch_size=100)),
        "spikingjelly": dict(label="SpikingJelly 2.0 multi-step, whole T", net="spikingjelly",
                             images=32 if args.smoke else 2000, kw=dict(engine="reference", chunk=T, batch_size=32)),
        "annsnn": dict(label=f"annsnn fast path ({args.dtype})" if fast else "annsnn multi-step (reference, CPU)",
                       net=snn, images=n_main,
                       kw=dict(engine="auto", dtype=dtype, chunk=args.chunk, batch_size=args.batch if fast else 16)),
    }
    if fast:
        methods["annsnn_reference"] = dict(label="annsnn multi-step reference, float32", net=snn, images=2000,
                                           kw=dict(engine="reference", chunk=args.chunk, batch_size=500))
        if args.cuda_graph:
            methods["annsnn_cuda_graph"] = dict(label=f"annsnn fast path + CUDA graph ({args.dtype})", net=snn,
                                                images=n_main, kw=dict(engine="fast", dtype=dtype, cuda_graph=True,
                                                                       chunk=args.chunk, batch_size=args.batch))
    rows: dict[str, dict] = {}
    for name, m in methods.items():
        if name in args.skip:
            continue
        net = m["net"]
        if net == "spikingjelly":
            try:
                from annsnn.interop import to_spikingjelly
                net = to_spikingjelly(snn)
            except ImportError as e:
                rows[name] = {"label": m["label"], "error": str(e)}
                continue
        images = Split(data.x[:m["images"]], data.y[:m["images"]])
        try:
            simulate(net, Split(images.x[:8], images.y[:8]), T=min(T, 4), device=device, **m["kw"])  # warm-up
            result, seconds, peak = common.timed(lambda: simulate(net, images, T=T, device=device, **m["kw"]), device)
        except Exception as e:  # report and go on: one failing method must not hide the others
            rows[name] = {"label": m["label"], "error": f"{type(e).__name__}: {e}"}
            continue
        rows[name] = {"label": m["label"], "throughput": len(images) * T / seconds, "unit": "image-timesteps/s",
                      "seconds": seconds, "images": len(images), "T": T, "peak_mb": peak, "engine": result.engine,
                      "acc_at_T": result.acc[-1], **{k: v for k, v in m["kw"].items() if k != "dtype"}}
        if args.out:  # after every method, so a run cut short still leaves its rows
            write_json(args.out, {"methods": rows})

    ok = {k: v for k, v in rows.items() if "throughput" in v}
    ratios = {f"annsnn / {other}": ok["annsnn"]["throughput"] / ok[other]["throughput"]
              for other in ("step_by_step", "spikingjelly", "annsnn_reference") if "annsnn" in ok and other in ok}
    common.print_table(f"Simulation on {environment()['device']}, T={T}", rows, "image-timesteps/s", ratios, device)
    if fast and "annsnn" in ok:
        sj = ratios.get("annsnn / spikingjelly")
        print(f"targets: >= 600,000 image-timesteps/s: {ok['annsnn']['throughput']:,.0f}; "
              f">= 5x SpikingJelly: {f'{sj:.2f}x' if sj else 'not measured'}")
    return common.write_report(args, "simulate", device, rows, ratios, T=T)

if __name__ == "__main__":
    sys.exit(main())
