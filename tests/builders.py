"""Shared test builders: tiny experiments, synthetic artifacts and tiny HF models, built in code.

Tests import these from here (never from another test module); fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml

from moespec.artifacts import ArtifactWriter, open_artifact, write_artifact
from moespec.config import load_experiment
from moespec.launch.plan import Plan, make_plan
from moespec.launch.profiles import builtin_profiles_dir, load_profile
from moespec.launch.sbatch import ScriptContext
from moespec.launch.slurm import Submission, prepare
from moespec.launch.status import collect_status
from moespec.sync.engine import EngineSettings
from moespec.sync.session import SyncRequest


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread, then restore: tiny models in small batches stall on thread barriers
    when the box is shared, and a stage run inline must match its one-thread job bit for bit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_experiment(name: str = "t", n_per_domain: int = 4, **sections) -> dict:
    """A small experiment dict on the built-in corpus and model."""
    config = {
        "experiment": name,
        "embed": {
            "model": {"name": "builtin:tiny-bert"},
            "data": [{"kind": "builtin", "n_per_domain": n_per_domain}],
            "batch_size": 16,
            "max_length": 64,
        },
    }
    config.update(sections)
    return config


#: A dictionary MoE small enough for a test to train in seconds.
TINY_DICTIONARY = {
    "kind": "dictionary",
    "n_experts": 3,
    "query_dim": 8,
    "code_dim": 6,
    "n_layers": 2,
    "projection_hidden": 8,
    "projection_dim": 4,
}
#: A fiber section for a few dozen points: short radius window, two strata at most, one null repeat.
TINY_FIBER = {
    "vol_min": 5,
    "vol_max": 40,
    "window": 5,
    "strata": {"k_range": [2, 3], "n_init": 1},
    "calibration": {"n_repeats": 1},
}


# --------------------------------------------------------------------------------------------------
# synthetic artifacts


def write_embed_artifact(folder, embeddings, domain, domain_names=None):
    """A synthetic, complete embed artifact holding ``embeddings`` (for known-geometry tests)."""
    n_domains = int(domain.max()) + 1
    from moespec.stages import embed

    writer = ArtifactWriter(folder, "embed", "synthetic", schema=embed.schema(embed.Config()))
    with write_artifact(writer):
        writer.write("embeddings", np.asarray(embeddings, dtype=np.float32))
        writer.write("domain", np.asarray(domain, dtype=np.int64))
        writer.write("domain_names", domain_names or [f"d{i}" for i in range(n_domains)])
        writer.write("label", np.full(len(domain), -1, dtype=np.int64))
        writer.create_dataset("label_names", (0,), h5py.string_dtype())
        writer.write("label_domain", np.zeros(0, dtype=np.int64))
        writer.write("text_id", [f"row/{i}" for i in range(len(domain))])
    return open_artifact(folder)


def run_stage(module, cfg, inputs, folder):
    """Run one stage's ``run`` into ``folder`` through a real ArtifactWriter; return its reader."""
    writer = ArtifactWriter(folder, module.NAME, "test", schema=module.schema(cfg))
    with write_artifact(writer):
        module.run(cfg, inputs, writer)
    return open_artifact(folder), writer.summary


N_DOMAINS, LABELS_PER_DOMAIN, ROWS_PER_CLASS, DIM = 3, 2, 16, 8


