"""``moespec sync --from-hpc|--to-hpc``: a thin shim that builds a ``SyncRequest`` and prints the report.

Picked up by ``moespec.cli`` through ``register(subparsers)``. Nothing heavy is imported until
the command runs, so ``moespec --help`` works without paramiko.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED = 0, 1

_EPILOG = """\
examples:
  moespec sync --from-hpc                      pull every experiment (remote's default filters)
  moespec sync --from-hpc demo --dry-run       show what would move for experiment demo
  moespec sync --from-hpc demo --include 'embed/**'   also the large embeddings
  moespec sync --to-hpc                        push configs/ hpc/ jobs/ src/ ... (push.paths)

Remotes are named in sync/remotes.yaml (see sync/remotes.example.yaml). Filters: the first
matching rule wins, command-line rules before the remote's defaults; see sync/README.md.
"""


class _FilterAction(argparse.Action):
    """--include/--exclude into one ordered list, so that their order on the command line counts."""

    def __call__(self, parser, namespace, value, option_string=None):
        rules = list(getattr(namespace, "filter_rules", None) or [])
        rules.append((self.const, value))
        namespace.filter_rules = rules


def register(subparsers) -> None:
    """Add the ``sync`` command to ``moespec``'s subparsers."""
    p = subparsers.add_parser(
        "sync",
        help="pull results from / push configs to a cluster over SSH (incremental, verified)",
        description="Pull a cluster's results into results/, or push configs (and the project) to it, over\n"
        "SSH: only what changed moves, every file is verified and renamed into place.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument(
        "--from-hpc",
        dest="direction",
        action="store_const",
        const="pull",
        help="pull <remote root>/<EXPERIMENT>/ into <local root>/<EXPERIMENT>/",
    )
    way.add_argument(
        "--to-hpc",
        dest="direction",
        action="store_const",
        const="push",
        help="push project paths (default: the remote's push.paths) to its push.root",
    )
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="experiments (--from-hpc; default: all) or project paths (--to-hpc)"
    )
    p.add_argument("--remote", metavar="NAME", help="remote from the remotes file (default: its `default`)")
    p.add_argument("--remotes", type=Path, metavar="FILE", help="remotes file (default: sync/remotes.yaml)")
    p.add_argument(
        "--host",
        metavar="ALIAS",
        help="ssh host alias (overrides the remote's; with --remote-root no remotes file is needed)",
    )
    p.add_argument("--remote-root", metavar="PATH", help="remote root for this direction (overrides the remotes file)")
    p.add_argument(
        "--local-root", type=Path, metavar="DIR", help="local root (default: results/ for --from-hpc, . for --to-hpc)"
    )
    p.add_argument(
        "--include",
        action=_FilterAction,
        const="include",
        metavar="GLOB",
        dest="filter_rules",
        help="transfer what matches (repeatable; first matching rule wins)",
    )
    p.add_argument(
        "--exclude",
        action=_FilterAction,
        const="exclude",
        metavar="GLOB",
        dest="filter_rules",
        help="leave out what matches (repeatable)",
    )
    p.add_argument("--all", action="store_true", help="ignore the remote's default filters")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be done; change nothing")
    p.add_argument(
        "-c",
        "--checksum",
        action="store_true",
        help="compare equal-size files by SHA-256 instead of mtime, and verify copies by it",
    )
    p.add_argument("--delete", action="store_true", help="delete destination files that the source lacks")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite destination files that are newer; let --delete go past --max-delete",
    )
    p.add_argument(
        "--max-delete",
        type=float,
        metavar="SHARE",
        help="--delete refuses to remove more than this share of an experiment's files, and never "
        "all of them (default: the remote's max_delete, else 0.5)",
    )
    p.add_argument("--transport", choices=["paramiko", "openssh"], help="override the remote's transport")
    p.add_argument("--ssh-config", type=Path, metavar="FILE", help="ssh client config (default: ~/.ssh/config)")
    p.add_argument(
        "--known-hosts",
        type=Path,
        action="append",
        metavar="FILE",
        help="known_hosts file (repeatable; default: the ssh config's UserKnownHostsFile)",
    )
    p.add_argument("--channels", type=int, metavar="N", help="parallel SFTP channels (default: the remote's, else 4)")
    p.add_argument(
        "--retries", type=int, metavar="N", help="retries after a lost connection (default: the remote's, else 2)"
    )
    p.add_argument(
        "--stall-timeout", type=float, metavar="SECONDS", help="seconds without progress before reconnecting"
    )
    p.add_argument("--batch", action="store_true", help="never prompt (passphrases, 2FA); fail instead")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="list every action")
    p.set_defaults(func=cmd_sync, filter_rules=[])


