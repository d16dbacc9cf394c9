"""One sync run, top to bottom: connect, list both sides, plan, transfer, retry, report.

``run_sync`` is what ``moespec sync`` calls and what the tests and the benchmark call directly.
A pass that loses the connection or meets a file that changed while being read is retried
(re-listed and re-planned, so finished files are skipped and kept ``.part`` files resumed), up to
``retries`` times with a short back-off, as a flaky network deserves.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from moespec.errors import SyncError
from moespec.sync import engine
from moespec.sync.engine import EngineSettings, Failure, Outcome, Progress
from moespec.sync.filters import Filters
from moespec.sync.listing import (
    LISTING_PROBE,
    Listing,
    find_command,
    list_local,
    list_then_serve_command,
    list_then_serve_endings,
    new_token,
    parse_find_output,
    parse_list_then_serve,
    remote_bytes,
    remote_join,
    walk_sftp,
)
from moespec.sync.paths import LocalRoot, check_relpath, hidden_name, printable
from moespec.sync.plan import Action, Plan, Skip, checksum_candidates, plan_sync
from moespec.sync.transport import ConnectOptions, Transport, TransportKind, connect

log = logging.getLogger("moespec.sync")

Direction = Literal["pull", "push"]
#: Hashing a large file prints nothing until it is done.
_CHECKSUM_TIMEOUT = 3600.0


@dataclass(frozen=True)
class SyncRequest:
    """Everything one sync needs.

    Attributes
    ----------
    direction : {"pull", "push"}
        ``pull``: remote -> local (``--from-hpc``); ``push``: local -> remote (``--to-hpc``).
    scopes : tuple of str
        Paths relative to both roots that are synced (experiments, or project folders); ``""``
        is the whole root.
    max_delete : float
        With ``delete``: the largest share of an experiment's destination files that may be
        deleted without ``force`` (see ``plan.plan_sync``).
    listing_token : str
        Random marker of the listing's trailers (``listing.list_then_serve_command``); the command
        passes its own when the transport already started that listing.
    """

    direction: Direction
    host: str
    remote_root: str
    local_root: Path
    scopes: tuple[str, ...] = ("",)
    filters: Filters = field(default_factory=Filters.build)
    transport: TransportKind = "paramiko"
    dry_run: bool = False
    checksum: bool = False
    delete: bool = False
    force: bool = False
    max_delete: float = 0.5
    ssh_config: Path | None = None
    known_hosts: tuple[Path, ...] | None = None
    engine: EngineSettings = field(default_factory=EngineSettings)
    retries: int = 2
    connect_timeout: float = 20.0
    interactive: bool = False
    listing_token: str = field(default_factory=new_token)

    def connect_options(self) -> ConnectOptions:
        return ConnectOptions(self.host, self.ssh_config, self.known_hosts, self.connect_timeout, self.interactive)


@dataclass
class SyncReport:
    """What a sync did (or, with ``dry_run``, would do)."""

    request: SyncRequest
    plan: Plan | None = None
    files: int = 0
    bytes: int = 0
    links: int = 0
    touched: int = 0
    deleted: int = 0
    failed: list[Failure] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    attempts: int = 0
    listing_method: str = ""
    transport: str = ""

    @property
    def ok(self) -> bool:
        """No file failed and nothing the user asked for was missing."""
        return not self.failed and not self.problems

    def summary(self) -> str:
        """One line: files, bytes, skipped, time."""
        plan = self.plan or Plan()
        verb = {"pull": "pulled", "push": "pushed"}[self.request.direction]
        if self.request.dry_run:
            verb = f"would have {verb}"
            files, size = len(plan.copies), plan.bytes
            links, touched, deleted = len(plan.links), len(plan.touches), len(plan.deletes)
        else:
            files, size = self.files, self.bytes
            links, touched, deleted = self.links, self.touched, self.deleted
        rate = f", {_human(size / self.seconds)}/s" if self.seconds > 0 and size and not self.request.dry_run else ""
        parts = [
            f"{verb} {files} file{'s' if files != 1 else ''} ({_human(size)}) in {self.seconds:.2f} s{rate}",
            f"{plan.unchanged} unchanged",
            f"{plan.excluded} excluded",
        ]
        for count, label in (
            (len(plan.kept), "kept"),
            (len(plan.refused), "refused"),
            (links, "links"),
            (touched, "mtimes set"),
            (deleted, "deleted"),
            (len(self.failed), "failed"),
        ):
            if count:
                parts.append(f"{count} {label}")
        return "; ".join(parts)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------------------------------
# listings


def remote_listing(transport: Transport, root: str, scopes: tuple[str, ...], timeout: float = 120.0) -> Listing:
    """List the remote scopes in one round trip (``find``), or by an SFTP walk if that fails."""
    result = transport.run(find_command(root, scopes), timeout=timeout)
    try:
        listing = parse_find_output(result.stdout, root, scopes)
    except ValueError as e:
        listing, reason = None, str(e)
    else:
        errors = [line for line in result.error_text.splitlines() if line.strip()]
        found_any = len(listing.missing) < len(scopes)
        only_missing = errors and all("No such file or directory" in line for line in errors)
        if result.status == 0 or found_any or only_missing:
            listing.warnings += [line for line in errors if "No such file or directory" not in line]
            return listing
        reason = result.error_text or f"status {result.status}"
    log.warning(
        "remote `find` listing unavailable (%s); walking the tree over SFTP instead (slower)", printable(reason)
    )
    sftp = transport.open_sftp()
    try:
        return walk_sftp(sftp, root, scopes)
    finally:
        sftp.close()


def list_then_serve(
    transport: Transport, root: str, scopes: tuple[str, ...], timeout: float = 120.0, token: str | None = None
) -> tuple[Listing, engine.ReadyChannel | None] | None:
    """List the remote scopes and keep the session as an SFTP channel (``list_then_serve_command``).

    Returns the listing and the channel (None when the server has no ``sftp-server`` where
    OpenSSH installs it), or None when this did not work out cleanly (no such command, a find
    error, a missing scope...): the caller then lists with ``remote_listing``, which reports
    every such case precisely. ``token`` (default: a new random one) marks the trailers.
    """
    token = token or new_token()
    stream = transport.start_stream(list_then_serve_command(root, scopes, token))
    if stream is None:
        return None
    try:
        stream.settimeout(timeout)
        _send_all(stream, LISTING_PROBE)
        data = _read_through(stream, list_then_serve_endings(token))
        listing, status, serving = parse_list_then_serve(data, root, scopes, token)
        if status == 0 and serving:
            return listing, engine.ReadyChannel(transport.sftp_over(stream))
    except Exception as e:  # anything odd: close this session and list the proven way
        log.debug("listing with an SFTP server on the same session failed: %r", e)
        status = -1
    stream.close()
    return (listing, None) if status == 0 else None


def _send_all(stream, data: bytes) -> None:
    while data:
        data = data[stream.send(data) :]


def _read_through(stream, endings: tuple[bytes, ...]) -> bytes:
    """Read ``stream`` until its output ends with one of ``endings`` (or EOF)."""
    data = bytearray()
    while not data.endswith(endings):
        chunk = stream.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def parse_sha256sum(output: bytes, root: str) -> dict[str, str]:
    """``sha256sum`` output -> {path relative to ``root``: hex digest}.

    GNU coreutils escapes names that contain a backslash or a newline and marks the line with a
    leading backslash.
    """
    sums = {}
    prefix = root.rstrip("/") + "/"
    for line in output.decode("utf-8", "surrogateescape").split("\n"):
        escaped = line.startswith("\\")
        line = line[1:] if escaped else line
        if len(line) < 67 or line[64:66] not in ("  ", " *"):
            continue
        name = line[66:]
        if escaped:
            name = name.replace("\\n", "\n").replace("\\\\", "\\")
        if name.startswith(prefix):
            sums[name[len(prefix) :]] = line[:64]
    return sums


def remote_checksums(transport: Transport, root: str, paths: list[str]) -> dict[str, str]:
    """SHA-256 of remote files, computed on the remote in one command."""
    if not paths:
        return {}
    names = b"".join(remote_bytes(remote_join(root, p)) + b"\0" for p in paths)
    result = transport.run("xargs -0 sha256sum --", stdin=names, timeout=_CHECKSUM_TIMEOUT)
    sums = parse_sha256sum(result.stdout, root)
    if not sums and result.status != 0:
        raise SyncError(f"--checksum needs `xargs` and `sha256sum` on the remote: {result.error_text}")
    return sums


def local_checksums(root: Path, paths: list[str]) -> dict[str, str]:
    local = LocalRoot(root)
    return {p: engine.sha256_file(local.path(p)) for p in paths}


# --------------------------------------------------------------------------------------------------
# applying a plan


def _apply_local_actions(plan: Plan, local: LocalRoot, report: SyncReport) -> list[Failure]:
    """Links and mtimes on the local side (pull); returns what could not be done."""
    failures = []
    for action in plan.links:
        try:
            _make_link(local, action.path, action.source.target)
        except (OSError, SyncError) as e:  # e.g. no symlink privilege on Windows, a planted link
            failures.append(Failure(action.path, f"cannot create the link: {e}", retryable=False))
            continue
        report.links += 1
    for action in plan.touches:
        try:
            os.utime(local.path(action.path), (action.source.mtime, action.source.mtime), follow_symlinks=False)
        except OSError as e:
            failures.append(Failure(action.path, f"cannot set the mtime: {e.strerror}", retryable=False))
            continue
        report.touched += 1
    return failures


def _make_link(local: LocalRoot, path: str, target: str) -> None:
    """Create (or replace) the link ``path`` -> ``target`` atomically, if it resolves inside the root."""
    final = local.check_parent(path)
    if not local.link_stays_inside(final, target):
        raise SyncError(f"'{target}' would leave {local.root} through a link that is already there")
    temporary = final.with_name(hidden_name(final.name, ".linktmp"))  # a long name must not overflow NAME_MAX
    if os.path.lexists(temporary):
        os.unlink(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, final)  # atomic, also over an older link


def _remove_stale_parts(plan: Plan, request: SyncRequest, local: LocalRoot, transport: Transport) -> None:
    """Partial files of versions that will never be resumed (they are ours: no --delete needed)."""
    if not plan.stale_parts:
        return
    if request.direction == "pull":
        for path in plan.stale_parts:
            try:
                os.unlink(local.path(path))
            except OSError:
                pass
        return
    sftp = transport.open_sftp()
    try:
        for path in plan.stale_parts:
            try:
                sftp.remove(remote_bytes(remote_join(request.remote_root, path)))
            except OSError:
                pass
    finally:
        sftp.close()


def _apply_local_deletes(plan: Plan, local: LocalRoot, report: SyncReport) -> None:
    for action in plan.deletes:
        path = local.path(action.path)
        try:
            if action.dest.kind == "dir":
                os.rmdir(path)
            else:
                os.unlink(path)
            report.deleted += 1
        except OSError as e:  # a folder that still holds excluded files stays
            log.info("not deleted: %s (%s)", printable(str(path)), e.strerror)


def _apply_remote_actions(plan: Plan, transport: Transport, root: str, report: SyncReport) -> None:
    """mtimes and deletions on the remote side (push). Links are not pushed."""
    if not (plan.touches or plan.deletes):
        return
    sftp = transport.open_sftp()
    try:
        for action in plan.touches:
            sftp.utime(remote_bytes(remote_join(root, action.path)), (action.source.mtime_s, action.source.mtime_s))
            report.touched += 1
        for action in plan.deletes:
            path = remote_join(root, action.path)
            try:
                sftp.rmdir(remote_bytes(path)) if action.dest.kind == "dir" else sftp.remove(remote_bytes(path))
                report.deleted += 1
            except OSError as e:
                log.info("not deleted on the remote: %s (%s)", printable(path), e)
    finally:
        sftp.close()


def _progress_bar(total: int, description: str, enabled: bool, progress: Progress, n_files: int):
    """A tqdm bar (bytes, rate, ETA) and the tick function that feeds it from ``progress``."""
    if not enabled:  # no terminal: not even the import (start-up time counts on small pulls)
        return _NoBar(), lambda: None
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=description,
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
    )
    start_bytes, start_files = progress.bytes, progress.files

    def tick() -> None:
        bar.update(progress.bytes - start_bytes - bar.n)
        bar.set_postfix_str(f"{progress.files - start_files}/{n_files} files", refresh=False)

    return bar, tick


class _NoBar:
    def close(self) -> None:
        pass


def _transfer(
    plan: Plan,
    request: SyncRequest,
    transport: Transport,
    progress: Progress,
    show_progress: bool,
    expected_sums: dict[str, str],
    warm: engine.WarmChannel | engine.ReadyChannel | None,
) -> Outcome:
    from moespec.sync import sftp_channels  # paramiko: only once there is something to copy

    local = LocalRoot(request.local_root)
    if request.direction == "pull":

        def make_channel(sftp, shared):
            return sftp_channels.PullChannel(sftp, shared, local, request.remote_root, expected_sums)
    else:
        folders: set[str] = set()
        lock = threading.Lock()

        def make_channel(sftp, shared):
            return sftp_channels.PushChannel(sftp, shared, local, request.remote_root, folders, lock)

    bar, tick = _progress_bar(
        plan.bytes, f"{request.direction} {request.host}", show_progress, progress, len(plan.copies)
    )
    try:
        return engine.run_channels(transport, plan.copies, request.engine, make_channel, progress, tick, warm)
    finally:
        tick()
        bar.close()


def _remote_side(request: SyncRequest, transport: Transport, channel: bool):
    """The remote listing and, with ``channel``, an SFTP channel for the transfers (or None).

    A pull lists and then serves SFTP on one session (``list_then_serve``); otherwise, or when
    that fails, the channel is opened in the background while ``find`` runs (``WarmChannel``).
    """
    root, scopes, timeout = request.remote_root, request.scopes, request.engine.stall_timeout
    if channel and request.direction == "pull":
        served = list_then_serve(transport, root, scopes, timeout, request.listing_token)
        if served is not None:
            return served
    warm = engine.WarmChannel(transport) if channel else None
    try:
        return remote_listing(transport, root, scopes, timeout), warm
    except BaseException:
        if warm is not None:
            warm.close()
        raise


def _plan(request: SyncRequest, transport: Transport, channel: bool):
    """List both sides and plan.

    Returns the plan, the source checksums, the listing method, one line per folder that could
    not be read (on either side), and, with ``channel``, an SFTP channel for the copies (a
    ``WarmChannel`` or ``ReadyChannel``, or None; the caller closes it).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-list-local") as pool:
        local_listed = pool.submit(list_local, request.local_root, request.scopes)  # while the remote answers
        remote, warm = _remote_side(request, transport, channel)
    try:
        return (*_plan_from_listings(request, transport, remote, local_listed.result()), warm)
    except BaseException:
        if warm is not None:
            warm.close()
        raise


