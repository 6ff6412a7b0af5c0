"""Stored runs of ``annsnn reproduce`` that the book shows beside its live runs (``annsnn/stored/<profile>/``).

Chapters 5, 6, 7 and 9 train the ``quick`` profile live, in a minute on a CPU, and show next to it the
stored CIFAR-10 runs: the ``medium`` profile, made on two CPU cores, and the paper-size ``full`` profile
when a GPU run is stored. A stored file is ``curves.json`` exactly as ``reproduce`` wrote it, with the
command, machine, date and data copy that made it; :func:`provenance` turns those into the line that
stands beside every number a chapter quotes from it. The files are package data of ``annsnn``, so a
chapter opened alone (on Colab, after its install cell) finds them wherever the package is installed.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

STORED = Path(__file__).resolve().parent / "stored"   # installed with the package (pyproject.toml)

HOW_TO_MAKE = {
    "medium": "`annsnn reproduce --profile medium --data-root DIR --out runs/medium` (about 45 minutes on two CPU "
              "cores, minutes on a GPU)",
    "full": "`annsnn reproduce --profile full --data-root DIR --out runs/full` on a GPU",
}


def load(profile: str, root: str | Path = STORED) -> dict | None:
    """The stored ``curves.json`` of ``profile`` under ``root`` (the package's ``stored/``), or None."""
    path = Path(root) / profile / "curves.json"
    return json.loads(path.read_text()) if path.exists() else None


def available(root: str | Path = STORED, profiles=("medium", "full")) -> dict[str, dict]:
    """The stored results of ``profiles`` found under ``root``, by profile name, in that order."""
    found = {name: load(name, root) for name in profiles}
    return {name: result for name, result in found.items() if result is not None}


def not_stored(stored: dict[str, dict], profiles=("medium", "full")) -> str:
    """Markdown naming the profiles without a stored result and how to make one ("" when all are there)."""
    return "\n\n".join(missing(name) for name in profiles if name not in stored)


def missing(profile: str) -> str:
    """What to run to store a result for ``profile`` (Markdown)."""
    return (f"No `{profile}` result is stored with this book. Run {HOW_TO_MAKE.get(profile, 'annsnn reproduce')} "
            f"with CIFAR-10 under `DIR`, then copy `curves.json` and `curves.png` to `annsnn/stored/{profile}/`; "
            "`annsnn/stored/README.md` explains the steps.")


def simulated_images(result: dict) -> int:
    """How many test images the stored curves were simulated on."""
    return result.get("simulated", {}).get("images", result["dataset"]["test"])


def provenance(result: dict) -> str:
    """One line (Markdown) saying what made a stored result: command, machine, date, data, images simulated."""
    env, data = result["environment"], result["dataset"]
    machine = env["device"] if env.get("device", "cpu") != "cpu" else f"{env.get('cpu', 'a CPU')}, {env.get('cores', '?')} cores"
    n_sim, n_test = simulated_images(result), data["test"]
    sim = (f"all {n_test} test images" if n_sim == n_test else
           f"{n_sim} of the {n_test} test images, every class equally represented")
    precision = result.get("precision", {})
    prec = (f"; training in {precision['training']}, simulation in {precision['simulation']}"
            if precision else "")
    return (f"Stored `{result['profile']}` run: `{result['settings']['model']}` on {data['name']} "
            f"({data.get('note') or data.get('source', '')}), {data['train']} training and {data['val']} validation "
            f"images, simulated on {sim}; made on {env['date'][:10]} with {machine}, torch {env['torch']}{prec}, "
            f"by `{result['command']}` (how long each stage took: `annsnn/stored/README.md`).")


def steps_table(result: dict, labels=None) -> str:
    """HTML table: steps to each target and the settling step, for the stored curves named in ``labels``."""
    T = result["settings"]["T"]
    never = f"&gt; {T}"
    labels = list(labels) if labels is not None else list(result["steps_to"])
    targets = list(result["steps_to"][labels[0]])
    head = "".join(f"<th>steps to {x}%</th>" for x in targets)
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td>"
        + "".join(f"<td>{v if v is not None else never}</td>" for v in result["steps_to"][label].values())
        + f"<td>{result['settles_at'][label] or never}</td>"
        + f"<td>{result['curves'][label][-1]:.2f}%</td></tr>"
        for label in labels)
    return (f"<table><tr><th>conversion</th>{head}<th>settles at (within 1 point of its accuracy at T = {T})</th>"
            f"<th>accuracy at T = {T}</th></tr>{rows}</table>")


def plot_curves(result: dict, labels=None, ax=None):
    """The stored accuracy curves against t, with the RNL network's own accuracy after stage 2 on the same
    images dashed."""
    import matplotlib.pyplot as plt

    from .plots import PAGE_WIDTH_IN, plot_accuracy_curves

    if ax is None:
        _, ax = plt.subplots(figsize=(PAGE_WIDTH_IN, 5.2))
    labels = list(labels) if labels is not None else list(result["curves"])
    ann = result.get("ann_test_acc_simulated", result["ann_test_acc"])["rnl_stage2"]
    data = result["dataset"]["name"]
    plot_accuracy_curves({label: result["curves"][label] for label in labels}, ax=ax, references={"": ann},
                         title=f"{result['settings']['model']} on {data}, stored {result['profile']} run, "
                               f"{simulated_images(result)} test images\n(dashed: the RNL ANN after stage 2, {ann:.1f}%)")
    return ax
