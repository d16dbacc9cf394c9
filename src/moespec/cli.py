"""``moespec validate|plan|submit|run|status``: thin shims over config, launch and artifacts."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from moespec import __version__
from moespec.errors import ConfigError, MoespecError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
moespec: embedding-space stratification and Mixture-of-Experts experiments, from one YAML file.

An experiment file names the stages to run (embed, reduce, fiber, train, ablate), their settings,
a sweep and where to run. moespec validates it, plans it as tasks (one per stage and sweep point,
shared where settings are equal), runs only what is missing, and stores each result as an HDF5
artifact under <root>/<experiment>/<stage>/<uid>/.
"""

EPILOG = """\
typical session:
  moespec validate configs/experiments/demo.yaml            check the file and the inputs it names
  moespec plan     configs/experiments/demo.yaml            the tasks, done or to run
  moespec submit   configs/experiments/demo.yaml --executor local
  moespec report   results/demo                             HTML report of the results

`moespec COMMAND --help` describes each command; README.md explains the numbers it prints.
"""


def _count(n: int, noun: str) -> str:
    """``1 task``, ``2 tasks``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------------
# commands


def cmd_validate(args: argparse.Namespace) -> int:
    from moespec.config import load_experiment
    from moespec.launch.plan import make_plan

    from moespec.preflight import input_problems

    status = EXIT_OK
    for path in args.files:
        try:
            plan = make_plan(load_experiment(path, root=args.root))
            problems = [] if args.schema_only else input_problems(plan.experiment)
            if problems:
                raise ConfigError(problems)
        except ConfigError as e:
            print(f"{path}: INVALID ({_count(len(e.problems), 'problem')})", file=sys.stderr)
            for problem in e.problems:
                print(f"  {problem}", file=sys.stderr)
            status = EXIT_FAILED
            continue
        print(
            f"{path}: ok ({_count(len(plan.experiment.points), 'sweep point')}, {_count(len(plan.tasks), 'task')}: "
            + ", ".join(f"{s} {len(plan.tasks_for(s))}" for s in plan.stages())
            + (")" if args.schema_only else "; data files and models found)")
        )
    return status


def _task_rows(plan, with_state: bool = True) -> list[list[str]]:
    from moespec.launch.plan import describe_point

    rows = []
    for stage in plan.stages():
        for index, task in enumerate(plan.tasks_for(stage)):
            shard = f"{task.shard_index + 1}/{task.num_shards}" if task.num_shards > 1 else "-"
            rows.append(
                [
                    stage,
                    str(index),
                    task.uid,
                    shard,
                    describe_point(plan.experiment, task.points),
                    task.state() if with_state else "",
                ]
            )
    return rows


def _why_short(task, reason: str) -> str:
    """The table's one-word-ish reason a task is to run (the full text is printed below the table)."""
    if reason.startswith("stale"):
        return reason.split(" (", 1)[0]
    if reason:
        return "unreadable artifact (below)"
    return "failed before" if task.failed_path.exists() else "no artifact"


