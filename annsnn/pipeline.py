"""The whole method end to end, in three profiles: ``quick`` (digits, a minute on a CPU), ``medium``
(CIFAR-10 and an 8-layer VGG, under an hour on two CPU cores, minutes on a GPU) and ``full`` (CIFAR-10
and VGG-16 as in the paper, for a GPU).

:func:`reproduce` trains stage 1 (and a plain ReLU twin for the classic baselines), runs stage 2 for
each lambda, converts, simulates, and writes ``curves.json`` and ``curves.png``. Every step reuses a
finished checkpoint found in the output folder and resumes an interrupted one, so running it again
continues where it stopped. The CLI (``annsnn reproduce``) and the book's chapters call it.
"""
from __future__ import annotations

import copy
import os
import platform
import shlex
import sys
import time
from dataclasses import MISSING, fields
from datetime import datetime, timezone
from pathlib import Path

import torch

from .baselines import activation_thresholds, convert_relu
from .convert import convert
from .data import Dataset, load_dataset
from .simulate import simulate
from .train import (Stage1Config, Stage2Config, evaluate, load_model, model_config, model_from_config,
                    record_points, train_stage1, train_stage2)
from .utils import folder_lock, load_checkpoint, save_checkpoint, write_json

PROFILES: dict[str, dict] = {
    "quick": {
        "dataset": "digits", "model": "small_cnn", "val_fraction": 0.2,
        "stage1": {"p": 0.95, "epochs": 30, "batch_size": 64, "lr": 0.05, "aug": {"pad": 1, "flip": False}, "seed": 0},
        "stage2": {"epochs": 4, "batch_size": 128, "lr": 0.5, "tol": 1.5, "seed": 0},
        "lams": [0.005, 0.01, 0.02, 0.05],
        "T": 128, "sim_batch": 512, "chunk": 16, "robust_percentile": 99.9, "targets": [90.0, 95.0],
    },
    "medium": {
        "dataset": "cifar10", "model": "vgg8", "val_fraction": 0.1,
        "stage1": {"p": 0.95, "epochs": 24, "batch_size": 128, "lr": 0.1, "aug": {"pad": 4, "flip": True},
                   "amp": True, "channels_last": True, "seed": 0},
        "stage2": {"epochs": 1, "batch_size": 256, "lr": 0.5, "tol": 0.5, "seed": 0},
        "lams": [0.01, 0.02, 0.05],
        "T": 128, "sim_batch": 128, "chunk": 32, "robust_percentile": 99.9, "targets": [80.0],
        "cpu_test_images": 2000,   # on a CPU the curves come from this fixed part of the test split
    },
    "full": {
        "dataset": "cifar10", "model": "vgg16", "val_fraction": 0.1,
        "stage1": {"p": 0.95, "epochs": 100, "batch_size": 256, "lr": 0.1, "aug": {"pad": 4, "flip": True},
                   "amp": True, "channels_last": True, "checkpoint_every": 10, "seed": 0},
        "stage2": {"epochs": 2, "batch_size": 256, "lr": 0.5, "tol": 0.5, "seed": 0},
        "lams": [0.01, 0.02, 0.05],
        "T": 256, "sim_batch": 500, "chunk": 16, "robust_percentile": 99.9, "targets": [90.0],
    },
}


