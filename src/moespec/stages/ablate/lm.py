"""The ablate stage on an ``lm`` artifact: its saved HF MoE on its own validation texts.

The ``lm`` stage wrote a standard HF folder (``model/``: config, safetensors, tokenizer) and the
validation texts with their domains. Both go through the pretrained-model path
(:func:`moespec.stages.ablate.pretrained.ablate_texts`): router hooks, next-token loss per text,
batched masking. The texts were never trained on, so the deltas are held-out losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moespec.artifacts import ArtifactReader, ArtifactWriter
from moespec.data.textset import TextSet
from moespec.errors import ArtifactError
from moespec.stages.ablate import pretrained


def run(cfg: Any, inputs: dict[str, ArtifactReader], out: ArtifactWriter) -> None:
    from moespec.embedding import hf_moe

    reader, src = inputs["lm"], cfg.source
    folder = Path(reader.path).parent / str(reader.attrs.get("model_folder", "model"))
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"{folder}: the lm artifact {reader.uid} has no model folder; rerun its lm task")
    device = pretrained._resolve_device(src.device, out.device)
    loaded = hf_moe.load_moe_model(
        str(folder), task="lm", dtype=src.dtype, device=device, key="ablate.source", log=out.log
    )
    pretrained.ablate_texts(cfg, loaded, validation_texts(reader), device, out, f"lm:{reader.uid}", "")


def validation_texts(reader: ArtifactReader) -> TextSet:
    """The validation texts of an ``lm`` artifact with their domains (unlabelled)."""
    texts = [str(t) for t in reader.read("val/texts")]
    domain_names = [str(n) for n in reader.read("domain_names")]
    return TextSet(
        texts=texts,
        domain=reader.read("val/domain").astype(np.int64),
        domain_names=domain_names,
        label=np.full(len(texts), -1, dtype=np.int64),
        label_names=[],
        label_domain=np.zeros(0, dtype=np.int64),
        text_id=[str(i) for i in reader.read("val/text_id")],
        sources=[{"kind": "lm", "uid": reader.uid}],
    )
