"""``moespec report`` and ``moespec compare``: thin shims over :mod:`moespec.analysis.report` and
:mod:`moespec.analysis.compare` (registered by :mod:`moespec.cli`; imports neither torch nor
matplotlib until a command runs)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from moespec.errors import MoespecError


def _need_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise MoespecError("figures need matplotlib: pip install 'moespec[analysis]'")


def cmd_report(args: argparse.Namespace) -> int:
    from moespec.analysis.report import write_report

    _need_matplotlib()
    _say_progress("moespec.report")
    print(
        f"report of {args.experiment}: reading artifacts and drawing figures"
        + (" (all of them again)" if args.redraw else ""),
        flush=True,
    )
    result = write_report(Path(args.experiment), args.out, redraw=args.redraw)
    print(result.table)
    problems = _task_errors(result.summary)
    if problems:
        print("\ntasks without a usable artifact:\n" + "\n".join(f"  {line}" for line in problems))
    print(f"\nreport: {result.index.resolve()}")
    return 0


def _task_errors(summary: dict) -> list[str]:
    """``<stage> <uid>: <error>`` for each task of the report that has an error (once per task)."""
    errors: dict[tuple[str, str], str] = {}
    for run in summary.get("runs", []):
        for stage, task in run.get("stages", {}).items():
            if task.get("error"):
                errors.setdefault((stage, task.get("uid", "?")), task["error"])
    return [f"{stage} {uid}: {error}" for (stage, uid), error in errors.items()]


def _say_progress(logger_name: str) -> None:
    """Show a command's progress records (one line per artifact) on stdout as they come."""
    logger = logging.getLogger(logger_name)
    for old in [h for h in logger.handlers if getattr(h, "_moespec_progress", False)]:
        logger.removeHandler(old)  # from an earlier command in this process: its stdout may be gone
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    handler._moespec_progress = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def cmd_compare(args: argparse.Namespace) -> int:
    from moespec.analysis.compare import compare, correlation_figure_reason, format_comparison, write_comparison

    _need_matplotlib()
    higher = {"higher": True, "lower": False, None: None}[args.better]
    comparison = compare(
        [Path(p) for p in args.experiments], sort_by=args.sort_by, baseline=args.baseline, higher_is_better=higher
    )
    print(format_comparison(comparison))
    out = Path(args.out) if args.out else Path(args.experiments[0]) / "compare"
    written = write_comparison(comparison, out)
    reason = correlation_figure_reason(comparison)
    if reason:
        print(f"\nno correlation figure: {reason}")
    print("\n" + "\n".join(f"{kind}: {path.resolve()}" for kind, path in written.items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report`` and ``compare`` to the ``moespec`` command line."""
    p = subparsers.add_parser("report", help="HTML report, figures and summaries of an experiment's results")
    p.add_argument("experiment", help="experiment folder: <root>/<experiment> (e.g. results/demo)")
    p.add_argument("--out", help="report folder (default: <experiment>/report)")
    p.add_argument(
        "--redraw",
        action="store_true",
        help="draw every figure again (default: keep figures already drawn from the same artifact)",
    )
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("compare", help="rank the runs of one sweep, or of several experiments, by a metric")
    p.add_argument("experiments", nargs="+", help="experiment folders (one sweep, or several to compare)")
    p.add_argument(
        "--sort-by",
        metavar="METRIC",
        help="metric as <stage>.<summary key>, e.g. train.val_accuracy, ablate.nmi_class[0] "
        "(default: train.val_accuracy, else ablate.baseline.accuracy, ...)",
    )
    p.add_argument(
        "--baseline",
        metavar="RUN",
        help="run to measure improvement against (name, prefix or 1-based position; default: the first run)",
    )
    p.add_argument(
        "--better",
        choices=["higher", "lower"],
        help="direction of the metric (default: lower for losses, null and dead counts; else higher)",
    )
    p.add_argument("--out", help="folder for compare.csv, compare.json, correlation.png (default: <first>/compare)")
    p.set_defaults(func=cmd_compare)