def get_profile(name: str, **overrides) -> dict:
    """A copy of profile ``name`` with top-level keys (and ``stage1``/``stage2`` dicts) overridden."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    prof = copy.deepcopy(PROFILES[name])
    prof["profile"] = name
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("stage1", "stage2"):
            prof[key].update({k: v for k, v in value.items() if v is not None})
        else:
            prof[key] = value
    return prof


def default_profile() -> str:
    """``quick`` on a CPU, ``medium`` on a GPU (minutes on Colab); ``ANNSNN_PROFILE`` overrides both
    (``ANNSNN_PROFILE=full`` asks for the paper-size run)."""
    name = os.environ.get("ANNSNN_PROFILE") or ("medium" if torch.cuda.is_available() else "quick")
    if name not in PROFILES:
        raise ValueError(f"ANNSNN_PROFILE={name!r} is not a profile; choose one of {', '.join(PROFILES)}")
    return name


class _Laps:
    """Seconds per named step: each call records the time since the previous one (or since creation)."""

    def __init__(self, timing: dict[str, float]) -> None:
        self.timing, self.t = timing, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timing[name], self.t = round(now - self.t, 2), now


def prepare(profile: str = "quick", out_dir: str | Path | None = None, data_root: str | Path = "data", device=None,
            relu: bool = True, stage2: bool = True, progress: bool = False, data_note: str | None = None,
            settings: dict | None = None, seed: int | None = None, **overrides) -> dict:
    """Data and trained networks for a profile: load the checkpoints in ``out_dir`` if present, else train.

    Returns a dict with ``data``, ``profile`` (the settings), ``stage1`` (RNL network), and, if asked,
    ``relu`` (plain ReLU twin) and ``stage2`` (network after the Rate Inference Loss), plus ``metrics``
    and ``timing_s`` (seconds per step). Chapters call this so that each can run alone and later ones
    reuse earlier training; :func:`reproduce` calls it too. ``data_note`` is stored with the dataset's
    description (say which copy of the data was used). Profile settings are overridden by keyword
    (``limit=100``) or by the dict ``settings``, which may also hold the ``stage1`` and ``stage2`` dicts;
    ``seed`` sets the seed of both stages (``annsnn reproduce --seed``).
    """
    from .utils import device as pick_device

    settings = {**(settings or {}), **overrides}
    if seed is not None:
        for stage in ("stage1", "stage2"):
            settings[stage] = {**(settings.get(stage) or {}), "seed": seed}
    prof = get_profile(profile, **settings)
    device = pick_device(device) if not isinstance(device, torch.device) else device
    out_dir = Path(out_dir or f"runs/{profile}")
    timing: dict[str, float] = {}
    lap = _Laps(timing)
    data = load_dataset(prof["dataset"], data_root, val_fraction=prof["val_fraction"], limit=prof.get("limit"))
    if data_note:
        data.info["note"] = data_note
    lap("data")
    out = {"data": data, "profile": prof, "device": device, "out_dir": out_dir, "metrics": {}, "timing_s": timing}
    out["stage1"], out["metrics"]["stage1"] = run_stage1(data, prof, out_dir, device=device, progress=progress)
    lap("stage1")
    if relu:
        out["relu"], out["metrics"]["relu"] = run_stage1(data, prof, out_dir / "relu", rnl=False, device=device,
                                                         progress=progress)
        lap("stage1_relu")
    if stage2:
        out["stage2"], out["metrics"]["stage2"] = run_stage2(out["stage1"], data, prof, out_dir, device=device,
                                                             progress=progress)
        lap("stage2")
    return out


def check_compatible(payload: dict, data: Dataset, path: str | Path) -> None:
    """Raise if a checkpoint was trained on data of another shape or number of classes."""
    cfg = payload["config"]["model"]
    want = data.model_kwargs()
    fields = ("num_classes", "in_channels", "image_size")
    if any(cfg.get(k) != want[k] for k in fields):
        got = ", ".join(f"{k}={cfg.get(k)}" for k in fields)
        raise ValueError(f"checkpoint {path} was trained on other data ({got}) than dataset "
                         f"{data.name!r}; pass the --dataset it was trained on")


def training_settings(prof: dict, stage: str) -> dict:
    """The settings a checkpoint of ``stage`` ("stage1" or "stage2") depends on; stored in it and compared on reuse."""
    keys = ["dataset", "model", "val_fraction", "limit", "stage1"] + (["stage2", "lams"] if stage == "stage2" else [])
    return {k: prof.get(k) for k in keys}


def _as_trained(key: str, value):
    """A stage's settings with the defaults of its config filled in: the same training, however written
    (a checkpoint from before a setting, such as the seed, was named in the profile compares equal)."""
    config = {"stage1": Stage1Config, "stage2": Stage2Config}.get(key)
    if config is None or not isinstance(value, dict):
        return value
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory()
                for f in fields(config) if f.default is not MISSING or f.default_factory is not MISSING}
    return {**defaults, **value}


def check_settings(payload: dict, want: dict, path: str | Path) -> None:
    """Raise if the checkpoint at ``path`` was made with other training settings than ``want``."""
    got = payload["config"].get("settings")
    if got is None:  # written by ``annsnn train``/``tune`` rather than by a profile: nothing to compare
        return
    differ = sorted(k for k in set(got) | set(want) if _as_trained(k, got.get(k)) != _as_trained(k, want.get(k)))
    if differ:
        raise ValueError(f"{path} was trained with other settings ({', '.join(differ)} differ); "
                         "pass another --out, or delete that folder to train again")


def run_stage1(data: Dataset, prof: dict, out_dir: Path, rnl: bool = True, device=None, progress: bool = True):
    """Train (or reuse, or resume) a stage-1 network in ``out_dir``; returns ``(model, metrics)``.

    A checkpoint made with other training settings (epochs, lambdas, data size, ...) is refused
    rather than reused, so results are never labelled with settings they were not trained with. While
    it trains, another process asking for the same folder waits (:func:`annsnn.utils.folder_lock`).
    """
    with folder_lock(out_dir):
        return _run_stage1(data, prof, out_dir, rnl, device, progress)


def _run_stage1(data: Dataset, prof: dict, out_dir: Path, rnl: bool, device, progress: bool):
    settings = training_settings(prof, "stage1")
    done = out_dir / "stage1.pt"
    if done.exists():
        model, payload = load_model(done, device=device)
        check_compatible(payload, data, done)
        check_settings(payload, settings, done)
        return model, payload["metrics"]
    cfg = Stage1Config(**prof["stage1"])
    config = {"model": model_config(prof["model"], data, p=cfg.p), "rnl": rnl, "dataset": data.info,
              "profile": prof["profile"], "val_fraction": prof["val_fraction"], "settings": settings}
    torch.manual_seed(cfg.seed)
    model = model_from_config(config["model"], rnl=rnl).to(device)
    metrics = train_stage1(model, data, cfg, out_dir=out_dir, config=config, resume=True, device=device,
                           progress=progress)
    return model, metrics


def run_stage2(model, data: Dataset, prof: dict, out_dir: Path, device=None, progress: bool = True):
    """Stage 2 for every lambda of the profile; keeps the network with the lowest validation Omega.

    Every candidate already passed the accuracy guard, so the lowest Omega is the fastest network that
    stays within the tolerance. The choice is saved as ``out_dir/stage2.pt``, the only stage-2 network
    written in full; every accepted point of every lambda goes into ``out_dir/stage2_points.json``,
    from which :func:`annsnn.train.load_point` rebuilds any of them in one call. Another process asking
    for the same folder meanwhile waits, as in :func:`run_stage1`.
    """
    with folder_lock(out_dir):
        return _run_stage2(model, data, prof, out_dir, device, progress)


def _run_stage2(model, data: Dataset, prof: dict, out_dir: Path, device, progress: bool):
    chosen_path = out_dir / "stage2.pt"
    settings = training_settings(prof, "stage2")
    if chosen_path.exists():
        tuned, payload = load_model(chosen_path, device=device)
        check_settings(payload, settings, chosen_path)
        return tuned, payload["metrics"]
    runs, best = [], None
    for lam in prof["lams"]:
        tuned = copy.deepcopy(model)
        run = train_stage2(tuned, data, Stage2Config(lam=lam, **prof["stage2"]), device=device, progress=progress)
        runs.append(run)
        if best is None or run["kept"]["omega"] < best[1]["kept"]["omega"]:
            best = (tuned, run)
    tuned, run = best
    record_points(out_dir / "stage2_points.json", out_dir / "stage1.pt", runs, chosen=run["kept"]["name"])
    metrics = {"chosen_lam": run["lam"], "kept": run["kept"],
               "runs": [{k: r[k] for k in ("lam", "base", "kept", "thresholds")} for r in runs]}
    config = {**_config_of(out_dir), "settings": settings}
    save_checkpoint(chosen_path, {"kind": "stage2", "config": config, "model": tuned.state_dict(),
                                  "metrics": metrics})
    return tuned, metrics


def calibration_images(data: Dataset, prof: dict):
    """The training images the baselines' thresholds are measured on: ``calib_images`` of them (5,000 by
    default) with every class equally represented. The first images of a split sorted by class (as the
    offline CIFAR-10 copy is) would be one or two classes only, and give other thresholds."""
    return data.train.balanced_subset(prof.get("calib_images", 5000))


def _config_of(out_dir: Path) -> dict:
    return load_checkpoint(out_dir / "stage1.pt")["config"]


def _cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Versions and hardware (the CPU and the cores this process may use, the GPU), recorded next to every result."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu": _cpu_name(), "cores": cores, "device": "cpu",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    try:
        import spikingjelly  # noqa: F401
        from importlib.metadata import version
        info["spikingjelly"] = version("spikingjelly")
    except Exception:
        pass
    return info


def _command() -> str:
    """The command line that is running, with the program's name shortened to its file name."""
    if not sys.argv:
        return ""
    name = Path(sys.argv[0]).name
    return shlex.join(["annsnn" if name in ("annsnn", "__main__.py") else name] + sys.argv[1:])


