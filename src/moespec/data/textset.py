"""A labelled list of texts from one or more sources, with global domain and label codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from moespec.errors import DataError


@dataclass(frozen=True)
class TextSet:
    """Texts with their domain, label and stable id.

    Domain codes index ``domain_names`` and are global across sources. Label codes index
    ``label_names`` and are global too, but every label belongs to exactly one domain
    (``label_domain``) and so to one source: the class "positive" of two datasets gets two codes
    (``"imdb/positive"``, ``"amazon/positive"``), labels of different datasets are never merged.

    Attributes
    ----------
    texts : list of str, length N
    domain : ndarray of shape (N,), int64
    domain_names : list of str, length n_domains
    label : ndarray of shape (N,), int64
        -1 for an unlabelled text.
    label_names : list of str, length n_labels
        ``"<domain>/<class>"``.
    label_domain : ndarray of shape (n_labels,), int64
        Domain code of each label.
    text_id : list of str, length N
        Stable id ``"<domain>/<row index in the source>"``.
    sources : list of dict
        Provenance of each source (kind, name, fingerprint, rows available and taken...).
    """

    texts: list[str]
    domain: np.ndarray
    domain_names: list[str]
    label: np.ndarray
    label_names: list[str]
    label_domain: np.ndarray
    text_id: list[str]
    sources: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self, start: int, stop: int) -> "TextSet":
        """Rows ``start:stop``, with the full (global) domain and label tables kept."""
        return TextSet(
            self.texts[start:stop],
            self.domain[start:stop],
            self.domain_names,
            self.label[start:stop],
            self.label_names,
            self.label_domain,
            self.text_id[start:stop],
            self.sources,
        )

    @classmethod
    def single_domain(
        cls,
        domain: str,
        texts: list[str],
        row_index: Sequence[int],
        labels: np.ndarray | None,
        class_names: Sequence[str],
        source: dict[str, Any],
    ) -> "TextSet":
        """A text set of one domain.

        Parameters
        ----------
        domain : str
        texts : list of str, length n
        row_index : sequence of int, length n
            Row of each text in its source (makes the ``text_id``).
        labels : ndarray of shape (n,), int64, or None
            Codes into ``class_names``, -1 when unlabelled; None when the source has no labels.
        class_names : sequence of str
        source : dict
            Provenance of the source.
        """
        n = len(texts)
        label = np.full(n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        return cls(
            texts,
            np.zeros(n, dtype=np.int64),
            [domain],
            label,
            [f"{domain}/{c}" for c in class_names],
            np.zeros(len(class_names), dtype=np.int64),
            [f"{domain}/{i}" for i in row_index],
            [source],
        )


def concat(parts: Sequence[TextSet]) -> TextSet:
    """Concatenate text sets, renumbering domain and label codes into global tables.

    Raises
    ------
    DataError
        Two parts share a domain name (their text ids and labels would collide).
    """
    domain_names: list[str] = []
    label_names: list[str] = []
    domains, labels, label_domains = [], [], []
    for part in parts:
        clash = set(part.domain_names) & set(domain_names)
        if clash:
            raise DataError(
                f"domain name(s) {sorted(clash)} come from more than one source; give each source its own 'domain'"
            )
        domains.append(part.domain + len(domain_names))
        labels.append(np.where(part.label >= 0, part.label + len(label_names), -1))
        label_domains.append(part.label_domain + len(domain_names))
        domain_names += part.domain_names
        label_names += part.label_names
    return TextSet(
        texts=[t for part in parts for t in part.texts],
        domain=np.concatenate(domains).astype(np.int64),
        domain_names=domain_names,
        label=np.concatenate(labels).astype(np.int64),
        label_names=label_names,
        label_domain=np.concatenate(label_domains).astype(np.int64),
        text_id=[i for part in parts for i in part.text_id],
        sources=[s for part in parts for s in part.sources],
    )


def shard_bounds(n: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Row range ``[start, stop)`` of shard ``shard_index`` of ``n`` rows in ``num_shards`` contiguous slices.

    Slices differ in size by at most one row, larger ones first (as ``numpy.array_split``).
    """
    base, extra = divmod(n, num_shards)
    start = shard_index * base + min(shard_index, extra)
    return start, start + base + (1 if shard_index < extra else 0)