def write_reduce_artifact(folder, *, labelled=True, seed=0):
    """A complete synthetic reduce artifact: one Gaussian cluster per (domain, class)."""
    rng = np.random.default_rng(seed)
    n_classes = N_DOMAINS * LABELS_PER_DOMAIN
    centers = rng.normal(0, 3, size=(n_classes, DIM))
    label = np.repeat(np.arange(n_classes), ROWS_PER_CLASS)
    domain = label // LABELS_PER_DOMAIN
    reduced = centers[label] + rng.normal(0, 0.5, size=(len(label), DIM))
    writer = ArtifactWriter(folder, "reduce", f"synthetic{seed}", schema={})
    with write_artifact(writer):
        writer.write("reduced", reduced)
        writer.write("domain", domain.astype(np.int64))
        writer.write("domain_names", [f"d{i}" for i in range(N_DOMAINS)])
        writer.write("label", (label if labelled else np.full(len(label), -1)).astype(np.int64))
        writer.write("label_names", [f"d{c // LABELS_PER_DOMAIN}/c{c % LABELS_PER_DOMAIN}" for c in range(n_classes)])
        writer.write("label_domain", np.arange(n_classes) // LABELS_PER_DOMAIN)
    return open_artifact(folder)


# --------------------------------------------------------------------------------------------------
# tiny HF MoE models

N_EXPERTS, TOP_K, HIDDEN = 4, 2, 32


def word_tokenizer():
    """A word-level tokenizer over the built-in corpus words (with bos, eos, pad and unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from moespec.data.corpus import tokenizer_training_texts

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        tokenizer_training_texts(n_per_domain=20),
        trainers.WordLevelTrainer(vocab_size=600, special_tokens=["<pad>", "<unk>", "<s>", "</s>"]),
    )
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
    )


def tiny_config(kind: str, vocab_size: int, n_layers: int = 2):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, SwitchTransformersConfig

    if kind == "mixtral":
        return MixtralConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=48,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=48,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=False,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if kind == "olmoe":
        return OlmoeConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=24,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if kind == "switch":
        return SwitchTransformersConfig(
            vocab_size=vocab_size,
            d_model=HIDDEN,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            num_experts=N_EXPERTS,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            expert_capacity=64,
            decoder_start_token_id=0,
        )
    raise ValueError(kind)


def save_tiny_moe(kind: str, folder: Path, seed: int = 0, n_layers: int = 2) -> Path:
    """Build a tiny random ``kind`` model and its tokenizer and ``save_pretrained`` them into ``folder``."""
    from transformers import AutoModel, AutoModelForCausalLM

    tokenizer = word_tokenizer()
    config = tiny_config(kind, len(tokenizer), n_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (AutoModel if kind == "switch" else AutoModelForCausalLM).from_config(config)
        # Router weights of a fresh model are tiny (Qwen2-MoE's start at zero); larger ones make
        # the routing decisive, as in a trained model.
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.classifier.weight")):
                param.data.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


# --------------------------------------------------------------------------------------------------
# tiny HF causal LMs (bases for LoRA adapters)


def save_tiny_llama(folder: Path, seed: int = 0, hidden: int = 32, n_layers: int = 2) -> Path:
    """A tiny random LLaMA (q/k/v/o and gate/up/down projections) and its word tokenizer, saved in ``folder``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


# --------------------------------------------------------------------------------------------------
# a small sweep for the report, compare and browser tests, and a reader of the report's HTML


TOPK = {"kind": "topk", "n_experts": 4, "hidden_dim": 8, "ffn_dim": 8}
DICTIONARY = {
    "kind": "dictionary",
    "n_experts": 3,
    "query_dim": 8,
    "code_dim": 6,
    "n_layers": 1,
    "projection_hidden": 8,
    "projection_dim": 4,
    "routing": "straight_through",
}

_BUILT: dict[str, Path] = {}


def built_sweep(tmp_path_factory) -> Path:
    """embed -> reduce -> fiber, and train -> ablate for a 2 x 2 sweep (model kind x epochs): 4 runs.

    Built once per test session (shared by the report, compare and browser tests); the experiment
    summary.json is written as `moespec submit` writes it, from the plan.
    """
    if "sweep" in _BUILT:
        return _BUILT["sweep"]
    from moespec.config import load_experiment
    from moespec.launch.plan import make_plan
    from moespec.launch.runner import run_inline

    root = tmp_path_factory.mktemp("analysis-results")
    config = tiny_experiment(
        "sweep",
        n_per_domain=10,
        reduce={"n_components": 6, "mle_k": 5},
        fiber=TINY_FIBER,
        train={"model": TOPK, "epochs": 2, "batch_size": 16},
        ablate={"by": ["class", "domain", "stratum"], "bootstrap": 50, "controls": {"random_sets": 2}},
        sweep={"grid": {"train.model": [TOPK, DICTIONARY], "train.epochs": [2, 3]}},
    )
    with one_torch_thread():
        run_inline(config, root=root)
    plan = make_plan(load_experiment(config, root=root))
    tasks = [
        {
            "stage": t.stage,
            "uid": t.uid,
            "shard": t.shard_index,
            "status": "ran",
            "points": list(t.points),
            "summary": {},
            "error": None,
            "artifact": str(t.dir),
        }
        for t in plan.tasks
    ]
    (root / "sweep" / "summary.json").write_text(json.dumps({"tasks": tasks}))
    _BUILT["sweep"] = root / "sweep"
    return _BUILT["sweep"]


class _Page(HTMLParser):
    """Number cells (with their artifact source), image sources and the text of `.missing` notes."""

    def __init__(self):
        super().__init__()
        self.cells: list[tuple[dict, str]] = []
        self.images: list[str] = []
        self.missing: list[str] = []
        self._open: dict | None = None
        self._missing = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "data-dataset" in attrs:
            self._open, self._text = attrs, ""
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "p" and attrs.get("class") == "missing":
            self._missing, self._text = True, ""

    def handle_data(self, data):
        if self._open is not None or self._missing:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "td" and self._open is not None:
            self.cells.append((self._open, self._text))
            self._open = None
        if tag == "p" and self._missing:
            self.missing.append(self._text)
            self._missing = False


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


# --------------------------------------------------------------------------------------------------
# launch: experiments, the golden submission, files and waits

GOLDEN = Path(__file__).parent / "launch" / "golden"
FINAL_WAIT_S = 240


def sweep_config(root, **infra) -> dict:
    """embed (2 poolings) -> reduce (3 sizes): 2 embed tasks shared by 6 reduce tasks."""
    config = tiny_experiment("sw", n_per_domain=3, reduce={"n_components": 2, "mle_k": 5})
    config["root"] = str(root)
    config["sweep"] = {"grid": {"embed.pooling": ["mean", "cls"], "reduce.n_components": [2, 3, 4]}}
    if infra:
        config["infra"] = infra
    return config


def write_config(folder: Path, config: dict, name: str = "exp.yaml") -> Path:
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(config))
    return path