def _plan_from_listings(request: SyncRequest, transport: Transport, remote: Listing, local: Listing):
    """``_plan``'s plan, source checksums, listing method and unreadable folders from the two listings."""
    unreadable = [f"on {request.host}: {line}" for line in remote.warnings]
    unreadable += [f"here: {line}" for line in local.warnings]
    source, dest = (remote, local) if request.direction == "pull" else (local, remote)
    sums = None
    source_sums: dict[str, str] = {}
    if request.checksum:
        candidates = checksum_candidates(source, dest, request.filters)
        remote_sums = remote_checksums(transport, request.remote_root, candidates)
        local_sums = local_checksums(request.local_root, candidates)
        sums = (remote_sums, local_sums) if request.direction == "pull" else (local_sums, remote_sums)
        source_sums = sums[0]
    plan = plan_sync(
        source,
        dest,
        request.filters,
        delete=request.delete,
        force=request.force,
        max_delete=request.max_delete,
        checksums=sums,
    )
    if request.direction == "push":
        plan.kept += [Skip(a.path, "links are not pushed") for a in plan.links]
        plan.links = []
    return plan, source_sums, remote.method, unreadable


def _missing_problems(request: SyncRequest, plan: Plan) -> list[str]:
    """What the user asked for that the source side does not have."""
    if request.direction == "pull":
        where = f"under {request.remote_root} on {request.host}"
    else:
        where = f"under {request.local_root}"
    return [f"{scope or 'the root'}: not found {where}" for scope in plan.missing]


