"""Check the chapters' claims over a family of trained networks: ``make check-claims``.

    python tools/check_claims.py                       # seeds 0-4, default and old-CPU kernels: 10 runs
    python tools/check_claims.py --seeds 3 --kernels old   # one member of the family (what CI runs)

The same seed trains a different network on another CPU (float sums round differently there), so an
assertion a chapter makes about a trained network is a claim about every network that seeds and
machines produce. This tool executes the training chapters (3 to 9) once per setting, a setting being a
seed (``ANNSNN_SEED``, which every chapter's setup reads) and a set of CPU kernels: ``default``, or
``old``, the plainest kernels of MKL, ATen and oneDNN (``OLD_CPU`` in the Makefile), which round as an
older CPU would. In its copy of each chapter every ``assert`` is rewritten to record whether it held
and to go on, so one run reports every assertion, not only the first that fails. It prints, for each
assertion, in how many of the settings it held, and exits 1 if any assertion failed (or was never
reached) in any setting.

Besides the assertions it records the numbers listed in ``OBSERVE`` (the values the teacher page's
answer key speaks about), and ``--write`` stores everything in ``annsnn/stored/claims.json``, from
which ``--teacher`` renders the table of those numbers into ``book/teacher.md`` (it runs nothing; ``--stored
PATH`` reads another summary, and ``--teacher-check`` exits 1 if the page differs from what it would write).

Each setting runs in its own folder under ``--work`` (default ``_build/claims``), with its own
``runs/``, as a separate process; ``--jobs 2`` (the default) runs two at once, each chapter on one CPU
thread (``annsnn.chapter``). A single setting with two jobs executes two of its chapters at a time, in
one folder: chapters that need the same networks wait for the one that trains them (``START_ORDER``).
With the quick profile a setting takes about six minutes on one core (three and a half on two); all ten
settings about an hour on two. ``--reuse-runs`` keeps the networks the previous check trained.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from build_book import execute  # noqa: E402  (the book's own executor: sliced polls, cell timeouts)

CHAPTERS = ["03_fit_curve", "04_rate_norm_layer", "05_stage1", "06_stage2", "07_conversion", "08_spikingjelly",
            "09_beyond"]
# The order in which a setting starts its chapters when it runs several at once: chapter 7 trains all
# three networks (stage 1, the ReLU twin, stage 2) and 9 needs stage 2, so 9 trains stage 2 while 7
# trains the twin; then the longest chapters first, so that the last to finish are short.
START_ORDER = ["07_conversion", "09_beyond", "03_fit_curve", "08_spikingjelly", "06_stage2", "04_rate_norm_layer",
               "05_stage1"]
OLD_CPU = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
STORED = ROOT / "annsnn" / "stored" / "claims.json"
TEACHER = ROOT / "book" / "teacher.md"

# The numbers the teacher page's answer key speaks about: per chapter, name -> (what it is, an expression
# evaluated in the chapter's namespace after its last cell). Each must give a number (or None).
from observe import OBSERVE  # noqa: E402  (tools/observe.py)


def _lambda(body: ast.expr) -> ast.Lambda:
    return ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]), body=body)


class _RecordAsserts(ast.NodeTransformer):
    """``assert test, msg`` -> ``__claim__(id, test, lambda: msg, {name: lambda: name, ...})``: record the
    outcome, and the values of the names the test reads (to see by how much it held or failed), and go on."""

    def __init__(self, chapter: str, cell: int):
        self.chapter, self.cell = chapter, cell

    def visit_Assert(self, node: ast.Assert):
        claim_id = f"{self.chapter} cell {self.cell} line {node.lineno}: {ast.unparse(node.test)}"
        message = _lambda(node.msg if node.msg is not None else ast.Constant(None))
        names = sorted({n.id for n in ast.walk(node.test) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)})
        values = ast.Dict(keys=[ast.Constant(n) for n in names], values=[_lambda(ast.Name(n, ast.Load())) for n in names])
        call = ast.Call(func=ast.Name("__claim__", ast.Load()),
                        args=[ast.Constant(claim_id), node.test, message, values], keywords=[])
        return ast.copy_location(ast.Expr(call), node)


def _recorder_cell(path: Path) -> str:
    return f'''import json as _claims_json

def _claims_plain(value, depth=0):
    """A number, a short string, or a small dict or list of them; None for anything else."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value[:80]
    if getattr(value, "ndim", None) == 0 or (hasattr(value, "numel") and value.numel() == 1):
        return value.item()
    if depth == 0 and isinstance(value, (dict, list, tuple)) and len(value) <= 16:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        plain = {{str(k): _claims_plain(v, 1) for k, v in items}}
        return plain if all(v is not None for v in plain.values()) else None
    return None