def reproduce(profile: str = "quick", out_dir: str | Path = "runs/quick", data_root: str | Path = "data",
              device=None, progress: bool = True, data_note: str | None = None, **overrides) -> dict:
    """Run the whole method and write ``curves.json`` and ``curves.png`` to ``out_dir``.

    Curves: the stage-1 RNL network, the stage-2 network with ``v(0)=0`` (the paper's setting) and
    with ``v(0)=theta/2``, and max-norm and robust-norm conversions of a plain ReLU twin trained the
    same way. Accuracies are on the test split; every choice was made on the validation split. On a
    CPU a profile may simulate only ``cpu_test_images`` test images, a fixed set with every class equally
    represented (the medium profile: 2000, 200 of each class); ``simulated`` in the result says how many,
    and ``ann_test_acc_simulated`` gives the ANNs' accuracy on those same images.
    ``data_note`` is stored with the dataset's description (say which copy of the data was used).
    """
    from .plots import plot_accuracy_curves

    t_start = time.perf_counter()
    prep = prepare(profile, out_dir, data_root, device, relu=True, stage2=True, progress=progress,
                   data_note=data_note, settings=overrides)
    data, prof, device, out_dir = prep["data"], prep["profile"], prep["device"], prep["out_dir"]
    model, relu, tuned = prep["stage1"], prep["relu"], prep["stage2"]
    m1, m2 = prep["metrics"]["stage1"], prep["metrics"]["stage2"]
    timing = prep["timing_s"]
    lap = _Laps(timing)
    sim = dict(T=prof["T"], batch_size=prof["sim_batch"], chunk=prof["chunk"], device=device, progress=progress)
    nets = {"rnl_stage1": model, "rnl_stage2": tuned, "relu": relu}
    ann_acc = {k: evaluate(m, data.test, device=device)["acc"] for k, m in nets.items()}
    test = data.test
    if device.type == "cpu" and prof.get("cpu_test_images"):
        test = test.balanced_subset(prof["cpu_test_images"])   # the whole split when it is no larger
    simulated = {"images": len(test), "of": len(data.test)}
    if test is data.test:
        ann_sim = ann_acc
    else:
        simulated["why"] = (f"on a CPU the {profile} profile simulates {len(test)} test images only, a fixed set "
                            "with every class equally represented (Split.balanced_subset, seed 0)")
        ann_sim = {k: evaluate(m, test, device=device)["acc"] for k, m in nets.items()}
    curves = {
        "RNL stage 1, v(0)=0": simulate(convert(model), test, **sim),
        "RNL + RIL, v(0)=0": simulate(convert(tuned), test, **sim),
        "RNL + RIL, v(0)=theta/2": simulate(convert(tuned, v0="half"), test, **sim),
    }
    lap("simulate_rnl")
    train_sub = calibration_images(data, prof)
    for label, pct in (("max-norm", 100.0), (f"robust-norm {prof['robust_percentile']:g}%", prof["robust_percentile"])):
        v_th = activation_thresholds(relu, train_sub, percentile=pct, device=device)
        curves[label] = simulate(convert_relu(relu, v_th), test, **sim)
    lap("simulate_baselines")
    timing["total"] = round(time.perf_counter() - t_start, 2)
    engines = {r.engine for r in curves.values()}
    precision = {"training": m1.get("precision", "not recorded"),
                 "simulation": ", ".join(sorted(e.removeprefix("fast-") if e != "reference" else "float32"
                                                for e in engines))}
    if progress:
        print(f"precision: training {precision['training']}, simulation {precision['simulation']}", flush=True)

    result = {
        "profile": profile, "settings": prof, "command": _command(),
        "dataset": data.info, "environment": environment(), "timing_s": timing, "precision": precision,
        "ann_test_acc": ann_acc, "simulated": simulated, "ann_test_acc_simulated": ann_sim,
        "stage1": {"best": m1["best"], "thresholds": m1["thresholds"]},
        "stage2": m2,
        "curves": {label: r.acc for label, r in curves.items()},
        "engines": {label: r.engine for label, r in curves.items()},
        "steps_to": {label: {f"{x:g}": r.steps_to(x) for x in prof["targets"]} for label, r in curves.items()},
        "settles_at": {label: r.settles_at(1.0) for label, r in curves.items()},  # within 1 point of its final accuracy
    }
    write_json(out_dir / "curves.json", result)
    refs = {f"RNL ANN {ann_acc['rnl_stage2']:.2f}%": ann_acc["rnl_stage2"]}
    plot_accuracy_curves(result["curves"], out_dir / "curves.png", references=refs,
                         title=f"{prof['model']} on {prof['dataset']} (test split)")
    return result

