"""Command line: ``annsnn train | tune | simulate | reproduce``, a thin layer over the library.

Bad input exits with code 2 and a one-line message; nothing already written is overwritten.
``torchrun --nproc_per_node=N -m annsnn train|tune|simulate ...`` runs on N processes (one per GPU);
only process 0 prints and writes.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

from . import distributed
from .data import DATASETS
from .models import MODELS
from .pipeline import PROFILES, get_profile


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):   # float() reads "nan" and "inf" as numbers
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {value:g}")
    return value


# The most time steps a simulation may ask for: the paper's curves end at 256, and memory and time grow
# with T (a mistyped 1000000000 would run for days).
MAX_T = 10_000


def _time_steps(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_T:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_T} time steps, got {value}")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive, got 0")
    return value


def _say(text: str) -> None:
    """Print from process 0 only (every process runs the command under torchrun)."""
    if distributed.is_main():
        print(text)


def _device(name: str | None):
    from .utils import device

    return distributed.local_device(device(name))


def _writable_folder(folder: Path, what: str = "--out") -> None:
    """Refuse, before any work, a folder that cannot be written: a file of that name, a folder without
    write permission, or (for one to be made) a path whose nearest existing folder cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file, not a folder; give a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {folder} lies under the file {existing}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder} cannot be written ({existing} is not writable); give another folder")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default="data", help="dataset folder, or an .npz of arrays (default: data)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="annsnn", description="Optimal ANN-SNN conversion: train, tune, simulate, reproduce.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="stage 1: train the RNL network's weights")
    p.add_argument("--profile", choices=PROFILES, default="quick")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=_non_negative, help="share of the training set held out for validation")
    p.add_argument("--relu", action="store_true", help="train a plain ReLU network (for the baselines)")
    p.add_argument("--out", help="output folder (default: runs/<profile>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU)")
    _common(p)

    p = sub.add_parser("tune", help="stage 2: train the shared threshold scale with the Rate Inference Loss")
    p.add_argument("--checkpoint", required=True, help="a stage-1 checkpoint (stage1.pt)")
    p.add_argument("--lam", type=_non_negative, nargs="+", help="one or more lambdas (weight of Omega)")
    p.add_argument("--tol", type=_non_negative, help="accuracy guard in percentage points of validation accuracy")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--lr", type=_positive)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--batchnorm", choices=("frozen", "follow"),
                   help="BatchNorm statistics: the stage-1 ones (frozen), or re-estimated at every check as the "
                        "threshold scale moves (follow); default: the profile's")
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    _common(p)

    p = sub.add_parser("simulate", help="convert a checkpoint to IF neurons and simulate it")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--T", type=_time_steps, default=128, help=f"number of time steps (default 128, at most {MAX_T})")
    p.add_argument("--v0", choices=("zero", "half"), default="zero", help="initial membrane: 0 or theta/2")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--chunk", type=_positive_int, default=16, help="time steps per layer call (1: step by step)")
    p.add_argument("--engine", choices=("auto", "reference", "fast"), default="auto",
                   help="simulator: fused Triton kernels on a GPU (auto, fast) or plain torch (reference)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="fast engine's layer precision: auto picks bfloat16 on GPUs with bfloat16 tensor cores, "
                        "float16 on older GPUs (float32: the reference's spikes exactly)")
    p.add_argument("--out", help="curve JSON to write (default: <checkpoint>_T<T>_<v0>.json); never overwritten")
    _common(p)

    p = sub.add_parser("reproduce", help="stage 1, stage 2, baselines, simulation, plot and curves")
    p.add_argument("--profile", choices=PROFILES, default="quick")
    p.add_argument("--out", help="output folder (default: runs/<profile>)")
    p.add_argument("--epochs", type=_positive_int, help="override the stage-1 epochs")
    p.add_argument("--T", type=_time_steps, help=f"override the number of time steps (at most {MAX_T})")
    p.add_argument("--limit", type=_positive_int, help="use only this many training and test images")
    p.add_argument("--val-fraction", type=_non_negative, help="share of the training set held out for validation")
    p.add_argument("--tol", type=_non_negative, help="stage-2 accuracy guard in percentage points of validation accuracy")
    p.add_argument("--batchnorm", choices=("frozen", "follow"),
                   help="stage 2's BatchNorm statistics: frozen, or following the threshold scale; default: the profile's")
    p.add_argument("--data-note", help="what copy of the data this is, stored with the results")
    p.add_argument("--seed", type=int, default=0, help="seed of stage 1 (initialisation and data order of the RNL "
                   "network and of the ReLU twin) and of stage 2 (data order); default 0")
    _common(p)
    return parser