def cmd_plan(args: argparse.Namespace) -> int:
    from moespec.launch.arrays import compress_indices, task_key
    from moespec.launch.slurm import describe_arrays, load_plan, planned_arrays

    plan, cluster = load_plan(args.file, root=args.root, cluster=args.cluster, away_ok=True)
    why, arrays = planned_arrays(plan, cluster)
    done = {key for key, reason in why.items() if reason == "done"}
    rows = _task_rows(plan, with_state=False)
    problems = []
    for row, task in zip(rows, [t for s in plan.stages() for t in plan.tasks_for(s)]):
        reason = why[task_key(task)]
        row[5] = "done" if reason == "done" else "to run"
        row.append(
            "-" if reason == "done" else "not checked here" if plan.root_unavailable else _why_short(task, reason)
        )
        if reason not in ("", "done"):
            problems.append(f"  {task.label}: {reason}")
    print(
        f"experiment {plan.experiment.name}: {_count(len(plan.experiment.points), 'sweep point')}, "
        f"{_count(len(plan.tasks), 'unique task')}, artifacts under {plan.experiment.root / plan.experiment.name}"
    )
    if plan.root_unavailable:
        print(f"note: {plan.root_unavailable}")
    print(_table(rows, ["stage", "task", "uid", "shard", "sweep point", "state", "why"]))
    if problems:
        print("\nwhy these are to run although an artifact is there:\n" + "\n".join(problems))
    print("\njobs that `moespec submit` would run (one array per stage, each after its upstream stages):")
    for stage in plan.stages():
        todo = [i for i, t in enumerate(plan.tasks_for(stage)) if task_key(t) not in done]
        upstream = sorted({i.stage for t in plan.tasks_for(stage) for i in t.inputs.values()})
        after = f" after {', '.join(upstream)}" if upstream else ""
        state = f" [indices {compress_indices(todo)}]" if todo else " (all done)"
        print(f"  {stage}: {_count(len(todo), 'task')}{state}{after}")
    where = f"cluster {cluster.name}" if cluster else "no cluster profile"
    print(
        f"\nSlurm job arrays ({where}; chunked to MaxArraySize; aftercorr: array task i waits for upstream "
        f"array task i only, afterok: for the whole array):"
    )
    for line in describe_arrays(arrays):
        print(line)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from moespec.launch.slurm import load_plan
    from moespec.launch.status import STATES, collect_status, failure_report

    plan, _ = load_plan(args.file, root=args.root, cluster=args.cluster)
    statuses = collect_status(plan)
    rows = _task_rows(plan, with_state=False)
    for row, status in zip(rows, statuses):
        row[5] = status.state
        row.append(status.job_id or "-")
    print(_table(rows, ["stage", "task", "uid", "shard", "sweep point", "state", "job"]))
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    print("\n" + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    for status in statuses:
        if status.state == "failed":
            print("\n" + "\n".join(failure_report(status)))
        elif status.state in ("unknown", "cancelling") or (status.state == "not submitted" and status.detail):
            print(f"\n{status.state.upper()} {status.task.label}: {status.detail}")
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from moespec.launch.runner import run_plan_inline, run_plan_local
    from moespec.launch.slurm import DEFAULT_CLUSTER, load_plan, submit_command

    plan, cluster = load_plan(
        args.file, root=args.root, cluster=args.cluster, executor="slurm" if args.emit_sbatch else args.executor
    )
    executor = args.executor or plan.experiment.infra.executor
    mode = args.mode or plan.experiment.infra.mode
    if executor == "slurm" or args.emit_sbatch:
        submit_command(
            plan,
            cluster or DEFAULT_CLUSTER,
            mode=mode,
            stages=args.stages,
            retry_failed=args.retry_failed,
            dry_run=args.dry_run,
            emit_dir=args.emit_sbatch,
        )
        return EXIT_OK
    if args.retry_failed or args.dry_run:
        print(
            f"moespec submit: --retry-failed and --dry-run need --executor slurm (the {executor} executor runs "
            "every missing task, failed ones included)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    root = plan.experiment.root / plan.experiment.name
    _check_inputs(plan, args.stages)
    print(
        f"experiment {plan.experiment.name}: {_count(len(plan.tasks), 'task')}, executor {executor}, mode {mode}, "
        f"results under {root}"
    )
    if executor == "inline":
        outcomes = run_plan_inline(plan, mode, args.stages)
    else:
        outcomes = run_plan_local(plan, mode, args.stages)
    _print_outcomes(outcomes)
    summary_path = root / "summary.json"
    _write_experiment_summary(summary_path, outcomes, plan)
    print(f"\nresults: {root}\nsummary: {summary_path}")
    return EXIT_FAILED if any(o.status in ("failed", "skipped") for o in outcomes) else EXIT_OK


def _check_inputs(plan, stages: list[str] | None) -> None:
    """Refuse to start when a data file or model of the stages to run is missing (``moespec validate``'s checks)."""
    from moespec.preflight import input_problems

    problems = input_problems(plan.experiment)
    if stages:
        problems = [p for p in problems if p.split(": ", 2)[1].split(".")[0] in stages]
    if problems:
        raise ConfigError(problems)


def _print_outcomes(outcomes) -> None:
    from moespec.analysis.headline import headline

    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    print("\n" + ", ".join(f"{n} {status}" for status, n in counts.items()))
    for outcome in outcomes:
        task = outcome.task
        if outcome.status in ("failed", "skipped"):
            print(f"  {outcome.status.upper()} {task.label}: {outcome.error.splitlines()[0] if outcome.error else ''}")
            continue
        if task.num_shards > 1 and task.shard_index != task.num_shards - 1:
            continue
        prefix = f"  {task.stage:<7} {task.uid}  "
        print(prefix + headline(task.stage, outcome.summary, width=120, indent=len(prefix)))


def _write_experiment_summary(path: Path, outcomes, plan) -> None:
    """Write the outcome of every task of the plan: this run's, and earlier runs' for tasks it did not touch.

    A ``--stages`` run thus updates its own tasks without dropping the others; tasks no longer in
    the plan (a changed config) are dropped.
    """
    from moespec.artifacts import atomic_write_text

    if not path.parent.exists():
        return
    entries = {(e.get("stage"), e.get("uid"), e.get("shard")): e for e in _read_tasks(path)}
    for o in outcomes:
        entries[(o.task.stage, o.task.uid, o.task.shard_index)] = {
            "stage": o.task.stage,
            "uid": o.task.uid,
            "shard": o.task.shard_index,
            "status": o.status,
            "points": list(o.task.points),
            "summary": o.summary,
            "error": o.error,
            "artifact": str(o.task.dir),
        }
    planned = [(t.stage, t.uid, t.shard_index) for t in plan.tasks]
    data = [entries[key] for key in planned if key in entries]
    atomic_write_text(path, json.dumps({"tasks": data}, indent=2, default=str))


def _read_tasks(path: Path) -> list[dict]:
    try:
        tasks = json.loads(path.read_text(encoding="utf-8")).get("tasks", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [t for t in tasks if isinstance(t, dict)]


def cmd_run(args: argparse.Namespace) -> int:
    from moespec.launch.runner import execute_task, plan_from_file

    index = args.task
    if index is None:
        index = os.environ.get("SLURM_ARRAY_TASK_ID")
        if index is None:
            print("moespec run: --task is required (or SLURM_ARRAY_TASK_ID in the environment)", file=sys.stderr)
            return EXIT_USAGE
        index = int(index)
    plan = plan_from_file(args.config, args.root)
    tasks = plan.tasks_for(args.stage)
    if not tasks:
        print(
            f"moespec run: {args.config} has no {args.stage} stage (stages: {', '.join(plan.stages())})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not 0 <= index < len(tasks):
        print(
            f"moespec run: --task {index} is out of range: {args.config} has {len(tasks)} {args.stage} "
            f"task(s), indices 0..{len(tasks) - 1}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    outcome = execute_task(tasks[index], args.mode)
    print(f"{outcome.status} {outcome.task.label} -> {outcome.task.dir}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# parser


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``moespec`` parser; for a ``command`` of ``_LIGHT_COMMANDS``, that command's alone.

    Building every command's parser imports the stage registry (and with it pydantic, about
    0.12 s); ``moespec sync`` needs neither, and its start-up is part of every pull
    (docs/sync.md, "Start-up").
    """
    parser = argparse.ArgumentParser(
        prog="moespec", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"moespec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in _LIGHT_COMMANDS:
        importlib.import_module(_LIGHT_COMMANDS[command]).register(sub)
        return parser
    from moespec.stages.base import STAGE_ORDER

    def with_root(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--root", metavar="DIR", help="results root (overrides the file's `root`)")
        return p

    experiment_help = "experiment file (YAML), e.g. configs/experiments/demo.yaml"
    mode_help = (
        "cached: skip tasks whose artifact is complete (default); force: compute again; "
        "read-only: compute nothing, fail on a missing artifact"
    )
    cluster_help = "cluster profile: a name in hpc/clusters/ or a YAML path (default: infra.cluster)"

    p = with_root(
        sub.add_parser("validate", help="check experiment files and the inputs they name; report every problem")
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="experiment files (YAML)")
    p.add_argument(
        "--schema-only",
        action="store_true",
        help="check the files only, not the data files and models they name (e.g. on a laptop for a cluster run)",
    )
    p.set_defaults(func=cmd_validate)

    p = with_root(sub.add_parser("plan", help="print the task table and the job arrays that would be submitted"))
    p.add_argument("file", metavar="FILE", help=experiment_help)
    p.add_argument("--cluster", help=cluster_help)
    p.set_defaults(func=cmd_plan)

    p = with_root(sub.add_parser("status", help="each task's state from the artifacts and the scheduler"))
    p.add_argument("file", metavar="FILE", help=experiment_help)
    p.add_argument("--cluster", help=cluster_help)
    p.set_defaults(func=cmd_status)

    p = with_root(sub.add_parser("submit", help="run the missing tasks, stage by stage"))
    p.add_argument("file", metavar="FILE", help=experiment_help)
    p.add_argument(
        "--executor",
        choices=["local", "slurm", "inline"],
        help="local: one subprocess per task on this machine (default: infra.executor); slurm: job "
        "arrays; inline: every task in this process (debugging, notebooks)",
    )
    p.add_argument("--mode", choices=["cached", "force", "read-only"], help=mode_help + " (default: infra.mode)")
    p.add_argument("--stages", nargs="+", metavar="STAGE", help="only these stages (e.g. --stages train ablate)")
    p.add_argument("--cluster", help=cluster_help)
    p.add_argument("--dry-run", action="store_true", help="print the arrays and their sbatch scripts; submit nothing")
    p.add_argument(
        "--emit-sbatch", metavar="DIR", help="write array job scripts and submit.sh to DIR instead of submitting"
    )
    p.add_argument("--retry-failed", action="store_true", help="resubmit only the tasks whose jobs failed")
    p.set_defaults(func=cmd_submit)

    p = with_root(sub.add_parser("run", help="run one task in this process (what an array task calls)"))
    p.add_argument("stage", metavar="STAGE", help=f"stage of the task: {', '.join(STAGE_ORDER)}")
    p.add_argument("--config", required=True, metavar="FILE", help=experiment_help)
    p.add_argument(
        "--task",
        type=int,
        help="task index within the stage, as `moespec plan` numbers them (default: $SLURM_ARRAY_TASK_ID)",
    )
    p.add_argument("--mode", choices=["cached", "force", "read-only"], default="cached", help=mode_help)
    p.set_defaults(func=cmd_run)

    # Subsystems with their own commands register them here (e.g. `moespec sync`), so that their
    # parsers live beside their code.
    for module_name in _COMMAND_MODULES:
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(sub)
    return parser


#: Modules exposing ``register(subparsers)`` that adds their commands.
_COMMAND_MODULES = ("moespec.sync.cli", "moespec.analysis.cli")
#: Commands whose parser is built alone when they are the one run (see ``build_parser``).
_LIGHT_COMMANDS = {"sync": "moespec.sync.cli"}


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    status = _run(args)
    if as_program and args.command in _LIGHT_COMMANDS:
        _exit_now(status)
    return status


def _exit_now(status: int) -> NoReturn:
    """End the process without the interpreter's teardown, which takes 30-40 ms once paramiko is
    loaded: a tenth of a ``moespec sync`` with nothing to copy (docs/sync.md, "Start-up and
    sessions"). Only for a command run as the program (``argv`` not given), after its work: every
    file it wrote is closed and its connection shut; what is buffered is flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a closed stream
            pass
    os._exit(status)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; errors a user can cause become one message and an exit status."""
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`moespec plan X | head`): stop quietly, as other command-line tools do.
        # stdout is pointed at devnull so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except ConfigError as e:
        print(f"moespec {args.command}: invalid configuration ({len(e.problems)} problem(s)):", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_FAILED
    except MoespecError as e:
        print(f"moespec {args.command}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("moespec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