def __claim__(claim_id, held, message, values):
    """Record one evaluation of an assertion (the chapter goes on either way)."""
    held = bool(held)
    entry = {{"id": claim_id, "held": held, "values": {{}}}}
    for name, get in values.items():
        try:
            plain = _claims_plain(get())
        except Exception:
            plain = None
        if plain is not None:
            entry["values"][name] = plain
    if not held:
        try:
            entry["message"] = str(message())
        except Exception as err:
            entry["message"] = f"(the message itself raised {{type(err).__name__}})"
        print("CLAIM FAILED:", claim_id, "|", entry["message"])
    with open({str(path)!r}, "a") as f:
        f.write(_claims_json.dumps(entry) + "\\n")
'''


def _observer_cell(chapter: str, path: Path) -> str:
    exprs = {name: expr for name, (_, expr) in OBSERVE.get(chapter, {}).items()}
    return f'''def _observe(exprs={exprs!r}):
    out = {{}}
    for name, expr in exprs.items():
        try:
            value = eval(expr)
            out[name] = None if value is None else float(value)
        except Exception as err:
            out[name] = f"error: {{type(err).__name__}}: {{err}}"
    with open({str(path)!r}, "a") as f:
        f.write(_claims_json.dumps({{"chapter": {chapter!r}, "observed": out}}) + "\\n")