def _remote_settings(args):
    """(where the settings come from, the remote's settings): the remotes file, or the flags alone."""
    from moespec.errors import ConfigError
    from moespec.sync.remotes import DEFAULT_REMOTES_FILE, default_remote, host_alias, load_remotes

    path = args.remotes or DEFAULT_REMOTES_FILE
    if args.host is not None:
        try:
            host_alias(args.host)
        except ValueError as e:
            raise ConfigError(f"--host: {e}") from None
    if args.host and args.remote_root and args.remotes is None and not Path(path).exists():
        try:
            return "--host/--remote-root", default_remote(args.host, args.remote_root)
        except ValueError as e:
            raise ConfigError(f"--remote-root: {e}") from e
    remotes = load_remotes(path)
    remote = remotes.get(args.remote, str(path))
    name = args.remote or remotes.default or next(iter(remotes.remotes))
    return f"{path}: remotes.{name}", remote


def _roots_and_scopes(args, source: str, remote):
    """(remote root, local root, scopes) of the direction asked for."""
    from moespec.errors import ConfigError
    from moespec.sync.paths import UnsafePath, check_relpath

    names = [name.strip("/") for name in args.names]
    for name in names:
        try:
            check_relpath(name)
        except UnsafePath as e:
            raise ConfigError(f"{name!r}: not a path under the root ({e})") from None
    if args.direction == "pull":
        return args.remote_root or remote.root, args.local_root or Path("results"), tuple(names) or ("",)
    remote_root = args.remote_root or remote.push.root
    if remote_root is None:
        raise ConfigError(
            f"{source}.push.root: required for --to-hpc (the project folder on the cluster); or pass --remote-root"
        )
    local_root = args.local_root or Path(".")
    scopes = tuple(names or [p for p in remote.push.paths if (local_root / p).exists()])
    if not scopes:
        raise ConfigError(f"{source}.push.paths: none of {', '.join(remote.push.paths)} exists under {local_root}")
    return remote_root, local_root, scopes


def _filters(args, remote):
    from moespec.errors import ConfigError
    from moespec.sync.filters import Filters

    defaults = remote.pull if args.direction == "pull" else remote.push
    try:
        return Filters.build(
            args.filter_rules, () if args.all else defaults.include, () if args.all else defaults.exclude
        )
    except ValueError as e:
        raise ConfigError(f"--include/--exclude: {e}") from e


def build_request(args):
    """Turn parsed arguments into a ``SyncRequest`` (raises ConfigError on bad input)."""
    return _request(args, *_settings(args))


def _settings(args):
    """Check the arguments and read the remotes file: (remote, remote root, local root, scopes).

    Cheap on purpose: ``cmd_sync`` starts connecting right after it, before the import of the
    session and the engine.
    """
    from moespec.errors import ConfigError

    if args.channels is not None and not 1 <= args.channels <= 32:
        raise ConfigError(f"--channels: must be between 1 and 32, got {args.channels}")
    if args.max_delete is not None and not 0 <= args.max_delete <= 1:
        raise ConfigError(f"--max-delete: must be a share between 0 and 1, got {args.max_delete}")
    source, remote = _remote_settings(args)
    return (remote, *_roots_and_scopes(args, source, remote))


def _connect_options(args, remote):
    """How to reach the host (``transport.ConnectOptions``), from the flags and the remote."""
    from moespec.sync.transport import ConnectOptions

    known_hosts = args.known_hosts or remote.known_hosts
    return ConnectOptions(
        host=args.host or remote.sync_host,
        ssh_config=args.ssh_config or (Path(remote.ssh_config).expanduser() if remote.ssh_config else None),
        known_hosts=tuple(Path(p).expanduser() for p in known_hosts) if known_hosts else None,
        connect_timeout=remote.connect_timeout,
        interactive=not args.batch and sys.stdin.isatty(),
    )


