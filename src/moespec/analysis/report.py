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
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moespec.analysis.glossary import GLOSSARY, metric_label
from moespec.analysis.loaders import Cell, Figure, Section, Table, format_number, load_section
from moespec.analysis.results import FINISHED, STAGES, Experiment, Run, discover, flat_config, varied_parameters

#: Metrics shown in the terminal table and first in the HTML overview (when a run has them).
HEADLINE_METRICS = (
    "reduce.variance_retained",
    "reduce.id_pca_count",
    "reduce.id_twonn",
    "reduce.id_mle_levina_bickel",
    "fiber.rejection_rate",
    "fiber.null_rejection_rate",
    "fiber.fiber_rejection_rate",
    "fiber.null_fiber_rejection_rate",
    "fiber.silhouette",
    "train.val_accuracy",
    "train.best_val_loss",
    "ablate.baseline.accuracy",
    "ablate.baseline.reconstruction",
    "ablate.nmi_class[0]",
    "ablate.nmi_domain[0]",
    "ablate.load_cv[0]",
    "ablate.dead_experts",
    "train.dense_val_accuracy",
    "lm.val_loss",
    "lm.val_bits_per_byte",
    "lm.params_active",
    "route.router_accuracy.learned",
    "route.router_accuracy.keyword",
    "route.gain_recovered.learned",
    "route.gain_recovered.keyword",
    "route.gain_recovered.merge",
)


