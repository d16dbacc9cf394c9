"""The transfer engine: runs a plan's copies over several SFTP channels of one transport.

``run_channels`` starts up to ``EngineSettings.channels`` channel threads (each an SFTP session
on the one connection, see ``sftp_channels``), watches for a stall and collects what each file
became (done, or failed and why). ``WarmChannel`` opens the first channel while the tree is
still being listed.

This module does not import paramiko: a run with nothing to copy never needs the SFTP client,
and the command starts faster without it (``sftp_channels`` is imported when a copy starts).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from moespec.sync.plan import Action

log = logging.getLogger("moespec.sync")


@dataclass(frozen=True)
class EngineSettings:
    """Knobs of the transfer engine.

    Attributes
    ----------
    channels : int
        Most SFTP channels (each with its own thread) on the one connection; a pass uses one
        per ``bytes_per_channel`` of data to move, since each channel start costs a remote
        login shell and one pipelined channel already keeps many small files in flight.
    inflight_bytes : int
        Read requests outstanding per channel, in bytes.
    files_per_channel : int
        Files open at the same time per channel (latency hiding for small files).
    admit_bytes : int
        A channel takes another file only while its open files have fewer bytes left than this,
        so that one channel busy with a large file leaves the small ones to the others.
    stall_timeout : float
        Seconds without any progress after which the connection is torn down.
    fsync : bool
        Flush each file to disk before it gets its final name.
    """

    channels: int = 4
    bytes_per_channel: int = 32 << 20
    inflight_bytes: int = 8 << 20
    files_per_channel: int = 64
    admit_bytes: int = 16 << 20
    stall_timeout: float = 120.0
    fsync: bool = True


@dataclass(frozen=True)
class Failure:
    """A file that was not transferred, why, whether trying again may help, and whether a ``.part`` was kept.

    ``resumable``: what arrived is on disk in a ``.part`` of the same remote version, which the
    next run continues instead of starting over.
    """

    path: str
    reason: str
    retryable: bool = True
    resumable: bool = False


@dataclass
class Outcome:
    """What one pass of the engine did."""

    done: list[Action] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    bytes: int = 0
    connection_error: str | None = None


class Progress:
    """Counters shared by the channel threads; read by the progress bar and the watchdog."""

    def __init__(self) -> None:
        self.bytes = 0
        self.files = 0
        self.last_activity = time.monotonic()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n
        self.last_activity = time.monotonic()

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def file_done(self) -> None:
        with self._lock:
            self.files += 1


class PassState:
    """State of one engine pass shared by all channels."""

    def __init__(self, actions: list[Action], progress: Progress, settings: EngineSettings):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        for action in actions:
            self.jobs.put(action)
        self.progress = progress
        self.settings = settings
        self.outcome = Outcome()
        self.lock = threading.Lock()
        self.aborted = threading.Event()
        self.abort_reason = ""
        self.finisher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sync-finish")

    def exhausted(self) -> bool:
        return self.aborted.is_set() or self.jobs.empty()

    def take(self) -> Action | None:
        if self.aborted.is_set():
            return None
        try:
            return self.jobs.get_nowait()
        except queue.Empty:
            return None

    def succeeded(self, action: Action) -> None:
        with self.lock:
            self.outcome.done.append(action)
        self.progress.file_done()

    def failed(self, path: str, reason: str, retryable: bool = True, resumable: bool = False) -> None:
        with self.lock:
            self.outcome.failed.append(Failure(path, reason, retryable, resumable))


def local_error(error: Exception) -> str:
    """The reason of a local write failure, the same for every file of one folder (so they can be counted).

    ``OSError`` names the file it failed on; the folder is what the user can act on.
    """
    if isinstance(error, OSError) and error.filename is not None:
        return f"cannot write in {os.path.dirname(os.fsdecode(error.filename))}: {error.strerror}"
    return f"cannot write locally: {error}"


def is_plain_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a local file (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# running the channels


class WarmChannel:
    """One SFTP channel opened in the background, e.g. while the remote tree is being listed.

    Starting a channel runs the remote login shell (sshd starts subsystems through it), which
    costs tenths of a second on a cluster with heavy dotfiles; overlapping that with the listing
    takes it off the critical path.
    """

    def __init__(self, transport):
        self._pending = None
        self._discarded = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._open, args=(transport,), daemon=True, name="sync-warm")
        self._thread.start()

    def _open(self, transport) -> None:
        try:
            pending = transport.start_sftp()
        except Exception:  # the engine opens its channels itself and reports what fails
            log.debug("background channel failed", exc_info=True)
            return
        with self._lock:
            pending, self._pending = (pending, None) if self._discarded else (None, pending)
        if pending is not None:
            pending.close()

    def take(self):
        """The channel (once), or None."""
        self._thread.join()
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.finish()
        except Exception:
            log.debug("background channel failed", exc_info=True)
            pending.close()
            return None

    def close(self) -> None:
        """Drop the channel without waiting for it (nothing to copy: do not delay the run)."""
        with self._lock:
            self._discarded = True
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.close()


class ReadyChannel:
    """An SFTP channel that is already open (the listing's own session, ``session.list_then_serve``),
    handed out like a ``WarmChannel``."""

    def __init__(self, pending):
        self._pending = pending
        self._lock = threading.Lock()

    def take(self):
        """The channel (once), or None."""
        with self._lock:
            pending, self._pending = self._pending, None
        return None if pending is None else pending.finish()

    def close(self) -> None:
        """Drop the channel if nobody took it."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.close()


def run_channels(
    transport,
    actions: list[Action],
    settings: EngineSettings,
    make_channel,
    progress: Progress,
    on_tick=None,
    warm: WarmChannel | ReadyChannel | None = None,
) -> Outcome:
    """Run ``actions`` on up to ``settings.channels`` channels, with a stall watchdog.

    Parameters
    ----------
    transport : Transport
        Opens the SFTP channels; aborted when nothing moves for ``stall_timeout`` seconds.
    make_channel : callable
        ``make_channel(sftp, shared)`` returns an object whose ``run()`` works through
        ``shared.take()`` until it returns None.
    on_tick : callable or None
        Called about ten times a second from this thread (the progress bar).
    warm : WarmChannel, ReadyChannel or None
        An already open channel for the first worker.
    """
    shared = PassState(actions, progress, settings)
    errors: list[str] = []

    def worker() -> None:
        sftp = None
        try:
            sftp = (warm.take() if warm is not None else None) or transport.open_sftp()
            make_channel(sftp, shared).run()
        except Exception as e:  # connection-level: recorded, the pass ends, the caller may retry
            log.debug("channel ended by %r", e, exc_info=True)
            errors.append(f"{type(e).__name__}: {e}")
            shared.aborted.set()
        finally:
            if sftp is not None:
                try:
                    sftp.close()
                except Exception:
                    pass

    total = sum(a.size for a in actions)
    n_channels = max(1, min(settings.channels, len(actions), -(-total // settings.bytes_per_channel)))
    threads = [threading.Thread(target=worker, name=f"sync-channel-{i}", daemon=True) for i in range(n_channels)]
    progress.touch()
    bytes_before = progress.bytes
    for thread in threads:
        thread.start()
    while alive := [thread for thread in threads if thread.is_alive()]:
        alive[0].join(0.1)
        if on_tick is not None:
            on_tick()
        if time.monotonic() - progress.last_activity > settings.stall_timeout and not shared.aborted.is_set():
            shared.abort_reason = f"no progress for {settings.stall_timeout:.0f} s; connection torn down"
            errors.insert(0, shared.abort_reason)
            shared.aborted.set()
            transport.abort()
    for thread in threads:
        thread.join()
    shared.finisher.shutdown(wait=True)
    outcome = shared.outcome
    if errors:
        outcome.connection_error = errors[0]
        attempted = {a.path for a in outcome.done} | {f.path for f in outcome.failed}
        for action in actions:
            if action.path not in attempted:
                outcome.failed.append(Failure(action.path, "not transferred: " + errors[0], retryable=True))
    outcome.bytes = progress.bytes - bytes_before
    return outcome
