"""Loading a model and its tokenizer: by HF name, local folder, or ``builtin:`` name.

Models load through ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained`` (the base
model, without a task head: its hidden states are what we embed), on CUDA when present else on
the CPU, in eval mode, with ``trust_remote_code`` off unless asked for.

Running offline on a cluster
----------------------------
Compute nodes usually cannot reach the internet. Fetch models and datasets once on a login node
into a cache on a shared file system, then run the jobs offline from the same cache::

    # login node (has internet)
    export HF_HOME=/scratch/$USER/hf           # models and datasets land here
    hf download meta-llama/Llama-3.2-1B --revision main   # huggingface_hub's CLI
    python -c "import datasets; datasets.load_dataset('stanfordnlp/imdb', split='train')"

    # job script (compute node, no internet); more in hpc/README.md
    export HF_HOME=/scratch/$USER/hf
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1    # never try the network; fail fast instead
    moespec run embed --config exp.yaml --task $SLURM_ARRAY_TASK_ID

A model given as a local folder (``embed.model.name: /scratch/me/models/my-bert``) needs no
cache at all. Gated models (LLaMA) need ``hf auth login`` on the login node first; pin
``embed.model.revision`` to a commit so every job reads the same weights. The built-in models
are built into ``$MOESPEC_CACHE`` (default ``~/.cache/moespec``) on first use and need no
network either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from moespec.embedding.builtin import BUILTIN_MODELS, builtin_model_dir, is_builtin
from moespec.errors import ConfigError

_log = logging.getLogger("moespec")


def offline_hint() -> str:
    """What to do when a hub model cannot be loaded, said once and only where it applies."""
    from moespec.hub import offline

    if offline():
        return (
            "HF_HUB_OFFLINE is set: fetch the whole model on a machine with internet into the same HF_HOME "
            "(see hpc/README.md)."
        )
    return (
        "If this machine has no internet, fetch the model on one that has into the same HF_HOME and run with "
        "HF_HUB_OFFLINE=1 (see hpc/README.md)."
    )


@dataclass
class LoadedModel:
    """A model ready to embed with, and what to record about it.

    Attributes
    ----------
    model : torch.nn.Module
        The base model (the encoder of an encoder-decoder model), in eval mode on ``device``.
    tokenizer : transformers tokenizer
        With a pad token (eos when the model ships without one, as LLaMA does).
    name : str
        As requested (``"builtin:tiny-bert"``, ``"roberta-base"``, a folder).
    revision : str or None
        As requested.
    commit : str
        The resolved commit of a hub model ("" when unknown, e.g. for a local folder).
    device : str
    dtype : torch.dtype
        Compute dtype of the weights.
    """

    model: Any
    tokenizer: Any
    name: str
    revision: Optional[str]
    commit: str
    device: str
    dtype: Any


def resolve_device(requested: str, default: str = "cpu") -> str:
    """``"auto"`` -> ``default`` (the runner's choice: cuda when available); check that cuda exists.

    Raises
    ------
    ConfigError
        ``requested="cuda"`` but torch sees no GPU.
    """
    import torch

    device = default if requested == "auto" else requested
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"embed.model.device: {requested!r} asks for a GPU but torch sees none "
            f"(torch {torch.__version__}); use 'auto' or 'cpu'"
        )
    return device


def resolve_dtype(requested: str, device: str) -> Any:
    """Compute dtype: ``"auto"`` is bfloat16 on a GPU (A100/H100 class) and float32 on the CPU."""
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, requested)


def load_model(
    name: str,
    *,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    device: str = "cpu",
    log: logging.Logger = _log,
) -> LoadedModel:
    """Load a model and its tokenizer for embedding.

    Parameters
    ----------
    name : str
        ``"builtin:tiny-bert"`` / ``"builtin:tiny-llama"``, a hub name, or a local folder.
    revision : str, optional
        Branch, tag or commit of a hub model.
    trust_remote_code : bool
        Allow the model repository's own Python code to run (off by default: it is arbitrary code).
    dtype : {"auto", "float32", "bfloat16", "float16"}
    device : str
        Resolved device (``"cpu"``, ``"cuda"``); see :func:`resolve_device`.

    Raises
    ------
    ConfigError
        The model or its tokenizer cannot be found or loaded (the message names it), or the
        tokenizer has neither a pad nor an eos token.
    """
    from transformers import AutoModel, AutoTokenizer

    path = _model_path(name, revision)
    torch_dtype = resolve_dtype(dtype, device)
    what = f"{name!r}" + (f" (revision {revision})" if revision else "")
    from_hub = not is_builtin(name) and not Path(path).is_dir()
    hub = hub_loading_options(name, revision) if from_hub else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code, **hub)
        model = AutoModel.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code, dtype=torch_dtype, **hub
        )
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ConfigError(
            f"embed.model.name: cannot load model {what}: {_first_line(e)} "
            f"{offline_hint() if from_hub else ''}".rstrip()
        ) from e
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()  # embed with the encoder; the decoder needs target tokens
    _ensure_pad_token(tokenizer, what, log)
    model = model.to(device).eval()
    commit = str(getattr(model.config, "_commit_hash", None) or "")
    log.info(
        "model %s: %s, %.1fM parameters, %s on %s",
        what,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(torch_dtype).removeprefix("torch."),
        device,
    )
    return LoadedModel(model, tokenizer, name, revision, commit, device, torch_dtype)


def model_problem(name: str, revision: Optional[str] = None) -> Optional[str]:
    """Why a model named in a config cannot be loaded here, found without loading it; None when it can.

    A built-in model can always be built; a local folder must hold a ``config.json``; a hub name
    must be in the cache or on a reachable hub (:func:`moespec.hub.availability_problem`).
    """
    from moespec.hub import availability_problem

    if is_builtin(name):
        return None
    folder = Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) or folder.is_dir():
        if not folder.is_dir():
            return f"local model folder {name} does not exist"
        return None if (folder / "config.json").is_file() else f"local model folder {name} has no config.json"
    return availability_problem(name, "model", revision)


def hub_loading_options(name: str, revision: Optional[str], key: str = "embed.model") -> dict[str, Any]:
    """``from_pretrained`` options of a hub model; fails at once when it is neither cached nor downloadable.

    A cached model is loaded from the cache alone (``local_files_only``): without this,
    transformers asks the hub for newer files first and, on a node without internet, spends about
    a minute in retries. ``cache_dir`` is the cache that was checked, even when ``HF_HOME`` was set
    after transformers was imported.
    """
    from moespec.hub import availability_problem, hub_cache, is_cached

    cached = is_cached(name, "model", revision)
    problem = None if cached else availability_problem(name, "model", revision)
    if problem:
        raise ConfigError(f"{key}.name: {problem}")
    return {"local_files_only": cached, "cache_dir": str(hub_cache())}


def _model_path(name: str, revision: Optional[str]) -> str:
    if is_builtin(name):
        if name not in BUILTIN_MODELS:
            raise ConfigError(
                f"embed.model.name: unknown built-in model {name!r}; built-in models are {', '.join(BUILTIN_MODELS)}"
            )
        if revision:
            raise ConfigError(f"embed.model.revision: built-in model {name!r} has no revisions, got {revision!r}")
        return str(builtin_model_dir(name))
    looks_local = name.startswith(("/", "./", "../", "~"))
    if looks_local and not Path(name).expanduser().is_dir():
        raise ConfigError(f"embed.model.name: local model folder {name!r} does not exist")
    return str(Path(name).expanduser()) if looks_local else name


def _ensure_pad_token(tokenizer: Any, what: str, log: logging.Logger) -> None:
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ConfigError(
            f"embed.model.name: the tokenizer of {what} has neither a pad nor an eos token; batched embedding needs one"
        )
    # LLaMA-style tokenizers ship without a pad token. Pads are masked out of attention and of
    # pooling, so which id fills them does not matter; eos is the usual choice.
    tokenizer.pad_token = tokenizer.eos_token
    log.info(
        "tokenizer of %s has no pad token: using eos %r for padding (%s padding)",
        what,
        tokenizer.eos_token,
        tokenizer.padding_side,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
