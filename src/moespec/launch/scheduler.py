"""The few Slurm commands moespec calls itself (submitit calls ``sbatch`` and ``scancel`` for jobs).

Every call goes through :func:`run_slurm`, which retries a flaky scheduler (slurmctld busy,
slurmdbd restarting) with a short backoff and logs each retry, as submitit does for ``sacct``
("Bypassing sacct error"). Callers treat a scheduler that stays unreachable as "unknown", not
as a fatal error, except where submitting depends on the answer.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass

from moespec.errors import ClusterError

log = logging.getLogger("moespec.slurm")

#: Seconds to wait before each retry of a failed scheduler command.
RETRY_DELAYS_S = (1.0, 3.0)

#: sacct states of jobs that will still run (or are running); everything else is final.
RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}
PENDING_STATES = {
    "PENDING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SUSPENDED",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
    "STOPPED",
}


def available() -> bool:
    """Whether Slurm's client commands are on PATH (the scheduler may still be down)."""
    return shutil.which("sbatch") is not None and shutil.which("sacct") is not None


def first_line(text: str) -> str:
    """The first non-empty line of a (possibly multi-line) error, with a count of the rest."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (f" (+{len(lines) - 1} more line(s))" if len(lines) > 1 else "")


def run_slurm(args: list[str], *, retries: int = len(RETRY_DELAYS_S), timeout_s: float = 60.0) -> str:
    """Run a Slurm command and return its stdout, retrying failures.

    Raises
    ------
    ClusterError
        The command is missing, or still fails after the retries (message: its stderr).
    """
    if shutil.which(args[0]) is None:
        raise ClusterError(f"{args[0]}: command not found (is this a Slurm login node?)")
    delays = list(RETRY_DELAYS_S[:retries])
    while True:
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode == 0:
                return done.stdout
            problem = first_line(done.stderr or done.stdout) or f"exit status {done.returncode}"
        except subprocess.TimeoutExpired:
            problem = f"no answer within {timeout_s:.0f} s"
        if not delays:
            raise ClusterError(f"`{' '.join(args[:3])}...` failed: {problem}")
        delay = delays.pop(0)
        log.warning("%s failed (%s); retrying in %.0f s", args[0], problem, delay)
        time.sleep(delay)


def reachable(retries: int = 0, timeout_s: float = 10.0) -> tuple[bool, str]:
    """Whether the controller answers ``scontrol ping``, and its problem in one line if not."""
    try:
        run_slurm(["scontrol", "ping"], retries=retries, timeout_s=timeout_s)
    except ClusterError as e:
        return False, str(e)
    return True, ""


def max_array_size() -> int | None:
    """The scheduler's MaxArraySize, or None when it cannot be asked."""
    try:
        text = run_slurm(["scontrol", "show", "config"], retries=1)
    except ClusterError as e:
        log.info("MaxArraySize unknown (%s); using the profile's", e)
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def partitions() -> list[str] | None:
    """Partition names the scheduler has, or None when it cannot be asked."""
    try:
        text = run_slurm(["sinfo", "-h", "-o", "%R"], retries=1)
    except ClusterError as e:
        log.info("partitions unknown (%s)", e)
        return None
    return sorted({line.strip() for line in text.splitlines() if line.strip()})


@dataclass(frozen=True)
class JobState:
    """What the scheduler says about one array task (or job).

    ``ending`` is the final state (from sacct) of a job whose processes are still being ended
    (``COMPLETING``, e.g. a task that ignores SIGTERM for ``KillWait`` seconds after ``scancel``).
    """

    job_id: str
    state: str  # e.g. "RUNNING", "CANCELLED" (the "by <uid>" suffix removed)
    exit_code: str = ""
    reason: str = ""
    ending: str = ""

    @property
    def phase(self) -> str:
        """``running``, ``pending`` or ``finished``."""
        if self.state in RUNNING_STATES:
            return "running"
        if self.state in PENDING_STATES:
            return "pending"
        return "finished"


