"""``moespec report``: an experiment's runs as an HTML page, figures, JSON summaries and a terminal table.

Layout written under ``<experiment>/report/`` (or ``--out``)::

    index.html                    self-contained page: tables inline, figures beside it
    summary.json                  the experiment: each run's stages, statuses, parameters, metrics
    runs/<run>/summary.json       one run
    figures/<stage>-<uid>/*.png   one set per artifact (a shared artifact is drawn once)

Every number comes from an artifact (its cells carry ``data-stage``, ``data-uid``,
``data-dataset`` and ``data-index`` attributes naming where); a stage that did not run or failed is
shown as such, never filled in.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moespec.analysis.loaders import Cell, Figure, Section, Table, format_number, load_section
from moespec.analysis.results import STAGES, Experiment, Run, discover, flat_config, varied_parameters

#: Metrics shown in the terminal table and first in the HTML overview (when a run has them).
HEADLINE_METRICS = ("reduce.variance_retained", "reduce.id_twonn", "fiber.rejection_rate", "fiber.null_rejection_rate",
                    "fiber.fiber_rejection_rate", "fiber.null_fiber_rejection_rate", "fiber.silhouette",
                    "train.val_accuracy", "train.best_val_loss", "ablate.baseline.accuracy", "ablate.baseline.reconstruction",
                    "ablate.nmi_class[0]",
                    "ablate.nmi_domain[0]", "ablate.dead_experts", "lm.val_loss", "lm.val_bits_per_byte",
                    "lm.params_active", "route.router_accuracy.learned", "route.router_accuracy.keyword",
                    "route.gain_recovered.learned", "route.gain_recovered.keyword", "route.gain_recovered.merge")


#: Bumped when a plot changes, so that figures drawn by older code are redrawn.
PLOTS_VERSION = 4


@dataclass
class ReportResult:
    index: Path
    summary: dict[str, Any]
    table: str


# --------------------------------------------------------------------------------------------------
# run metrics (scalars of the stages' summary.json files, never recomputed)


def run_metrics(run: Run) -> dict[str, Any]:
    """Scalar results of a run's completed tasks as ``{"<stage>.<key>": value}``; per-layer lists as ``key[i]``."""
    metrics: dict[str, Any] = {}
    for stage, task in run.tasks.items():
        if task.status != "done":
            continue
        for key, value in task.summary.items():
            if isinstance(value, bool) or value is None:
                continue
            if stage == "ablate" and key == "baseline":
                # accuracy and reconstruction loss are not comparable: the metric joins the name
                key = f"baseline.{task.summary.get('metric', 'metric')}"
            if isinstance(value, (int, float)):
                metrics[f"{stage}.{key}"] = value
            elif isinstance(value, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value.values()):
                metrics.update({f"{stage}.{key}.{k}": v for k, v in value.items()})
            elif isinstance(value, list) and 0 < len(value) <= 16 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                for i, v in enumerate(value):
                    metrics[f"{stage}.{key}[{i}]"] = v
    return metrics


def run_summary(run: Run, varied: list[str]) -> dict[str, Any]:
    config = flat_config(run)
    return {"run": run.name, "points": list(run.points),
            "parameters": {k: config.get(k) for k in varied},
            "stages": {s: {"uid": t.uid, "status": t.status, "artifact": str(t.dir),
                           **({"error": t.error.splitlines()[0]} if t.error else {})} for s, t in run.tasks.items()},
            "metrics": run_metrics(run)}


def stages_of(experiment: Experiment) -> list[str]:
    present = {t.stage for t in experiment.tasks.values()}
    return [s for s in STAGES if s in present]


def headline_table(experiment: Experiment, summaries: list[dict[str, Any]]) -> str:
    """The terminal table: one row per run, its varied parameters, stage statuses and headline metrics."""
    varied = varied_parameters(experiment.runs)
    stages = stages_of(experiment)
    metrics = [m for m in HEADLINE_METRICS if any(m in s["metrics"] for s in summaries)]
    header = ["run", *varied, *[f"{s} (status)" for s in stages], *metrics]
    rows = []
    for run, summary in zip(experiment.runs, summaries):
        statuses = [run.status(s) for s in stages]
        rows.append([summary["run"], *[_short(summary["parameters"].get(k)) for k in varied], *statuses,
                     *[format_number(summary["metrics"][m]) if m in summary["metrics"] else "-" for m in metrics]])
    if len(rows) <= 6:   # few runs, many metrics: one column per run reads better in a terminal
        header, *rows = [list(column) for column in zip(header, *rows)]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------------------