_observe()
'''


def rewrite(nb, chapter: str, record: Path):
    """A copy of the notebook whose asserts record instead of raising, with the recorder cell first."""
    from IPython.core.inputtransformer2 import TransformerManager

    magic = TransformerManager()
    nb = nbformat.reads(nbformat.writes(nb), as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "assert" not in cell.source:
            continue
        tree = ast.parse(magic.transform_cell(cell.source))
        cell.source = ast.unparse(ast.fix_missing_locations(_RecordAsserts(chapter, i).visit(tree)))
    nb.cells.insert(0, nbformat.v4.new_code_cell(_recorder_cell(record)))
    nb.cells.append(nbformat.v4.new_code_cell(_observer_cell(chapter, record)))
    return nb


def assertion_ids(chapters: list[str] = CHAPTERS) -> set[str]:
    """The id of every assert in the chapters as they are now (what a check records for each)."""
    ids = set()
    for chapter in chapters:
        record = Path("/dev/null")
        nb = rewrite(nbformat.read(ROOT / "book" / f"{chapter}.ipynb", as_version=4), chapter, record)
        for cell in nb.cells[1:-1]:
            if cell.cell_type == "code" and "__claim__(" in cell.source:
                ids |= {ast.literal_eval(node.args[0]) for node in ast.walk(ast.parse(cell.source))
                        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__claim__"}
    return ids


def setting_name(seed: int, kernels: str) -> str:
    return f"seed{seed}-{kernels}"


def run_setting(seed: int, kernels: str, chapters: list[str], work: Path, reuse: bool = False, jobs: int = 1) -> dict:
    """Execute the chapters in a fresh folder with this seed and these kernels (in this process), ``jobs``
    chapters at a time (chapters that need the same networks wait for the one that trains them).

    With ``reuse``, the networks an earlier check trained in that folder (its ``runs/``) are kept; the
    chapters then load them instead of training them again (the same networks, if the training code and
    the machine have not changed)."""
    folder = work / setting_name(seed, kernels)
    kept = work / f".runs-{folder.name}"
    if kept.exists():
        shutil.rmtree(kept)
    if reuse and (folder / "runs").exists():
        shutil.move(folder / "runs", kept)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(ROOT / "book", folder, ignore=shutil.ignore_patterns("runs", ".ipynb_checkpoints"))
    if kept.exists():
        shutil.move(kept, folder / "runs")
    record = folder / "claims.jsonl"
    os.environ.update({"ANNSNN_SEED": str(seed), "ANNSNN_DEMOS": "frames"})
    if kernels == "old":
        os.environ.update(OLD_CPU)
    outcome = {"seed": seed, "kernels": kernels, "chapters": {}}

    def one(chapter: str) -> None:   # every kernel appends its records to the same file, a line at a time
        path = folder / f"{chapter}.ipynb"
        nbformat.write(rewrite(nbformat.read(path, as_version=4), chapter, record), path)
        t0 = time.monotonic()
        try:
            nbformat.write(execute(path), folder / f"{chapter}.executed.ipynb")   # to read what it printed
            outcome["chapters"][chapter] = {"seconds": round(time.monotonic() - t0, 1)}
        except RuntimeError as err:
            outcome["chapters"][chapter] = {"seconds": round(time.monotonic() - t0, 1), "error": str(err)[:2000]}
        print(f"{folder.name}: {chapter} {outcome['chapters'][chapter]}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, sorted(chapters, key=lambda c: START_ORDER.index(c) if c in START_ORDER else 99)))
    outcome["chapters"] = {c: outcome["chapters"][c] for c in chapters}   # in book order
    claims, observed = {}, {}
    for line in record.read_text().splitlines() if record.exists() else []:
        entry = json.loads(line)
        if "observed" in entry:
            observed.update({f"{entry['chapter']}.{k}": v for k, v in entry["observed"].items()})
            continue
        seen = claims.setdefault(entry["id"], {"held": True, "evaluations": 0})
        seen["evaluations"] += 1
        if seen["held"]:   # the values of the last evaluation, or of the first that failed
            seen["values"] = entry.get("values", {})
        if not entry["held"]:
            seen["held"] = False
            seen.setdefault("message", entry.get("message"))
    outcome["claims"], outcome["observed"] = claims, observed
    (folder / "outcome.json").write_text(json.dumps(outcome, indent=1))
    return outcome


def summarize(outcomes: list[dict]) -> dict:
    """Per assertion: in how many settings it held, and in which it failed or was not reached."""
    names = [setting_name(o["seed"], o["kernels"]) for o in outcomes]
    ids = sorted({i for o in outcomes for i in o["claims"]}, key=lambda s: (s.split(" ")[0], _cell_line(s)))
    claims = {}
    for claim_id in ids:
        held = [n for n, o in zip(names, outcomes) if o["claims"].get(claim_id, {}).get("held")]
        failed = {n: o["claims"][claim_id].get("message") for n, o in zip(names, outcomes)
                  if claim_id in o["claims"] and not o["claims"][claim_id]["held"]}
        missing = [n for n, o in zip(names, outcomes) if claim_id not in o["claims"]]
        values = {n: o["claims"][claim_id].get("values") for n, o in zip(names, outcomes) if claim_id in o["claims"]}
        claims[claim_id] = {"held": len(held), "of": len(outcomes), "failed": failed, "not_reached": missing,
                            "values": values}
    errors = {f"{n} {ch}": r["error"] for n, o in zip(names, outcomes) for ch, r in o["chapters"].items() if "error" in r}
    observed = {}
    for key in sorted({k for o in outcomes for k in o["observed"]}):
        values = [o["observed"].get(key) for o in outcomes]
        observed[key] = dict(zip(names, values))
    return {"settings": names, "claims": claims, "chapter_errors": errors, "observed": observed,
            "seconds": {n: sum(r["seconds"] for r in o["chapters"].values()) for n, o in zip(names, outcomes)}}


def _cell_line(claim_id: str) -> tuple[int, int]:
    words = claim_id.split(" ")
    return int(words[2]), int(words[4].rstrip(":"))


def report(summary: dict) -> int:
    """Print one line per assertion; return the number of assertions that did not hold everywhere."""
    bad = 0
    n = len(summary["settings"])
    for claim_id, c in summary["claims"].items():
        ok = c["held"] == n
        bad += not ok
        print(f"{'  ' if ok else '!!'} {c['held']:2d} of {n}  {claim_id[:150]}")
        for setting, message in c["failed"].items():
            print(f"        failed in {setting}: {message} {json.dumps(c['values'].get(setting))[:300]}")
        if c["not_reached"]:
            print(f"        not reached in {', '.join(c['not_reached'])}")
    for where, error in summary["chapter_errors"].items():
        print(f"!! chapter error in {where}: {error.splitlines()[0][:300]}")
    print(f"{len(summary['claims']) - bad} of {len(summary['claims'])} assertions held in all {n} settings; "
          f"{len(summary['chapter_errors'])} chapter errors")
    return bad + len(summary["chapter_errors"])


# --- The teacher page's table of observed numbers (``--teacher``): reads the stored summary, runs nothing ---

TEACHER_START = ("<!-- observed: generated by tools/check_claims.py --teacher from annsnn/stored/claims.json; "
                 "do not edit by hand -->")
TEACHER_END = "<!-- /observed -->"


def _number(v: float) -> str:
    """A value for the table: whole numbers as such, others to three significant digits, minus as U+2212."""
    text = str(int(v)) if float(v).is_integer() else f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return text.replace("-", "\u2212")


def _cell(values: list) -> tuple[str, str]:
    """(median and range, how many settings gave None and how many no number) for one entry's values."""
    numbers = sorted(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
    never = sum(v is None for v in values)
    missing = len(values) - len(numbers) - never
    if not numbers:
        shown = "never" if never else "not measured"
    elif numbers[0] == numbers[-1]:
        shown = _number(numbers[0])
    else:
        dash = " to " if numbers[0] < 0 else "\u2013"
        shown = f"{_number(statistics.median(numbers))} ({_number(numbers[0])}{dash}{_number(numbers[-1])})"
    count = str(never) + (f"; {missing} not measured" if missing else "")
    return shown, count


def _settings_line(summary: dict) -> str:
    """One line of provenance: the settings, the machine and date, the command."""
    seeds, kernels = [], []
    for name in summary["settings"]:
        seed, _, kernel = name.partition("-")
        seed = int(seed.removeprefix("seed"))
        seeds += [seed] if seed not in seeds else []
        kernels += [kernel] if kernel not in kernels else []
    seeds.sort()
    consecutive = len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1))
    seed_text = f"{seeds[0]}\u2013{seeds[-1]}" if consecutive else ", ".join(map(str, seeds))
    kernel_text = " and ".join({"default": "default", "old": "old-CPU"}.get(k, k) for k in kernels)
    env = summary.get("environment", {})
    machine = env.get("cpu") or "an unrecorded CPU"
    if env.get("cores"):
        machine += f", {env['cores']} cores"
    date = str(env.get("date", "an unrecorded date"))[:10]
    versions = f", torch {env['torch']}" if env.get("torch") else ""
    n = len(summary["settings"])
    return (f"Over {n} network{'s' * (n != 1)}: seed{'s' * (len(seeds) != 1)} {seed_text}, {kernel_text} "
            f"kernel{'s' * (len(kernels) != 1)}; made on {date} on {machine}{versions}, with "
            f"`{summary.get('command', 'python tools/check_claims.py')}`.")


def teacher_block(summary: dict) -> str:
    """The Markdown between the markers: one row per ``OBSERVE`` entry, then the provenance."""
    settings = summary["settings"]
    observed = summary.get("observed", {})
    rows = ["| chapter | name | what it is | median (range) | never |", "|---|---|---|---|---|"]
    for chapter, entries in OBSERVE.items():
        number = chapter.split("_")[0].lstrip("0")
        for name, (what, _) in entries.items():
            values = observed.get(f"{chapter}.{name}", {})
            shown, count = _cell([values.get(s, "missing") for s in settings])
            rows.append(f"| {number} | `{name}` | {what} | {shown} | {count} |")
    return "\n".join(rows) + "\n\n" + _settings_line(summary)


def with_teacher_block(page: str, block: str) -> str:
    """``page`` with ``block`` between the markers (ValueError if they are missing)."""
    start, end = page.find(TEACHER_START), page.find(TEACHER_END)
    if start < 0 or end < start:
        raise ValueError(f"{_shown(TEACHER)} has no {TEACHER_START!r} ... {TEACHER_END!r} markers")
    return page[:start + len(TEACHER_START)] + "\n" + block + "\n" + page[end:]


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def teacher(stored: Path, check: bool) -> int:
    """Write (or, with ``check``, compare) the table in ``book/teacher.md`` from the stored summary."""
    if not stored.exists():
        print(f"check_claims: {_shown(stored)} does not exist yet; make it with `make check-claims CLAIMS=--write` "
              f"(python tools/check_claims.py --write), then run --teacher", file=sys.stderr)
        return 2
    page = TEACHER.read_text()
    try:
        new = with_teacher_block(page, teacher_block(json.loads(stored.read_text())))
    except ValueError as err:
        print(f"check_claims: {err}", file=sys.stderr)
        return 2
    if check:
        if new != page:
            again = "" if stored.resolve() == STORED else f" --stored {_shown(stored)}"
            print(f"check_claims: the observed table in {_shown(TEACHER)} differs from {_shown(stored)}; "
                  f"run python tools/check_claims.py --teacher{again}", file=sys.stderr)
            return 1
        return 0
    if new != page:
        TEACHER.write_text(new)
    print(f"check_claims: wrote the table of observed numbers from {_shown(stored)} into {_shown(TEACHER)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--kernels", nargs="+", choices=("default", "old"), default=["default", "old"])
    parser.add_argument("--chapters", nargs="+", default=CHAPTERS, help="chapter names, e.g. 06_stage2")
    parser.add_argument("--jobs", type=int, default=2,
                        help="chapters executed at once, over all settings (one CPU thread each)")
    parser.add_argument("--work", type=Path, default=ROOT / "_build" / "claims")
    parser.add_argument("--write", action="store_true", help=f"store the summary in {STORED.relative_to(ROOT)}")
    parser.add_argument("--teacher", action="store_true",
                        help=f"run nothing: write the table of observed numbers into {TEACHER.relative_to(ROOT)} "
                             f"from the stored summary")
    parser.add_argument("--teacher-check", action="store_true",
                        help=f"run nothing: exit 1 if {TEACHER.relative_to(ROOT)} differs from what --teacher writes")
    parser.add_argument("--stored", type=Path, default=STORED,
                        help=f"the summary --teacher reads (default {STORED.relative_to(ROOT)})")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="keep the networks the last check trained in each setting's folder (faster; the same "
                             "networks as long as the training code and the machine are the same)")
    parser.add_argument("--one", nargs=2, metavar=("SEED", "KERNELS"), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--chapter-jobs", type=int, default=1, help=argparse.SUPPRESS)  # the child's chapters at once
    args = parser.parse_args(argv)
    if args.teacher or args.teacher_check:
        return teacher(args.stored, check=args.teacher_check)
    unknown = [c for c in args.chapters if not (ROOT / "book" / f"{c}.ipynb").exists()]
    if unknown:
        print(f"check_claims: no chapter book/{unknown[0]}.ipynb; name chapters like 06_stage2", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"check_claims: --jobs {args.jobs} is not a number of chapters; give 1 or more", file=sys.stderr)
        return 2
    if args.one:
        run_setting(int(args.one[0]), args.one[1], args.chapters, args.work, args.reuse_runs, args.chapter_jobs)
        return 0

    settings = [(s, k) for k in args.kernels for s in args.seeds]
    start = time.monotonic()
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"   # what the settings are about to run

    # One process per setting, up to --jobs settings at once; with fewer settings than jobs, each setting
    # executes several of its chapters at once (one setting and two jobs: two chapters at a time).
    at_once = min(args.jobs, len(settings))
    chapter_jobs = max(1, args.jobs // len(settings))

    def child(setting):
        seed, kernels = setting
        command = [sys.executable, __file__, "--one", str(seed), kernels, "--work", str(args.work),
                   "--chapters", *args.chapters, "--chapter-jobs", str(chapter_jobs)] + \
                  (["--reuse-runs"] if args.reuse_runs else [])
        subprocess.run(command, check=False)
        path = args.work / setting_name(seed, kernels) / "outcome.json"
        if not path.exists():
            return {"seed": seed, "kernels": kernels, "claims": {}, "observed": {},
                    "chapters": {"(all)": {"seconds": 0, "error": "the process wrote no outcome"}}}
        return json.loads(path.read_text())

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        outcomes = list(pool.map(child, settings))
    summary = summarize(outcomes)
    summary["command"] = "python tools/check_claims.py " + " ".join(argv if argv is not None else sys.argv[1:])
    bad = report(summary)
    print(f"check_claims: {len(settings)} settings in {time.monotonic() - start:.0f} s, {at_once} at a time, "
          f"{chapter_jobs} chapter{'s' * (chapter_jobs > 1)} of each at a time")
    if args.write:
        sys.path.insert(0, str(ROOT))
        from annsnn.pipeline import environment
        summary["environment"] = environment()
        summary["commit"] = commit
        STORED.parent.mkdir(parents=True, exist_ok=True)
        STORED.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {STORED.relative_to(ROOT)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
