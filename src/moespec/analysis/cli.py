"""``moespec report`` and ``moespec compare``: thin shims over :mod:`moespec.analysis.report` and
:mod:`moespec.analysis.compare` (registered by :mod:`moespec.cli`; imports neither torch nor
matplotlib until a command runs)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from moespec.errors import MoespecError


def _need_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise MoespecError("figures need matplotlib: pip install 'moespec[analysis]'")


def cmd_report(args: argparse.Namespace) -> int:
    from moespec.analysis.report import write_report

    _need_matplotlib()
    result = write_report(Path(args.experiment), args.out, redraw=args.redraw)
    print(result.table)
    print(f"\nreport: {result.index.resolve()}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from moespec.analysis.compare import compare, correlation_figure_reason, format_comparison, write_comparison

    _need_matplotlib()
    higher = {"higher": True, "lower": False, None: None}[args.better]
    comparison = compare([Path(p) for p in args.experiments], sort_by=args.sort_by, baseline=args.baseline,
                         higher_is_better=higher)
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
    p.add_argument("--redraw", action="store_true",
                   help="draw every figure again (default: keep figures already drawn from the same artifact)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("compare", help="rank the runs of one sweep, or of several experiments, by a metric")
    p.add_argument("experiments", nargs="+", help="experiment folders (one sweep, or several to compare)")
    p.add_argument("--sort-by", metavar="METRIC",
                   help="metric as <stage>.<summary key>, e.g. train.val_accuracy, ablate.nmi_class[0] "
                        "(default: train.val_accuracy, else ablate.baseline.accuracy, ...)")
    p.add_argument("--baseline", metavar="RUN", help="run to measure improvement against (name, prefix or "
                                                      "1-based position; default: the first run)")
    p.add_argument("--better", choices=["higher", "lower"],
                   help="direction of the metric (default: lower for losses, null and dead counts; else higher)")
    p.add_argument("--out", help="folder for compare.csv, compare.json, correlation.png (default: <first>/compare)")
    p.set_defaults(func=cmd_compare)