# drawing and HTML


def save_figure(figure: Figure, path: Path) -> None:
    """Draw ``figure`` with its ``plot_*`` function and save it as PNG atomically."""
    from moespec.analysis.plots import new_figure

    fig, ax = new_figure(*figure.size)
    figure.plot(figure.data, ax)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _cell_html(value: Any, tag: str = "td") -> str:
    if isinstance(value, Cell):
        attrs = (f' class="num" data-stage="{value.stage}" data-uid="{value.uid}" '
                 f'data-dataset="{html.escape(value.dataset)}" data-index="{",".join(map(str, value.index))}"')
        return f"<{tag}{attrs}>{html.escape(value.text)}</{tag}>"
    return f"<{tag}>{html.escape(format_number(value))}</{tag}>"


def table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "\n".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return (f"<table><caption>{html.escape(table.title)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>\n{body}\n</tbody></table>{note}")


def _section_html(section: Section, figure_paths: dict[str, str]) -> str:
    task = section.task
    where = f' <span class="uid">{task.stage} {task.uid}</span>' if task else ""
    parts = [f"<h3>{html.escape(section.title)}{where}</h3>"]
    if section.message:
        parts.append(f'<p class="missing">{html.escape(section.message)}</p>')
    parts += [table_html(t) for t in section.tables]
    for figure in section.figures:
        src = figure_paths[f"{task.stage}/{task.uid}/{figure.name}"]
        parts.append(f'<figure><img src="{html.escape(src)}" alt="{html.escape(figure.caption)}">'
                     f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")
    return "\n".join(parts)


_CSS = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#111}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #999;padding:2px 6px;font-size:13px}
td.num{text-align:right;font-family:monospace}caption{text-align:left;font-weight:bold;padding:4px 0}
.missing{background:#eee;border-left:4px solid #000;padding:4px 8px;font-weight:bold}
.note{font-size:12px;color:#444;margin-top:0}.uid{font-size:12px;color:#555;font-family:monospace}
figure{display:inline-block;margin:.5em;vertical-align:top}img{max-width:640px;border:1px solid #ccc}
figcaption{font-size:12px;max-width:640px}.wide{overflow-x:auto}section.run{border-top:2px solid #000;margin-top:2em}"""


def _page(experiment: Experiment, overview: str, runs_html: list[str]) -> str:
    title = html.escape(f"moespec report: {experiment.name}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{title}</h1>\n<p>results: <code>{html.escape(str(experiment.dir))}"
            f"</code>; {len(experiment.runs)} run(s)</p>\n{overview}\n" + "\n".join(runs_html) + "\n</body></html>\n")


def _overview_html(experiment: Experiment, summaries: list[dict[str, Any]]) -> str:
    stages = stages_of(experiment)
    varied = varied_parameters(experiment.runs)
    metrics = [m for m in HEADLINE_METRICS if any(m in s["metrics"] for s in summaries)]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["run", *varied, *stages, *metrics])
    rows = []
    for run, summary in zip(experiment.runs, summaries):
        cells = [f'<td><a href="#{run.name}">{run.name}</a></td>']
        cells += [f"<td>{html.escape(_short(summary['parameters'].get(k)))}</td>" for k in varied]
        cells += [f"<td>{html.escape(run.status(s))}</td>" for s in stages]
        for metric in metrics:
            stage, key = metric.split(".", 1)
            value = summary["metrics"].get(metric)
            cells.append("<td>-</td>" if value is None else
                         f'<td class="num" data-summary="{html.escape(metric)}" data-uid="{run.tasks[stage].uid}">'
                         f"{html.escape(format_number(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<h2>Overview</h2><div class="wide"><table><caption>runs (metrics from each stage\'s summary.json)'
            f"</caption><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>")


# --------------------------------------------------------------------------------------------------
# entry


def _draw_section(section: Section, out: Path, figure_paths: dict[str, str], redraw: bool) -> None:
    """Save the figures of one artifact under ``figures/<stage>-<uid>/``.

    Figures already drawn from the same artifact file (same size and mtime) by the same plotting
    code version are kept, so re-running the report after new sweep points arrive only draws theirs.
    """
    task = section.task
    folder = out / "figures" / f"{task.stage}-{task.uid}"
    stat = task.h5_path.stat() if task.h5_path.exists() else None
    stamp = {"plots_version": PLOTS_VERSION, "artifact_size": stat.st_size if stat else None,
             "artifact_mtime_ns": stat.st_mtime_ns if stat else None,
             "figures": sorted(f.name for f in section.figures)}
    stamp_path = folder / "drawn.json"
    names = [f.name for f in section.figures]
    try:
        fresh = (not redraw and json.loads(stamp_path.read_text()) == stamp
                 and all((folder / f"{n}.png").is_file() for n in names))
    except (OSError, ValueError):
        fresh = False
    for figure in section.figures:
        relative = f"figures/{task.stage}-{task.uid}/{figure.name}.png"
        if not fresh:
            save_figure(figure, out / relative)
        figure_paths[f"{task.stage}/{task.uid}/{figure.name}"] = relative
    if section.figures and not fresh:
        _write_json(stamp_path, stamp)


def write_report(experiment_dir: Path | str, out: Path | str | None = None, *, redraw: bool = False) -> ReportResult:
    """Write the report of an experiment folder; return the path of ``index.html``, the summary and the table.

    ``redraw``: draw every figure again, even those already drawn from the same artifact.
    """
    experiment = discover(experiment_dir)
    if not experiment.tasks:
        from moespec.errors import ArtifactError

        raise ArtifactError(f"{experiment.dir}: no artifacts (expected <root>/<experiment>/<stage>/<uid>/; "
                            f"stages: {', '.join(STAGES)})")
    out = Path(out) if out else experiment.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    varied = varied_parameters(experiment.runs)
    summaries = [run_summary(run, varied) for run in experiment.runs]
    sections: dict[tuple[str, str], Section] = {}
    shown: dict[tuple[str, str], str] = {}
    figure_paths: dict[str, str] = {}
    runs_html = []
    stages = stages_of(experiment)
    for run, summary in zip(experiment.runs, summaries):
        parts = [f'<section class="run" id="{run.name}"><h2>{html.escape(run.name)}</h2>',
                 "<p>parameters: " + html.escape(", ".join(f"{k}={_short(v)}" for k, v in summary["parameters"].items())
                                                 or "(single run)")
                 + (f"; sweep point(s) {', '.join(map(str, run.points))}" if run.points else "") + "</p>"]
        for stage in stages:
            task = run.tasks.get(stage)
            if task is None:
                parts.append(f'<h3>{stage}</h3><p class="missing">{run.status(stage).upper()}: no {stage} artifact '
                             f'{"for this run" if run.linked else "linked to this run (its inputs are not recorded yet)"}</p>')
                continue
            key = (task.stage, task.uid)
            if key in shown:
                # a shared upstream artifact (one reduce for every train point) is shown once
                parts.append(f'<h3>{stage} <span class="uid">{stage} {task.uid}</span></h3><p>shared with '
                             f'<a href="#{stage}-{task.uid}">{shown[key]}</a> (same artifact; status {task.status})</p>')
                continue
            shown[key] = run.name
            parts.append(f'<a id="{stage}-{task.uid}"></a>')
            if key not in sections:
                sections[key] = load_section(task)
                _draw_section(sections[key], out, figure_paths, redraw)
            if stage == "embed" and not sections[key].message:
                parts.append(f'<h3>embed <span class="uid">embed {task.uid}</span></h3><p>'
                             + html.escape(", ".join(f"{k} {format_number(v)}" for k, v in task.summary.items()))
                             + "</p>")
                continue
            parts.append(_section_html(sections[key], figure_paths))
        parts.append("</section>")
        runs_html.append("\n".join(parts))
        _write_json(out / "runs" / run.name / "summary.json", summary)
    experiment_summary = {"experiment": experiment.name, "results": str(experiment.dir), "varied_parameters": varied,
                          "runs": summaries}
    _write_json(out / "summary.json", experiment_summary)
    index = out / "index.html"
    _write_text(index, _page(experiment, _overview_html(experiment, summaries), runs_html))
    return ReportResult(index, experiment_summary, headline_table(experiment, summaries))


def _write_text(path: Path, text: str) -> None:
    from moespec.artifacts import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str, allow_nan=True))
