"""How ``fedit data inspect`` and ``fedit partition`` grow with the file: seconds and peak
memory on dolly-like files of 10k, 100k (and 1M) rows, as JSON lines and as one JSON list.

    .venv/bin/python bench/data_scale.py                           # 10k and 100k (~15 min)
    .venv/bin/python bench/data_scale.py --sizes 10000,100000,1000000
    .venv/bin/python bench/data_scale.py --sizes 1000,10000 --model none   # smoke (~1 min)

Rows: each copies the category and the lengths (instruction, context, response, in
characters) of a random row of the databricks-dolly-15k shipped in the package, and fills
them with text cut from dolly at random offsets, numbered so that no two prompts are
equal. Every command runs in its own process (``--child``, which runs the CLI in-process
and reports the seconds after its imports and its peak RSS, ``VmHWM`` from
/proc/self/status: ``ru_maxrss`` would carry the parent's across fork + exec). Baselines:
a bare interpreter, and each command on a 1,000-row file (the fixed cost: imports, the
tokenizer). ``growth`` is a run's peak RSS above that fixed cost, ``growth / file`` that
over the file's size; ratios compare each size with the one before (linear time: the
ratio of the sizes).

``inspect`` runs with the default tokenizer (``--model``; ``none`` skips tokenizing) and
``partition`` with ``--clients 10`` (Dirichlet by category). Prints one JSON line a run
and a summary line; writes bench/results/data_scale.json (``--result``) unless --no-write.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT / "src" / "fedit" / "resources" / "databricks-dolly-15k.jsonl.gz"
RESULT = Path(__file__).parent / "results" / "data_scale.json"
FIELDS = ("instruction", "context", "response")
FIXED_ROWS = 1000  # the fixed-cost runs (partition needs 10 clients x 40 rows)


def _vmhwm_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(argv: list[str]) -> None:
    """Run one fedit command in this process; print seconds and peak RSS as JSON."""
    if argv == ["bare"]:
        print(json.dumps({"vmhwm_mb": _vmhwm_mb()}))
        return
    t0 = time.perf_counter()
    from fedit.cli import app

    t1 = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = app(argv, standalone_mode=False)
    t2 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"import_s": t1 - t0, "work_s": t2 - t1, "vmhwm_mb": _vmhwm_mb(),
                      "cpu_s": usage.ru_utime + usage.ru_stime,
                      "exit": code or 0, "output": out.getvalue().strip().splitlines()[:2]}))


# -- dolly-like rows ----------------------------------------------------------------------------
def dolly_shapes() -> tuple[list[tuple[str, int, int, int]], str]:
    """(category, instruction, context, response lengths) of every dolly row, and all of
    dolly's text as one string to cut rows from."""
    shapes, texts = [], []
    with gzip.open(DOLLY, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            shapes.append((r["category"], *(len(r[k]) for k in FIELDS)))
            texts.append(" ".join(r[k] for k in FIELDS))
    return shapes, " ".join(texts)


def generate(n: int, folder: Path, seed: int = 0) -> dict[str, Path]:
    """``rows_N.jsonl`` and ``rows_N.json`` (the same rows) in ``folder``."""
    rng = random.Random(seed)
    shapes, corpus = dolly_shapes()
    paths = {"jsonl": folder / f"rows_{n}.jsonl", "json": folder / f"rows_{n}.json"}
    with open(paths["jsonl"], "w", encoding="utf-8") as fl, \
            open(paths["json"], "w", encoding="utf-8") as fa:
        fa.write("[\n")
        for i in range(n):
            category, *lengths = rng.choice(shapes)
            row: dict[str, Any] = {}
            for key, length in zip(FIELDS, lengths, strict=True):
                start = rng.randrange(len(corpus) - length)
                row[key] = corpus[start:start + length]
            row["instruction"] = f"{i}. {row['instruction']}"
            row["response"] = row["response"].strip() or "Yes."  # a cut of blanks only
            row["category"] = category
            text = json.dumps(row, ensure_ascii=False)
            fl.write(text + "\n")
            fa.write(("  " if i == 0 else ",\n  ") + text)
        fa.write("\n]\n")
    return paths


# -- runs -----------------------------------------------------------------------------------------
def command(kind: str, path: Path, out: Path, model: str) -> list[str]:
    if kind == "inspect":
        return ["data", "inspect", str(path), "--model", model]
    return ["partition", str(path), "--clients", "10", "--out", str(out)]


def run_child(argv: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True,
                          text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result.get("exit"):
        raise SystemExit(f"{' '.join(argv)}: exit {result['exit']}: {proc.stderr[-2000:]}")
    return {"wall_s": wall, **result}


def measure(sizes: list[int], model: str, work: Path) -> dict[str, Any]:
    bare = run_child(["bare"])["vmhwm_mb"]
    print(json.dumps({"bare_interpreter_mb": bare}), flush=True)
    fixed_files = generate(FIXED_ROWS, work)
    runs: list[dict[str, Any]] = []
    fixed: dict[tuple[str, str], dict[str, float]] = {}
    for n in [FIXED_ROWS, *sizes]:
        files = fixed_files if n == FIXED_ROWS else generate(n, work)
        for fmt, path in files.items():
            for kind in ("inspect", "partition"):
                r = run_child(command(kind, path, work / f"parts_{n}_{fmt}", model))
                mb = path.stat().st_size / 2**20
                if n == FIXED_ROWS:
                    fixed[kind, fmt] = r
                growth = r["vmhwm_mb"] - fixed[kind, fmt]["vmhwm_mb"]
                run = {"rows": n, "format": fmt, "command": kind, "file_mb": round(mb, 1),
                       "wall_s": round(r["wall_s"], 2), "work_s": round(r["work_s"], 2),
                       "cpu_s": round(r["cpu_s"], 2),
                       "cpu_above_fixed_s": round(r["cpu_s"] - fixed[kind, fmt]["cpu_s"], 2),
                       "peak_rss_mb": round(r["vmhwm_mb"], 1),
                       "above_bare_mb": round(r["vmhwm_mb"] - bare, 1),
                       "growth_mb": round(growth, 1),
                       "growth_per_file": round(growth / mb, 3)}
                runs.append(run)
                print(json.dumps(run), flush=True)
        if n != FIXED_ROWS:
            for path in files.values():
                path.unlink()
    return {"model": model, "bare_interpreter_mb": bare, "runs": runs,
            "ratios": ratios(runs, sizes)}


def ratios(runs: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """Each size against the one before: rows, CPU seconds (the machine is shared: wall
    time varies more) and peak RSS, each above the fixed cost (the 1,000-row run)."""
    out = []
    by = {(r["rows"], r["format"], r["command"]): r for r in runs}
    for small, big in zip(sizes, sizes[1:], strict=False):
        for (n, fmt, kind), r in by.items():
            if n != big:
                continue
            s = by[small, fmt, kind]
            out.append({"command": kind, "format": fmt, "sizes": f"{small}->{big}",
                        "rows_x": big / small,
                        "cpu_x": round(r["cpu_above_fixed_s"] / s["cpu_above_fixed_s"], 2),
                        "wall_x": round(r["work_s"] / s["work_s"], 2),
                        "growth_x": round(r["growth_mb"] / max(s["growth_mb"], 1e-9), 2)})
    return out


def table(summary: dict[str, Any]) -> str:
    """The runs as a markdown table (docs/performance.md's "Data at scale")."""
    lines = ["| rows | file | command | file MB | wall s (after imports) | CPU s | peak RSS MB "
             "| above fixed cost MB | / file size |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rows']:,} | {r['format']} | {r['command']} | {r['file_mb']} | "
              f"{r['wall_s']} ({r['work_s']}) | {r['cpu_s']} | {r['peak_rss_mb']} | "
              f"{r['growth_mb']} | "
              f"{r['growth_per_file']} |" for r in summary["runs"]]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[10_000, 100_000], help="rows of each generated file")
    p.add_argument("--model", default="smollm2-135m",
                   help="inspect's tokenizer ('none': no token lengths)")
    p.add_argument("--work", default="", help="folder for the files (default: a temp folder)")
    p.add_argument("--result", type=Path, default=RESULT, help="where the JSON goes")
    p.add_argument("--no-write", action="store_true", help="do not write --result")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work or None) as work:
        summary = measure(args.sizes, args.model, Path(work))
    print(json.dumps({"summary": summary["ratios"]}), flush=True)
    print(table(summary))
    if not args.no_write:
        args.result.parent.mkdir(exist_ok=True)
        args.result.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.result}")


if __name__ == "__main__":
    main()