def _request(args, remote, remote_root, local_root, scopes, listing_token: str | None = None):
    from moespec.sync.engine import EngineSettings
    from moespec.sync.session import SyncRequest

    options = _connect_options(args, remote)
    return SyncRequest(
        direction=args.direction,
        host=options.host,
        remote_root=remote_root,
        local_root=local_root,
        scopes=scopes,
        filters=_filters(args, remote),
        transport=args.transport or remote.transport,
        dry_run=args.dry_run,
        checksum=args.checksum,
        delete=args.delete,
        force=args.force,
        max_delete=remote.max_delete if args.max_delete is None else args.max_delete,
        ssh_config=options.ssh_config,
        known_hosts=options.known_hosts,
        engine=EngineSettings(
            channels=args.channels or remote.channels, stall_timeout=args.stall_timeout or remote.stall_timeout
        ),
        retries=remote.retries if args.retries is None else args.retries,
        connect_timeout=options.connect_timeout,
        interactive=options.interactive,
        **({"listing_token": listing_token} if listing_token else {}),
    )


def _print_plan(plan, verbose: bool, dry_run: bool) -> None:
    from moespec.sync.session import describe_action

    if dry_run or verbose:
        for action in plan.actions():
            print(("would " if dry_run else "") + describe_action(action))  # names escaped there
        if dry_run and plan.is_empty():
            print("nothing to do")


def _print_report(report) -> None:
    from moespec.sync.paths import printable

    plan = report.plan
    lines = _grouped("kept", plan.kept, lambda group: "")
    lines += [f"REFUSED: {refusal.path}: {refusal.reason} (use --exclude to silence)" for refusal in plan.refused]
    lines += [f"note: {note}" for note in plan.notes]
    lines += [f"ERROR: {problem}" for problem in report.problems]
    lines += _grouped("FAILED", report.failed, _hint)
    for line in lines:
        print(printable(line), file=sys.stderr)  # remote names may hold terminal escapes
    print(report.summary())


def _grouped(label: str, items, hint) -> list[str]:
    """One line per file, or one per reason that many files share (a read-only folder, a file
    where a folder should be...); ``items`` have ``path`` and ``reason``."""
    by_reason: dict[str, list] = {}
    for item in items:
        by_reason.setdefault(item.reason, []).append(item)
    lines = []
    for reason, group in by_reason.items():
        if len(group) > 3:
            lines.append(f"{label}: {len(group)} files ({group[0].path}, ...): {reason}{hint(group)}")
        else:
            lines += [f"{label}: {item.path}: {reason}{hint([item])}" for item in group]
    return lines


def _hint(failures) -> str:
    if all(f.resumable for f in failures):
        return " (run again to resume)"
    if all(f.retryable for f in failures):
        return " (run again to retry)"
    return ""


def _keep_invoke_out() -> None:
    """Spare the command the import of ``invoke`` (0.1-0.2 s, a third of paramiko's import).

    ``paramiko.config`` imports it only to run ``Match exec`` lines, and moespec reads ssh_config
    itself (``sshconfig``); paramiko takes a failed import as "invoke is not installed". Done only
    in the command's own process, before paramiko is imported, so that library users are unaffected.
    """
    if "paramiko" not in sys.modules:
        sys.modules.setdefault("invoke", None)


def cmd_sync(args: argparse.Namespace) -> int:
    """Run ``moespec sync``."""
    _keep_invoke_out()
    settings = _settings(args)
    from moespec.sync.transport import start_early

    remote, remote_root, _, scopes = settings
    from moespec.sync.listing import list_then_serve_command, new_token

    token, first = new_token(), None
    if args.direction == "pull" and not args.dry_run:  # the session lists, then serves SFTP (session.list_then_serve)
        first = list_then_serve_command(remote_root, scopes, token)
    early = start_early(args.transport or remote.transport, _connect_options(args, remote), first)  # logs in now
    try:
        request = _request(args, *settings, listing_token=token)
        from moespec.sync.session import run_sync

        arrow = "->" if request.direction == "pull" else "<-"
        what = ", ".join(s for s in request.scopes if s) or "everything"
        print(
            f"{request.direction} {request.host}:{request.remote_root} {arrow} {request.local_root} ({what}, "
            f"{request.transport}{', dry run' if request.dry_run else ''})"
        )
    except BaseException:  # run_sync closes the connection from here on; before, nothing else would
        early.close()  # (a reader that went away makes print raise BrokenPipeError)
        raise
    report = run_sync(
        request,
        show_progress=not args.no_progress and sys.stderr.isatty(),
        on_plan=lambda plan: _print_plan(plan, args.verbose, request.dry_run),
        transport=early,
    )
    _print_report(report)
    return EXIT_OK if report.ok and not report.plan.refused else EXIT_FAILED