def expand_job_ids(job_id: str) -> list[str]:
    """``"12_[3-5,7%2]"`` -> ``["12_3", "12_4", "12_5", "12_7"]``; other ids unchanged."""
    if "_[" not in job_id:
        return [job_id]
    main, _, rest = job_id.partition("_[")
    ranges = rest.rstrip("]").split("%")[0]
    ids: list[str] = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        ids += [f"{main}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids


def parse_sacct(text: str) -> dict[str, JobState]:
    """Parse ``sacct -X -n -P -o JobID,State,ExitCode,Reason`` output into states by job id."""
    states: dict[str, JobState] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 2 or not fields[0] or "." in fields[0]:
            continue
        state = fields[1].split()[0] if fields[1].strip() else "UNKNOWN"
        exit_code = fields[2] if len(fields) > 2 else ""
        reason = fields[3] if len(fields) > 3 else ""
        for job_id in expand_job_ids(fields[0]):
            states[job_id] = JobState(job_id, state, exit_code, reason)
    return states


def job_states(array_ids: list[str]) -> dict[str, JobState] | None:
    """States of every task of the given arrays (one sacct call), or None when sacct cannot answer.

    sacct shows the latest attempt of a requeued job; ``-X`` leaves out job steps.
    """
    if not array_ids:
        return {}
    try:
        text = run_slurm(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Reason", "-j", ",".join(sorted(set(array_ids)))]
        )
    except ClusterError as e:
        log.warning("cannot read job states from sacct: %s", e)
        return None
    return parse_sacct(text)


def parse_squeue(text: str) -> dict[str, JobState]:
    """Parse ``squeue -t all -r -h -o "%i|%T|%r"`` output into states by job id."""
    states: dict[str, JobState] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) >= 2 and fields[0]:
            for job_id in expand_job_ids(fields[0]):
                states[job_id] = JobState(job_id, fields[1].strip(), "", fields[2] if len(fields) > 2 else "")
    return states


def live_states(array_ids: list[str]) -> dict[str, JobState] | None:
    """The controller's own view of the given arrays (``squeue``: no accounting lag), or None.

    squeue knows jobs until ``MinJobAge`` after they end (300 s by default); it fails when none of
    the ids is known any more, and then sacct alone is right.
    """
    if not array_ids:
        return {}
    try:
        text = run_slurm(
            ["squeue", "-t", "all", "-r", "-h", "-o", "%i|%T|%r", "-j", ",".join(sorted(set(array_ids)))], retries=0
        )
    except ClusterError as e:
        log.info("squeue does not know these jobs (%s); using sacct alone", e)
        return None
    return parse_squeue(text)


def merge_states(accounted: dict[str, JobState], live: dict[str, JobState] | None) -> dict[str, JobState]:
    """sacct's states corrected by the controller's live view.

    sacct lags (slurmdbd stores records asynchronously: a task cancelled while pending reads
    PENDING for seconds) and says CANCELLED as soon as ``scancel`` runs, while the task's
    processes may still run for ``KillWait`` seconds (COMPLETING). Where squeue knows a job, its
    state wins; a job sacct calls pending or running that squeue no longer lists was removed from
    the queue (a pending array task cancelled on its own leaves no record at all).
    """
    if live is None:
        return dict(accounted)
    merged = dict(accounted)
    for job_id, state in accounted.items():
        if job_id not in live and state.phase != "finished":
            merged[job_id] = JobState(job_id, "CANCELLED", state.exit_code, "no longer queued")
    for job_id, state in live.items():
        recorded = accounted.get(job_id)
        if state.state == "COMPLETING":
            ending = recorded.state if recorded is not None and recorded.phase == "finished" else ""
            merged[job_id] = JobState(job_id, "COMPLETING", "", state.reason, ending)
        elif recorded is not None and recorded.state == state.state:  # sacct's has the exit code
            merged[job_id] = JobState(job_id, state.state, recorded.exit_code, state.reason or recorded.reason)
        else:
            merged[job_id] = state
    return merged


def cancel(job_ids: list[str]) -> None:
    """Cancel jobs or whole arrays (errors are logged: a job may have ended meanwhile)."""
    if not job_ids:
        return
    try:
        run_slurm(["scancel", *job_ids])
    except ClusterError as e:
        log.warning("scancel %s: %s", " ".join(job_ids), e)
