"""Whether a Hugging Face hub model or dataset can be used here: in the local cache, or downloadable.

Asked before anything is computed (``moespec validate``, and by the embed stage before it loads a
model), so that a model missing from the cache of an offline compute node is one clear line at
once, instead of a minute of network retries and a traceback after the job has started. The hub
is asked at most once per name, with a deadline of a few seconds; nothing here downloads.

How to fill the cache is in ``hpc/README.md`` ("Offline model and dataset caches").
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Literal, Optional

#: Seconds the hub may take to answer whether a repository exists.
HUB_DEADLINE_S = 4.0

RepoType = Literal["model", "dataset"]


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the network (in the environment, or as huggingface_hub read it)."""
    from huggingface_hub import constants

    return _truthy("HF_HUB_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache() -> Path:
    """The hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def datasets_cache() -> Path:
    """The cache of prepared datasets: ``HF_DATASETS_CACHE``, else ``HF_HOME/datasets``, else the default."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "datasets"
    return hub_cache().parent / "datasets"


def is_cached(repo_id: str, repo_type: RepoType, revision: Optional[str] = None) -> bool:
    """Whether the cache holds the repository (a model's ``config.json`` at ``revision``; any dataset files)."""
    if repo_type == "model":
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache(), revision=revision or "main")
        return isinstance(found, str)
    hub_folder = hub_cache() / ("datasets--" + repo_id.replace("/", "--")) / "snapshots"
    prepared = datasets_cache() / repo_id.replace("/", "___")
    return (hub_folder.is_dir() and any(hub_folder.iterdir())) or prepared.is_dir()


def ask_hub(
    repo_id: str, repo_type: RepoType, revision: Optional[str] = None, deadline_s: float = HUB_DEADLINE_S
) -> tuple[Literal["found", "missing", "gated", "unreachable"], str]:
    """Ask the hub whether the repository exists, waiting at most ``deadline_s`` seconds.

    Returns
    -------
    state : {"found", "missing", "gated", "unreachable"}
    detail : str
        The reason when not found (the hub's error, or the deadline).
    """
    answer: list[tuple] = []

    def ask() -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        api = HfApi()
        info = api.model_info if repo_type == "model" else api.dataset_info
        try:
            info(repo_id, revision=revision, timeout=deadline_s)
            answer.append(("found", ""))
        except GatedRepoError as e:
            answer.append(("gated", _first_line(e)))
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            answer.append(("missing", _first_line(e)))
        except Exception as e:  # noqa: BLE001 - any network failure means "cannot tell from here"
            answer.append(("unreachable", f"{type(e).__name__}: {_first_line(e)}"))

    # A daemon thread: a hub that never answers must not hold up validation or the interpreter's exit.
    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(deadline_s)
    return answer[0] if answer else ("unreachable", f"no answer within {deadline_s:g} s")


def availability_problem(repo_id: str, repo_type: RepoType, revision: Optional[str] = None) -> Optional[str]:
    """None when the repository can be loaded here, else one sentence saying why and what to do."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return f"{repo_id!r} is neither an existing folder nor a hub name ('name' or 'owner/name')"
    if is_cached(repo_id, repo_type, revision):
        return None
    what = f"{repo_type} {repo_id!r}" + (f" (revision {revision})" if revision else "")
    fetch = (
        f"hf download {repo_id}"
        + (" --repo-type dataset" if repo_type == "dataset" else "")
        + (f" --revision {revision}" if revision else "")
    )
    where = f"the cache {hub_cache() if repo_type == 'model' else datasets_cache()}"
    if offline() or (repo_type == "dataset" and _truthy("HF_DATASETS_OFFLINE")):
        return (
            f"{what} is not in {where}, and HF_HUB_OFFLINE is set so it cannot be downloaded: fetch it on a "
            f"machine with internet into the same HF_HOME (`{fetch}`; see hpc/README.md)"
        )
    state, detail = ask_hub(repo_id, repo_type, revision)
    if state == "found":
        return None
    if state == "missing":
        return f"{what} is not in {where} and the hub has no such {repo_type} ({detail}); check the name"
    if state == "gated":
        return f"{what} is gated: accept its terms on huggingface.co, then `hf auth login` ({detail})"
    return (
        f"{what} is not in {where} and the hub cannot be reached ({detail}): fetch it on a machine with "
        f"internet into the same HF_HOME (`{fetch}`), then run with HF_HUB_OFFLINE=1 (see hpc/README.md)"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