def localhost_profile(folder: Path) -> Path:
    """The built-in localhost profile with ``python:`` set to this interpreter (the tests' venv)."""
    raw = yaml.safe_load((builtin_profiles_dir() / "localhost.yaml").read_text())
    raw["python"] = sys.executable
    return write_config(folder, raw, "localhost.yaml")


def assert_golden(name: str, text: str) -> None:
    """Compare with ``golden/<name>``; ``MOESPEC_UPDATE_GOLDEN=1`` rewrites it (review the diff)."""
    path = GOLDEN / name
    if os.environ.get("MOESPEC_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with MOESPEC_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from {path} (MOESPEC_UPDATE_GOLDEN=1 to accept)"


def golden_profile(folder: Path) -> Path:
    return write_config(
        folder,
        {
            "partition": "gpu",
            "account": "proj",
            "max_array_size": 4,
            "array_parallelism": 3,
            "gpus_per_node": 4,
            "python": "python",
            "setup": ["module load python/3.11", "source $WORK/venv/bin/activate"],
            "defaults": {"timeout_min": 30, "mem_gb": 8},
            "stages": {
                "embed": {"gpus_per_node": 1, "slurm_additional_parameters": {"mail-type": "FAIL"}},
                "reduce": {"cpus_per_task": 4, "mem_gb": 1.5, "slurm_qos": "short", "slurm_signal_delay_s": 120},
            },
        },
        "gold.yaml",
    )


def golden_submission(folder: Path) -> Submission:
    experiment = load_experiment(sweep_config("/scratch/me/results"))
    submission = prepare(make_plan(experiment), load_profile(str(golden_profile(folder))), ask_scheduler=False)
    submission.id = "20250101-120000-abcdef"
    return submission


def golden_context(submission: Submission) -> ScriptContext:
    return ScriptContext(
        "sw",
        "gold",
        Path("jobs/sw/experiment.yaml"),
        Path("jobs/sw"),
        "python -m moespec.cli",
        tuple(submission.cluster.profile.setup),
        "cached",
    )


def demo_sweep(folder: Path, poolings=("mean", "cls"), sizes=(2, 3), **infra) -> dict:
    """The demo pipeline, tiny: embed on builtin:tiny-bert (3 texts per domain) -> reduce."""
    config = tiny_experiment("clu", n_per_domain=3, reduce={"n_components": 2, "mle_k": 5})
    config["embed"]["max_length"] = 32
    config["root"] = str(Path(folder) / "results")
    config["sweep"] = {"grid": {"embed.pooling": list(poolings), "reduce.n_components": list(sizes)}}
    config["infra"] = {"executor": "slurm", **infra}
    return config


def wait_final(plan: Plan, timeout_s: float = FINAL_WAIT_S) -> dict:
    """Poll until no task is pending, running, cancelling or unknown; returns {(stage, index): TaskStatus}."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = collect_status(plan)
        if all(s.state not in ("pending", "running", "cancelling", "unknown") for s in statuses):
            return {(s.task.stage, s.index): s for s in statuses}
        if time.monotonic() > deadline:
            waiting = ", ".join(f"{s.task.label} {s.state} {s.detail}" for s in statuses)
            raise AssertionError(f"still waiting: {waiting}")
        time.sleep(1.0)


def wait_for(condition, what: str, timeout_s: float = 120.0, every_s: float = 0.5):
    """Poll ``condition()`` until it returns something true; that value is returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def sacct_times(job_ids: list[str], expect: int = 0, timeout_s: float = 60.0) -> dict[str, tuple[str, str, str]]:
    """JobID -> (state, start, end) from sacct, polled until ``expect`` finished tasks are recorded.

    slurmdbd stores records asynchronously: right after the artifacts appear, sacct can still miss
    the last task of an array (seen right after a fresh `slurm_localhost.sh start`).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        text = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "JobID,State,Start,End", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        times = {line.split("|")[0]: tuple(line.split("|")[1:]) for line in text.splitlines() if line}
        finished = sum(1 for state, start, end in times.values() if end not in ("", "Unknown"))
        if finished >= expect or time.monotonic() > deadline:
            return times
        time.sleep(1.0)


# --------------------------------------------------------------------------------------------------
# sync: small file trees built in code, requests, and tree comparisons

#: A results tree like the pipeline writes: summaries, plots, an embedding, a checkpoint.
RESULTS = {
    "demo/summary.json": b'{"tasks": 3}\n',
    "demo/embed/1a2b/embed.h5": 300_000,
    "demo/embed/1a2b/config.yaml": b"model: tiny\n",
    "demo/reduce/3c4d/reduce.h5": 40_000,
    "demo/reduce/3c4d/plot.png": 5_000,
    "demo/train/5e6f/ckpt.pt": 120_000,
    "demo/empty.txt": b"",
    "other/summary.json": b'{"tasks": 1}\n',
}

OLD = 1_600_000_000  # a fixed mtime in the past (whole seconds, as SFTP carries)


def make_tree(root: Path, files: dict, mtime: int = OLD) -> Path:
    """Write ``files`` (relative path -> bytes, or a size for random bytes) under ``root``."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(content) if isinstance(content, int) else content)
        os.utime(path, (mtime, mtime))
    return root


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Relative path -> (content, whole-second mtime) of every regular file under ``root``."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_symlink():
                continue
            out[path.relative_to(root).as_posix()] = (path.read_bytes(), int(path.stat().st_mtime))
    return out


def parts(root: Path) -> list[Path]:
    """Every ``.part`` file left under ``root``."""
    return [p for p in root.rglob("*.part")] if root.exists() else []


def pull_request(host: str, remote: Path, local: Path, config: Path, **options) -> SyncRequest:
    """A pull of ``remote`` on ``host`` into ``local`` through the ssh ``config``: no retries, short timeouts."""
    defaults = dict(
        direction="pull",
        host=host,
        remote_root=str(remote),
        local_root=local,
        ssh_config=config,
        retries=0,
        connect_timeout=10,
        engine=EngineSettings(stall_timeout=30),
    )
    return SyncRequest(**{**defaults, **options})