def _check_local_root(request: SyncRequest) -> None:
    """One clear error, before connecting, when the local root cannot serve (not one per file later).

    A pull needs a folder it can write in (or a writable folder to create it in); a push needs a
    folder to read. A root that is a link to a folder is fine.
    """
    root = Path(request.local_root)
    if os.path.lexists(root) and not os.path.isdir(root):
        raise SyncError(f"local root {root}: exists and is not a folder")
    if request.direction == "push":
        if not os.path.isdir(root):
            raise SyncError(f"local root {root}: no such folder")
        return
    if request.dry_run:
        return
    existing = root.absolute()
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        raise SyncError(f"local root {root}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only_mount(existing) else "permission denied"
        raise SyncError(f"local root {root}: cannot write in {existing} ({why})")


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def run_sync(
    request: SyncRequest,
    *,
    show_progress: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    transport: Transport | None = None,
) -> SyncReport:
    """Carry out one sync and report what happened.

    Parameters
    ----------
    request : SyncRequest
    show_progress : bool
        Draw a progress bar (bytes, rate, ETA) on stderr.
    on_plan : callable or None
        Called with the first plan, before anything is transferred (the CLI prints it).
    transport : Transport or None
        A connection already under way for ``request`` (``transport.start_early``); closed here.

    Raises
    ------
    SyncError
        The host cannot be reached or refused us; files that fail are in the report instead.
    """
    started = time.monotonic()
    try:
        for scope in request.scopes:
            if scope:
                check_relpath(scope)
        _check_local_root(request)
        transport = transport or connect(request.transport, request.connect_options())
        transport.ready()
    except BaseException:
        if transport is not None:
            transport.close()
        raise
    report = SyncReport(request)
    progress = Progress()
    report.transport = transport.description
    log.debug("connected to %s in %.2f s", transport.description, time.monotonic() - started)
    try:
        for attempt in range(request.retries + 1):
            report.attempts = attempt + 1
            plan, source_sums, report.listing_method, unreadable, warm = _plan(
                request, transport, channel=not request.dry_run
            )
            log.debug("listed and planned at %.2f s: %d copies", time.monotonic() - started, len(plan.copies))
            if report.plan is None:
                report.plan = plan
                report.problems = _missing_problems(request, plan) + unreadable + plan.deletes_refused
                if on_plan is not None:
                    on_plan(plan)
            if request.dry_run:
                break
            outcome = _run_pass(plan, request, transport, progress, show_progress, source_sums, report, warm)
            retryable = [f for f in outcome.failed if f.retryable]
            if not retryable or attempt == request.retries:
                report.failed = outcome.failed
                break
            log.warning(
                "%d file(s) to retry (%s); attempt %d of %d",
                len(retryable),
                printable(retryable[0].reason),
                attempt + 2,
                request.retries + 1,
            )
            time.sleep(min(2.0**attempt, 10.0))
            if outcome.connection_error is not None:
                transport.close()
                transport = connect(request.transport, request.connect_options())
    finally:
        log.debug("closing at %.2f s", time.monotonic() - started)
        transport.close()
    report.seconds = time.monotonic() - started
    return report


def _run_pass(
    plan: Plan,
    request: SyncRequest,
    transport: Transport,
    progress: Progress,
    show_progress: bool,
    source_sums: dict[str, str],
    report: SyncReport,
    warm: engine.WarmChannel | engine.ReadyChannel | None,
) -> Outcome:
    """Apply one plan: links and mtimes, the copies, then deletions."""
    local = LocalRoot(request.local_root)
    _remove_stale_parts(plan, request, local, transport)
    link_failures = _apply_local_actions(plan, local, report) if request.direction == "pull" else []
    expected = {a.path: source_sums[a.path] for a in plan.copies if a.path in source_sums}
    try:
        outcome = (
            _transfer(plan, request, transport, progress, show_progress, expected, warm) if plan.copies else Outcome()
        )
    finally:
        if warm is not None:  # unused when nothing had to be copied (or when the first worker did not need it)
            warm.close()
    outcome.failed += link_failures
    log.debug("transfer pass done: %d files, %d bytes", len(outcome.done), outcome.bytes)
    report.files += len(outcome.done)
    report.bytes += outcome.bytes
    if outcome.connection_error is None:
        if request.direction == "pull":
            _apply_local_deletes(plan, local, report)
        else:
            _apply_remote_actions(plan, transport, request.remote_root, report)
    return outcome


def describe_action(action: Action) -> str:
    """One line of the itemised (dry-run / verbose) plan, names escaped (``paths.printable``)."""
    path = printable(action.path)
    if action.kind == "copy":
        return f"copy    {path}  ({_human(action.size)}, {action.reason})"
    if action.kind == "link":
        return f"link    {path} -> {printable(action.source.target)}  ({action.reason})"
    if action.kind == "touch":
        return f"touch   {path}  ({action.reason})"
    return f"delete  {path}"