#: Bumped when a plot changes, so that figures drawn by older code are redrawn.
PLOTS_VERSION = 5
#: Up to this many runs the overview has one column per run (metrics down the side); more runs
#: get one row each. Either way the table fits the page's width without sideways scrolling.
RUNS_AS_COLUMNS = 6


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
        if task.status not in FINISHED:  # a summary pulled without its HDF5 file still counts
            continue
        for key, value in task.summary.items():
            if isinstance(value, bool) or value is None:
                continue
            if stage == "ablate" and key == "baseline":
                # accuracy and reconstruction loss are not comparable: the metric joins the name
                key = f"baseline.{task.summary.get('metric', 'metric')}"
            if isinstance(value, (int, float)):
                metrics[f"{stage}.{key}"] = value
            elif isinstance(value, dict) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
            ):
                metrics.update({f"{stage}.{key}.{k}": v for k, v in value.items()})
            elif (
                isinstance(value, list)
                and 0 < len(value) <= 16
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                for i, v in enumerate(value):
                    metrics[f"{stage}.{key}[{i}]"] = v
    return metrics


def run_summary(run: Run, varied: list[str]) -> dict[str, Any]:
    config = flat_config(run)
    return {
        "run": run.name,
        "points": list(run.points),
        "parameters": {k: config.get(k) for k in varied},
        "stages": {
            s: {
                "uid": t.uid,
                "status": t.status,
                "artifact": str(t.dir),
                **({"error": t.error.splitlines()[0]} if t.error else {}),
            }
            for s, t in run.tasks.items()
        },
        "metrics": run_metrics(run),
    }


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
        rows.append(
            [
                summary["run"],
                *[_short(summary["parameters"].get(k)) for k in varied],
                *statuses,
                *[format_number(summary["metrics"][m]) if m in summary["metrics"] else "-" for m in metrics],
            ]
        )
    if len(rows) <= 6:  # few runs, many metrics: one column per run reads better in a terminal
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

    import matplotlib

    with matplotlib.rc_context():
        fig, ax = new_figure(*figure.size)
        figure.plot(figure.data, ax)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def status_text(status: str) -> str:
    return {"done": "done", "not pulled": "done (arrays not pulled)"}.get(status, status.upper())


def _cell_html(value: Any, tag: str = "td") -> str:
    if isinstance(value, Cell):
        attrs = (
            f' class="num" data-stage="{value.stage}" data-uid="{value.uid}" '
            f'data-dataset="{html.escape(value.dataset)}" data-index="{",".join(map(str, value.index))}" '
            f'data-value="{html.escape(_full(value.value))}"'
        )
        return f"<{tag}{attrs}>{html.escape(value.text)}</{tag}>"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<{tag} class="num">{html.escape(format_number(value))}</{tag}>'
    return f"<{tag}>{html.escape(format_number(value))}</{tag}>"


def _full(value: Any) -> str:
    """The value as stored (``repr`` of a float keeps every digit), for checks and for copying."""
    return repr(float(value)) if isinstance(value, float) else str(getattr(value, "item", lambda: value)())


def table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "\n".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    # the title is a heading above the table (a <caption> would wrap at the width of a narrow table)
    return (
        f'<h4 class="table">{html.escape(table.title)}</h4><table><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table>{note}"
    )


def _section_html(section: Section, figure_paths: dict[str, str], anchor: str) -> str:
    task = section.task
    where = f' <span class="uid">{task.stage} {task.uid}</span>' if task else ""
    parts = [f'<h3 id="{anchor}">{html.escape(section.title)}{where}</h3>']
    if section.message:
        parts.append(f'<p class="missing">{html.escape(section.message)}</p>')
    parts += [table_html(t) for t in section.tables]
    for figure in section.figures:
        src = figure_paths[f"{task.stage}/{task.uid}/{figure.name}"]
        parts.append(
            f'<figure><img src="{html.escape(src)}" alt="{html.escape(figure.caption)}">'
            f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
        )
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#111;
line-height:1.4}h1{font-size:1.6em}h2{margin-top:1.6em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;max-width:100%}td,th{border:1px solid #999;padding:3px 7px;
font-size:14px;vertical-align:top}th{background:#f0f0f0;text-align:left;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}caption{text-align:left;
font-weight:bold;padding:4px 0}.missing{background:#eee;border-left:4px solid #000;padding:4px 8px;font-weight:bold}
.note{font-size:13px;color:#333;margin-top:0;max-width:1000px}.uid{font-size:12px;color:#555;font-family:monospace}
figure{margin:1em 0}img{max-width:100%;height:auto;border:1px solid #ccc}
figcaption{font-size:14px;color:#333;max-width:1000px}section.run{border-top:2px solid #000;margin-top:2em}
nav.toc{background:#f7f7f7;border:1px solid #ccc;padding:.4em 1em;font-size:14px}nav.toc ul{margin:.2em 0}
table.overview{table-layout:fixed;width:100%}table.overview td,table.overview th{overflow-wrap:anywhere}
dl.glossary dt{font-weight:600;margin-top:.5em}dl.glossary dd{margin-left:1.5em}
h4.table{margin:1em 0 .2em 0;font-size:15px}"""


def _page(experiment: Experiment, toc: str, overview: str, runs_html: list[str]) -> str:
    title = html.escape(f"moespec report: {experiment.name}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head><body>\n'
        f"<h1>{title}</h1>\n<p>results: <code>{html.escape(str(experiment.dir))}</code>; "
        f"{len(experiment.runs)} run(s)</p>\n{toc}\n{overview}\n{_glossary_html()}\n"
        + "\n".join(runs_html)
        + "\n</body></html>\n"
    )


def _toc_html(experiment: Experiment, run_stages: dict[str, list[tuple[str, str]]]) -> str:
    """Table of contents: the overview, the glossary, and each run with a link to each of its stages."""
    items = ['<li><a href="#overview">Overview</a></li>', '<li><a href="#glossary">Glossary</a></li>']
    for run in experiment.runs:
        stages = " · ".join(f'<a href="#{anchor}">{html.escape(stage)}</a>' for stage, anchor in run_stages[run.name])
        items.append(f'<li><a href="#{run.name}">{html.escape(run.name)}</a>: {stages}</li>')
    return f'<nav class="toc"><strong>Contents</strong><ul>{"".join(items)}</ul></nav>'


def _glossary_html() -> str:
    entries = "".join(f"<dt>{html.escape(term)}</dt><dd>{html.escape(text)}</dd>" for term, text in GLOSSARY.items())
    return f'<h2 id="glossary">Glossary</h2><dl class="glossary">{entries}</dl>'


def _status_summary(run: Run, stages: list[str]) -> str:
    """``all done``, or each stage that is not done with its status."""
    statuses = {s: run.status(s) for s in stages}
    if all(v == "done" for v in statuses.values()):
        return "all done"
    return ", ".join(f"{s}: {status_text(v)}" for s, v in statuses.items() if v != "done")


def _metric_cell(summary: dict[str, Any], run: Run, metric: str) -> str:
    value = summary["metrics"].get(metric)
    if value is None:
        return "<td>-</td>"
    stage = metric.split(".", 1)[0]
    return (
        f'<td class="num" data-summary="{html.escape(metric)}" data-uid="{run.tasks[stage].uid}" '
        f'data-value="{html.escape(_full(value))}">{html.escape(format_number(value))}</td>'
    )


def _overview_html(experiment: Experiment, summaries: list[dict[str, Any]]) -> str:
    """The headline table. Few runs: one column per run, one row per parameter and metric (readable
    names with units); many runs: one row per run. Fixed layout, wrapped headers: no sideways scrolling."""
    stages = stages_of(experiment)
    varied = varied_parameters(experiment.runs)
    metrics = [m for m in HEADLINE_METRICS if any(m in s["metrics"] for s in summaries)]
    runs = list(zip(experiment.runs, summaries))
    note = (
        '<p class="note">Metrics from each stage\'s summary.json; units in brackets; definitions in the '
        '<a href="#glossary">glossary</a>. Rejection rates are fractions of testable points; read them '
        "against the same test's rate on null data.</p>"
    )
    if len(runs) <= RUNS_AS_COLUMNS:
        head = "<th>quantity</th>" + "".join(f'<th><a href="#{r.name}">{html.escape(r.name)}</a></th>' for r, _ in runs)
        rows = [
            f"<tr><th>{html.escape(k)}</th>"
            + "".join(f"<td>{html.escape(_short(s['parameters'].get(k)))}</td>" for _, s in runs)
            + "</tr>"
            for k in varied
        ]
        rows.append(
            "<tr><th>status</th>"
            + "".join(f"<td>{html.escape(_status_summary(r, stages))}</td>" for r, _ in runs)
            + "</tr>"
        )
        rows += [
            f"<tr><th>{html.escape(metric_label(m))}</th>" + "".join(_metric_cell(s, r, m) for r, s in runs) + "</tr>"
            for m in metrics
        ]
        label_width = 34 if len(runs) > 1 else 50
        colgroup = (
            f'<colgroup><col style="width:{label_width}%">'
            + "".join(f'<col style="width:{(100 - label_width) / len(runs):.1f}%">' for _ in runs)
            + "</colgroup>"
        )
    else:
        head = (
            "<th>run</th>"
            + "".join(f"<th>{html.escape(k.split('.', 1)[-1])}</th>" for k in varied)
            + "<th>status</th>"
            + "".join(f"<th>{html.escape(metric_label(m))}</th>" for m in metrics)
        )
        rows = [
            f'<tr><td><a href="#{r.name}">{html.escape(r.name)}</a></td>'
            + "".join(f"<td>{html.escape(_short(s['parameters'].get(k)))}</td>" for k in varied)
            + f"<td>{html.escape(_status_summary(r, stages))}</td>"
            + "".join(_metric_cell(s, r, m) for m in metrics)
            + "</tr>"
            for r, s in runs
        ]
        colgroup = ""
    return (
        f'<h2 id="overview">Overview</h2><table class="overview">{colgroup}<caption>runs: swept parameters, '
        f"stage status and headline metrics</caption><thead><tr>{head}</tr></thead><tbody>\n"
        + "\n".join(rows)
        + f"\n</tbody></table>{note}"
    )


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
    stamp = {
        "plots_version": PLOTS_VERSION,
        "artifact_size": stat.st_size if stat else None,
        "artifact_mtime_ns": stat.st_mtime_ns if stat else None,
        "figures": sorted(f.name for f in section.figures),
    }
    stamp_path = folder / "drawn.json"
    names = [f.name for f in section.figures]
    try:
        fresh = (
            not redraw
            and json.loads(stamp_path.read_text()) == stamp
            and all((folder / f"{n}.png").is_file() for n in names)
        )
    except (OSError, ValueError):
        fresh = False
    for figure in section.figures:
        relative = f"figures/{task.stage}-{task.uid}/{figure.name}.png"
        if not fresh:
            save_figure(figure, out / relative)
        figure_paths[f"{task.stage}/{task.uid}/{figure.name}"] = relative
    if section.figures and not fresh:
        _write_json(stamp_path, stamp)


def _embed_html(task: Any, anchor: str, note: str = "") -> str:
    """The embed stage: what its summary.json says (the embeddings themselves are not drawn)."""
    model = task.config.get("model", {}).get("name", "?")
    rows = [[metric_label(f"embed.{k}"), v] for k, v in task.summary.items() if isinstance(v, (int, float))]
    table = table_html(
        Table(
            f"model {model}, pooling {task.config.get('pooling', '?')}, layer {task.config.get('layer', '?')}",
            ["quantity", "value"],
            rows,
        )
    )
    extra = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f'<h3 id="{anchor}">Embeddings (embed) <span class="uid">embed {task.uid}</span></h3>{table}{extra}'


def _run_html(run: Run, summary: dict[str, Any], stages: list[str], state: dict[str, Any]) -> tuple[str, list]:
    """One run's section, and its (stage, anchor) pairs for the table of contents."""
    parameters = ", ".join(f"{k}={_short(v)}" for k, v in summary["parameters"].items()) or "(single run)"
    parts = [
        f'<section class="run" id="{run.name}"><h2>{html.escape(run.name)}</h2>',
        "<p>parameters: "
        + html.escape(parameters)
        + (f"; sweep point(s) {', '.join(map(str, run.points))}" if run.points else "")
        + "</p>",
    ]
    anchors = []
    for stage in stages:
        anchor = f"{run.name}-{stage}"
        anchors.append((stage, anchor))
        task = run.tasks.get(stage)
        if task is None:
            where = "for this run" if run.linked else "linked to this run (its inputs are not recorded yet)"
            parts.append(
                f'<h3 id="{anchor}">{stage}</h3><p class="missing">{status_text(run.status(stage))}: '
                f"no {stage} artifact {where}</p>"
            )
            continue
        key = (task.stage, task.uid)
        if key in state["shown"]:
            # a shared upstream artifact (one reduce for every train point) is shown once
            parts.append(
                f'<h3 id="{anchor}">{stage} <span class="uid">{stage} {task.uid}</span></h3><p>shared with '
                f'<a href="#{stage}-{task.uid}">{state["shown"][key]}</a> (same artifact; status '
                f"{status_text(task.status)})</p>"
            )
            continue
        state["shown"][key] = run.name
        parts.append(f'<a id="{stage}-{task.uid}"></a>')
        if key not in state["sections"]:
            logging.getLogger("moespec.report").info("%s %s: reading and drawing", stage, task.uid)
            state["sections"][key] = load_section(task)
            _draw_section(state["sections"][key], state["out"], state["figure_paths"], state["redraw"])
        section = state["sections"][key]
        if stage == "embed" and task.status in FINISHED:
            parts.append(
                _embed_html(
                    task,
                    anchor,
                    "embeddings not pulled from the cluster (not needed by the report)"
                    if task.status == "not pulled"
                    else "",
                )
            )
            continue
        parts.append(_section_html(section, state["figure_paths"], anchor))
    parts.append("</section>")
    return "\n".join(parts), anchors


def write_report(experiment_dir: Path | str, out: Path | str | None = None, *, redraw: bool = False) -> ReportResult:
    """Write the report of an experiment folder; return the path of ``index.html``, the summary and the table.

    ``redraw``: draw every figure again, even those already drawn from the same artifact.
    """
    experiment = discover(experiment_dir)
    if not experiment.tasks:
        from moespec.errors import ArtifactError

        raise ArtifactError(
            f"{experiment.dir}: no artifacts (expected <root>/<experiment>/<stage>/<uid>/; stages: {', '.join(STAGES)})"
        )
    out = Path(out) if out else experiment.dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    varied = varied_parameters(experiment.runs)
    summaries = [run_summary(run, varied) for run in experiment.runs]
    state = {"sections": {}, "shown": {}, "figure_paths": {}, "out": out, "redraw": redraw}
    runs_html, run_stages = [], {}
    stages = stages_of(experiment)
    for run, summary in zip(experiment.runs, summaries):
        text, run_stages[run.name] = _run_html(run, summary, stages, state)
        runs_html.append(text)
        _write_json(out / "runs" / run.name / "summary.json", summary)
    experiment_summary = {
        "experiment": experiment.name,
        "results": str(experiment.dir),
        "varied_parameters": varied,
        "runs": summaries,
    }
    _write_json(out / "summary.json", experiment_summary)
    index = out / "index.html"
    _write_text(
        index, _page(experiment, _toc_html(experiment, run_stages), _overview_html(experiment, summaries), runs_html)
    )
    return ReportResult(index, experiment_summary, headline_table(experiment, summaries))


def _write_text(path: Path, text: str) -> None:
    from moespec.artifacts import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str, allow_nan=True))