def _dataset_for(payload: dict, args) -> "object":
    from .data import load_dataset

    info = payload["config"].get("dataset") or {}
    if "name" not in info:
        raise ValueError(f"checkpoint {args.checkpoint} does not record its dataset; it is not an annsnn checkpoint")
    val_fraction = payload["config"].get("val_fraction", 0.1)
    return load_dataset(info["name"], args.data_root, val_fraction=val_fraction, limit=info.get("limit"))


def cmd_train(args) -> int:
    from .pipeline import run_stage1
    from .data import load_dataset

    out = Path(args.out or f"runs/{args.profile}") / ("relu" if args.relu else "")
    _writable_folder(out)
    if (out / "stage1.pt").exists():
        if args.resume:
            _say(f"{out / 'stage1.pt'} is already complete")
            return 0
        raise ValueError(f"{out / 'stage1.pt'} already exists; choose another --out (nothing was changed)")
    if (out / "stage1_last.pt").exists() and not args.resume:
        raise ValueError(f"{out / 'stage1_last.pt'} holds an interrupted run; pass --resume to continue it "
                         "or choose another --out")
    prof = get_profile(args.profile, dataset=args.dataset, model=args.model, val_fraction=args.val_fraction,
                       stage1={"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                               "compile": args.compile or None})
    dev = _device(args.device)
    data = load_dataset(prof["dataset"], args.data_root, val_fraction=prof["val_fraction"])
    _, metrics = run_stage1(data, prof, out, rnl=not args.relu, device=dev, progress=not args.quiet)
    _say(f"stage 1 done: best validation accuracy {metrics['best']['acc']:.2f}% at epoch "
          f"{metrics['best']['epoch']}; saved {out / 'stage1.pt'}")
    return 0


def cmd_tune(args) -> int:
    from .train import Stage2Config, load_model, train_stage2

    dev = _device(args.device)
    model, payload = load_model(args.checkpoint, device=dev)
    if payload.get("kind") != "stage1":
        raise ValueError(f"{args.checkpoint} is a {payload.get('kind', 'unknown')} checkpoint; tune needs stage1.pt")
    if not payload["config"].get("rnl", True):
        raise ValueError(f"{args.checkpoint} is a plain ReLU network; stage 2 needs an RNL network")
    data = _dataset_for(payload, args)
    from .pipeline import check_compatible
    check_compatible(payload, data, args.checkpoint)
    prof = get_profile(payload["config"].get("profile", "quick"))
    lams = args.lam or prof["lams"]
    stage2 = {**prof["stage2"], **{k: v for k, v in (("tol", args.tol), ("epochs", args.epochs), ("lr", args.lr),
                                                       ("batch_size", args.batch_size), ("batchnorm", args.batchnorm))
                                   if v is not None}}
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    _writable_folder(out)
    for lam in lams:
        run = train_stage2(copy.deepcopy(model), data, Stage2Config(lam=lam, **stage2), out_dir=out,
                           config=payload["config"], device=dev, progress=not args.quiet,
                           base_checkpoint=args.checkpoint)
        kept = run["kept"]
        where = kept["path"] or "nothing passed the guard with a lower Omega; stage-1 network kept"
        _say(f"lambda={lam:g}: p={kept['p']:.4f}, validation accuracy {kept['val_acc']:.2f}% "
              f"(stage 1: {run['base']['acc']:.2f}%), Omega {kept['omega']:.4f} -> {where}")
    _say(f"every accepted point: {out / 'stage2_points.json'}")
    return 0


def cmd_simulate(args) -> int:
    import torch

    from .convert import convert
    from .pipeline import check_compatible, environment
    from .simulate import simulate
    from .train import evaluate, load_model
    from .utils import write_json

    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(
        f"{Path(args.checkpoint).stem}_T{args.T}_{args.v0}.json")
    if out.exists():
        raise ValueError(f"{out} already exists; pass another --out (nothing was changed)")
    _writable_folder(out.parent, f"--out {out}: its folder")
    dev = _device(args.device)
    model, payload = load_model(args.checkpoint, device=dev)
    if not payload["config"].get("rnl", True):
        raise ValueError(f"{args.checkpoint} is a plain ReLU network; convert it with threshold balancing "
                         "(annsnn reproduce runs the baselines)")
    data = _dataset_for(payload, args)
    check_compatible(payload, data, args.checkpoint)
    split = getattr(data, args.split)
    result = simulate(convert(model, v0=args.v0), split, T=args.T, batch_size=args.batch_size, chunk=args.chunk,
                      device=dev, progress=not args.quiet and distributed.is_main(), engine=args.engine,
                      dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    ann = evaluate(model, split, device=dev)["acc"]
    if distributed.is_main():
        write_json(out, {"checkpoint": str(args.checkpoint), "split": args.split, "v0": args.v0, "ann_acc": ann,
                         "processes": distributed.world(), "environment": environment(), **result.to_dict()})
    marks = [t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if t <= args.T]
    _say(f"ANN {ann:.2f}%  " + "  ".join(f"T={t}: {result.at(t):.2f}%" for t in marks))
    _say(f"wrote {out}")
    return 0


def cmd_reproduce(args) -> int:
    from .pipeline import reproduce

    out = Path(args.out or f"runs/{args.profile}")
    _writable_folder(out)
    prof_overrides = {"T": args.T, "limit": args.limit, "val_fraction": args.val_fraction,
                      "stage1": {"epochs": args.epochs, "seed": args.seed},
                      "stage2": {"tol": args.tol, "seed": args.seed, "batchnorm": args.batchnorm}}
    result = reproduce(args.profile, out, data_root=args.data_root, device=args.device, progress=not args.quiet,
                       data_note=args.data_note, **prof_overrides)
    ann = result["ann_test_acc"]["rnl_stage2"]
    T = result["settings"]["T"]
    print(f"RNL network (after stage 2) test accuracy {ann:.2f}%")
    for label, acc in result["curves"].items():
        marks = [t for t in (8, 16, 32, 64, 128, 256) if t <= T]
        print(f"{label:28s} " + "  ".join(f"T={t}: {acc[t - 1]:.2f}%" for t in marks))
    print(f"wrote {out / 'curves.json'} and {out / 'curves.png'} in {result['timing_s']['total']:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "tune": cmd_tune, "simulate": cmd_simulate, "reproduce": cmd_reproduce}
    try:
        if args.command == "reproduce" and distributed.launched():
            raise ValueError("reproduce runs in one process; under torchrun use train, tune and simulate")
        distributed.init(getattr(args, "device", None))
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"annsnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a full disk, a file that cannot be read or written: what was written is intact
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"annsnn {args.command}: error: {e.strerror or e}{where}; files written before are intact: fix "
              "that (free space, another --out, the data's permissions), then rerun (training resumes with --resume)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"annsnn {args.command}: interrupted; checkpoints are intact, rerun with --resume", file=sys.stderr)
        return 130
    finally:
        distributed.close()


if __name__ == "__main__":
    sys.exit(main())
