"""``--experiment all``: every experiment in turn, whatever happens to the others.

Each experiment's outcome is one row: ``completed``/``solved`` (its summary's status), ``kept``
(hyperscale's earlier result, on ``--resume``), ``failed`` (with the one-line reason; a bug's
traceback is printed too), ``interrupted`` (Ctrl-C/SIGTERM, which also stops the suite) or
``not run`` (after an interruption). The rows are printed as a table and written to
``<out>/summary.json``; the exit status is 130 after an interruption, 1 if any failed, else 0.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from .checkpoint import atomic_write_text
from .errors import InputError
from .outdir import held_run
from .runner import Interrupted

__all__ = ["check_suite_out", "format_table", "run_all"]


def check_suite_out(out: Path) -> None:
    """``out`` may take the suite's ``summary.json``: it holds no single experiment's run."""
    held = held_run(out) if out.is_dir() else None
    if held and held["experiment"] != "all":
        raise InputError(f"{out} holds a single run ({', '.join(held['files'])}); --experiment all writes "
                         f"{out}/summary.json and {out}/<experiment>/: choose another --out")


def _row(plan, status: str, detail: str = "") -> dict:
    return {"experiment": plan.name, "status": status, "out": str(plan.out), "detail": detail}


def _result(summary: dict) -> str:
    if summary.get("status") == "kept":
        return "earlier result kept"
    if "rows" in summary:  # hyperscale
        return f"{len(summary['rows'])} sizes measured"
    metric = summary.get("final_metric")
    shown = f"{metric:.4g}" if isinstance(metric, float) else metric
    return f"{summary.get('steps')} steps, {summary.get('metric_name')} {shown}"


def _run_one(plan, run, debug: bool) -> dict:
    try:
        summary = run(plan)
    except InputError as e:
        if debug:
            traceback.print_exception(e)
        return _row(plan, "failed", " ".join(str(e).split()))
    except Interrupted as e:
        return _row(plan, "interrupted", str(e))
    except KeyboardInterrupt:
        return _row(plan, "interrupted", "interrupted (the last checkpoint, if any, is as it was)")
    except Exception as e:  # a bug: keep its traceback, run the other experiments
        traceback.print_exception(e)
        return _row(plan, "failed", f"{type(e).__name__}: {' '.join(str(e).split())}")
    return _row(plan, summary.get("status", "completed"), _result(summary))


def format_table(rows: list[dict]) -> str:
    columns = ("experiment", "status", "out", "detail")
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns[:-1]]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)) + "  detail"]
    lines += ["  ".join(r[c].ljust(w) for c, w in zip(columns, widths)) + "  " + r["detail"] for r in rows]
    return "\n".join(lines)


def run_all(plans: list, run, out: Path, debug: bool = False) -> int:
    """``run(plan)`` for each plan; the table, ``out/summary.json`` and the exit status."""
    rows = []
    for plan in plans:
        if any(r["status"] == "interrupted" for r in rows):
            rows.append(_row(plan, "not run", "the suite was interrupted"))
            continue
        rows.append(_run_one(plan, run, debug))
    print(format_table(rows))
    statuses = [r["status"] for r in rows]
    failed = [r["experiment"] for r in rows if r["status"] == "failed"]
    summary = {"experiment": "all", "status": "interrupted" if "interrupted" in statuses else
               "failed" if failed else "completed", "failed": failed, "experiments": rows}
    atomic_write_text(json.dumps(summary, indent=2) + "\n", Path(out) / "summary.json")
    for row in rows:
        if row["status"] in ("failed", "interrupted"):
            print(f"eggroll: {row['experiment']} {row['status']}: {row['detail']}", file=sys.stderr)
    return 130 if "interrupted" in statuses else 1 if failed else 0
