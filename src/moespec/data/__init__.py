"""Texts to embed: the built-in multi-domain corpus, HF ``datasets``, and local files.

``embed.data`` in an experiment is a list of sources (:data:`Source`, a tagged union on
``kind``); :func:`load_texts` reads them, in order, into one :class:`TextSet` whose domain and
label codes are global, and whose labels never mix classes of different sources.

Importing this package does not import ``datasets`` or torch.
"""

from moespec.data.corpus import DOMAIN_NAMES, DOMAINS, generate_domain
from moespec.data.sources import BuiltinSource, FilesSource, HFSource, Source, load_texts, source_domains
from moespec.data.textset import TextSet, concat, shard_bounds

__all__ = [
    "DOMAINS",
    "DOMAIN_NAMES",
    "generate_domain",
    "BuiltinSource",
    "HFSource",
    "FilesSource",
    "Source",
    "load_texts",
    "source_domains",
    "TextSet",
    "concat",
    "shard_bounds",
]
