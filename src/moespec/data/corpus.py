"""The built-in multi-domain corpus: labelled texts generated in code, no downloads.

Six domains, each with two to four classes, written from seeded templates and vocabularies:

============  ==========================================
domain        classes
============  ==========================================
movies        positive, negative
products      positive, negative, neutral
news          world, sports, business, science
science       physics, biology, computing
social        joy, anger, sadness
medical       symptom, treatment
============  ==========================================

The domain shows in a text's topic words and sentence templates, the class in its cue words
(with some cue noise, so that classes overlap as in real data), and a long tail of shared
"filler" words drawn from a Zipf law (so that a WordPiece tokenizer splits rare words into
sub-words, as with real text). Text lengths are heavy-tailed like real corpora: words per text
follow a log-normal law with median 39, mean ~59 and 95th percentile ~176, capped at 400 — the
distribution measured against in docs/performance.md, "Text length distribution", where length-sorted batching
pays off.

Every domain has its own random stream (``numpy.random.default_rng([seed, domain number])``),
generated text by text, so the corpus is deterministic, a domain's texts do not depend on which
other domains are requested, and the first ``m`` texts of a domain are the same for any
``n_per_domain >= m``.

If the generator changes, bump :data:`CORPUS_VERSION` (it is stored with every artifact) and the
embed stage's ``SCHEMA_VERSION`` (so that cached artifacts of the old corpus are not reused).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: Version of the generator; texts of equal (domain, n, seed) are identical within one version.
CORPUS_VERSION = 1

#: Words per text: log-normal with this median and shape (median 39, p95 ~176; docs/performance.md).
LENGTH_MEDIAN_WORDS = 39
LENGTH_SIGMA = 0.92
LENGTH_RANGE_WORDS = (4, 400)

_FUNCTION_WORDS = (
    "the",
    "a",
    "and",
    "of",
    "to",
    "in",
    "is",
    "it",
    "this",
    "that",
    "with",
    "for",
    "on",
    "was",
    "but",
    "as",
    "at",
    "by",
    "from",
    "so",
    "very",
    "really",
    "not",
    "all",
    "some",
    "more",
)
_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ten",
    "ra",
    "vo",
    "sel",
    "du",
    "pri",
    "ang",
    "tor",
    "el",
    "ni",
    "qua",
    "bex",
    "om",
    "sta",
    "lin",
    "gur",
    "fe",
    "zo",
    "ril",
    "pan",
    "cho",
    "wen",
    "ix",
    "mar",
    "tu",
    "bel",
    "or",
)
#: The filler vocabulary is part of the corpus "language": fixed, independent of the user's seed.
_FILLER_SEED = 20240531
_N_FILLER = 1500


@dataclass(frozen=True)
class Domain:
    """One domain of the built-in corpus.

    Attributes
    ----------
    name : str
    topics : tuple of str
        Words that mark the domain.
    classes : dict of str to tuple of str
        Class name -> cue words that mark the class.
    templates : tuple of str
        Sentence templates; ``{t}`` is replaced by a topic word, ``{c}`` by a cue word.
    """

    name: str
    topics: tuple[str, ...]
    classes: dict[str, tuple[str, ...]]
    templates: tuple[str, ...]


DOMAINS: tuple[Domain, ...] = (
    Domain(
        "movies",
        (
            "film",
            "movie",
            "plot",
            "actor",
            "actress",
            "director",
            "scene",
            "script",
            "soundtrack",
            "sequel",
            "cast",
            "ending",
            "cinema",
            "screenplay",
            "character",
            "camera",
            "trailer",
            "villain",
            "hero",
        ),
        {
            "positive": (
                "brilliant",
                "moving",
                "delightful",
                "gripping",
                "superb",
                "charming",
                "masterful",
                "wonderful",
                "memorable",
                "stunning",
                "hilarious",
                "heartfelt",
            ),
            "negative": (
                "boring",
                "dull",
                "awful",
                "clumsy",
                "tedious",
                "forgettable",
                "predictable",
                "terrible",
                "bland",
                "messy",
                "lifeless",
                "painful",
            ),
        },
        (
            "I watched the {t} last night and it was {c}.",
            "The {t} felt {c} from start to finish.",
            "Honestly the {t} is {c}.",
            "What a {c} {t}.",
            "Everyone says the {t} was {c}, and I agree.",
        ),
    ),
    Domain(
        "products",
        (
            "battery",
            "charger",
            "screen",
            "headphones",
            "blender",
            "shipping",
            "package",
            "price",
            "warranty",
            "cable",
            "kettle",
            "laptop",
            "vacuum",
            "blanket",
            "seller",
            "refund",
            "order",
            "size",
            "colour",
        ),
        {
            "positive": (
                "reliable",
                "sturdy",
                "excellent",
                "recommended",
                "perfect",
                "durable",
                "convenient",
                "great",
                "solid",
                "fast",
            ),
            "negative": (
                "broken",
                "flimsy",
                "defective",
                "useless",
                "returned",
                "cheap",
                "disappointing",
                "faulty",
                "scratched",
                "slow",
            ),
            "neutral": (
                "average",
                "okay",
                "decent",
                "adequate",
                "standard",
                "typical",
                "acceptable",
                "ordinary",
                "fine",
                "expected",
            ),
        },
        (
            "The {t} arrived and seems {c}.",
            "Bought this {t} last month, {c} so far.",
            "Five stars for the {t}? {c}.",
            "My {t} is {c}.",
            "Compared with the old {t} this one is {c}.",
        ),
    ),
    Domain(
        "news",
        (
            "government",
            "report",
            "officials",
            "city",
            "minister",
            "statement",
            "week",
            "agency",
            "region",
            "announcement",
            "council",
            "spokesperson",
            "analysts",
            "sources",
        ),
        {
            "world": (
                "election",
                "embassy",
                "treaty",
                "border",
                "ceasefire",
                "parliament",
                "diplomats",
                "refugees",
                "sanctions",
                "summit",
            ),
            "sports": (
                "match",
                "league",
                "coach",
                "striker",
                "tournament",
                "championship",
                "season",
                "goal",
                "playoff",
                "stadium",
            ),
            "business": (
                "shares",
                "earnings",
                "merger",
                "investors",
                "market",
                "revenue",
                "quarterly",
                "inflation",
                "startup",
                "profits",
            ),
            "science": (
                "researchers",
                "satellite",
                "vaccine",
                "software",
                "telescope",
                "genome",
                "robot",
                "climate",
                "laboratory",
                "algorithm",
            ),
        },
        (
            "The {t} said on Monday that the {c} would go ahead.",
            "According to the {t}, {c} talks continue.",
            "A {t} confirmed new details about the {c}.",
            "The {c} dominated the {t} this week.",
        ),
    ),
    Domain(
        "science",
        (
            "study",
            "results",
            "method",
            "data",
            "analysis",
            "experiment",
            "model",
            "hypothesis",
            "sample",
            "measurement",
            "paper",
            "approach",
            "evidence",
            "theory",
        ),
        {
            "physics": (
                "quantum",
                "particle",
                "magnetic",
                "laser",
                "entropy",
                "photon",
                "lattice",
                "superconducting",
                "momentum",
                "spectrum",
            ),
            "biology": (
                "protein",
                "cell",
                "gene",
                "enzyme",
                "tissue",
                "mutation",
                "species",
                "membrane",
                "receptor",
                "bacteria",
            ),
            "computing": (
                "algorithm",
                "network",
                "compiler",
                "latency",
                "dataset",
                "neural",
                "parallel",
                "encryption",
                "cache",
                "graph",
            ),
        },
        (
            "We propose a {c} {t} for this problem.",
            "Our {t} shows that the {c} effect is significant.",
            "In this {t} we measure the {c} response.",
            "The {c} {t} agrees with previous work.",
        ),
    ),
    Domain(
        "social",
        (
            "today",
            "friends",
            "lol",
            "weekend",
            "morning",
            "phone",
            "coffee",
            "omg",
            "tonight",
            "everyone",
            "feed",
            "post",
            "followers",
        ),
        {
            "joy": ("happy", "love", "excited", "awesome", "yay", "blessed", "smile", "amazing", "grateful", "fun"),
            "anger": (
                "angry",
                "hate",
                "furious",
                "annoyed",
                "ridiculous",
                "worst",
                "unfair",
                "rage",
                "sick",
                "outraged",
            ),
            "sadness": ("sad", "miss", "lonely", "crying", "tired", "lost", "heartbroken", "alone", "sorry", "gloomy"),
        },
        ("so {c} about {t} rn", "{t} and I am just {c}", "why is {t} always this {c}", "{c} {c} {t} lol"),
    ),
    Domain(
        "medical",
        ("patient", "doctor", "symptoms", "clinic", "dose", "hospital", "nurse", "history", "examination", "chart"),
        {
            "symptom": (
                "fever",
                "cough",
                "headache",
                "nausea",
                "pain",
                "dizziness",
                "rash",
                "fatigue",
                "swelling",
                "chills",
            ),
            "treatment": (
                "prescribed",
                "antibiotics",
                "therapy",
                "surgery",
                "ibuprofen",
                "rest",
                "injection",
                "physiotherapy",
                "dosage",
                "recovery",
            ),
        },
        (
            "The {t} reports {c} since Tuesday.",
            "On {t} review, {c} was noted.",
            "Plan: {c} and follow up at the {t}.",
            "The {t} was started on {c}.",
        ),
    ),
)

DOMAIN_NAMES: tuple[str, ...] = tuple(d.name for d in DOMAINS)


def domain_by_name(name: str) -> Domain:
    """The built-in domain called ``name``.

    Raises
    ------
    KeyError
        ``name`` is not a built-in domain.
    """
    for domain in DOMAINS:
        if domain.name == name:
            return domain
    raise KeyError(f"unknown built-in domain {name!r}; the built-in domains are {', '.join(DOMAIN_NAMES)}")


@lru_cache(maxsize=1)
def filler_words() -> tuple[tuple[str, ...], np.ndarray]:
    """The shared filler vocabulary and the cumulative distribution of its Zipf law.

    Returns
    -------
    words : tuple of str, length 1500
    cdf : ndarray of shape (1500,)
        Cumulative Zipf-Mandelbrot weights ``1 / (rank + 2.7) ** 1.1`` (a natural-language-like
        long tail); sample with ``searchsorted(cdf, uniform)``.
    """
    rng = np.random.default_rng(_FILLER_SEED)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < _N_FILLER:
        word = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(1, 4))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    weights = 1.0 / (np.arange(_N_FILLER) + 2.7) ** 1.1
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0
    return tuple(words), cdf


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _target_words(rng: np.random.Generator) -> int:
    lo, hi = LENGTH_RANGE_WORDS
    return int(np.clip(round(rng.lognormal(np.log(LENGTH_MEDIAN_WORDS), LENGTH_SIGMA)), lo, hi))


def _free_sentence(rng: np.random.Generator, domain: Domain, cues: tuple[str, ...]) -> str:
    """A bag-of-words sentence: function and filler words with some topic and cue words mixed in."""
    fillers, cdf = filler_words()
    n_words = int(rng.integers(5, 15))
    slots = rng.random(n_words)
    picks = rng.random(n_words)  # one uniform per word picks the word within its slot's list
    words = []
    for slot, pick in zip(slots, picks):
        if slot < 0.14:
            words.append(domain.topics[int(pick * len(domain.topics))])
        elif slot < 0.24:
            words.append(cues[int(pick * len(cues))])
        elif slot < 0.58:
            words.append(_FUNCTION_WORDS[int(pick * len(_FUNCTION_WORDS))])
        else:
            words.append(fillers[int(np.searchsorted(cdf, pick, side="right"))])
    return " ".join(words).capitalize() + "."


def _sentence(rng: np.random.Generator, domain: Domain, class_name: str) -> str:
    # One cue in eight comes from another class of the domain: classes overlap, as in real labels.
    class_names = tuple(domain.classes)
    cue_class = class_name
    if rng.random() < 0.125:
        cue_class = _pick(rng, tuple(c for c in class_names if c != class_name))
    cues = domain.classes[cue_class]
    if rng.random() < 0.4:
        return _pick(rng, domain.templates).format(t=_pick(rng, domain.topics), c=_pick(rng, cues))
    return _free_sentence(rng, domain, cues)


def _text(rng: np.random.Generator, domain: Domain, class_name: str) -> str:
    target = _target_words(rng)
    sentences: list[str] = []
    n_words = 0
    while n_words < target:
        sentence = _sentence(rng, domain, class_name)
        sentences.append(sentence)
        n_words += sentence.count(" ") + 1
    return " ".join(sentences)


def generate_domain(name: str, n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """The first ``n`` texts of one built-in domain.

    Parameters
    ----------
    name : str
        A name from :data:`DOMAIN_NAMES`.
    n : int
        Number of texts.
    seed : int
        Corpus seed; the domain's stream is ``default_rng([seed, domain number])``.

    Returns
    -------
    texts : list of str, length n
    labels : ndarray of shape (n,), int64
        Class of each text, an index into ``list(domain_by_name(name).classes)``.
    """
    domain = domain_by_name(name)
    rng = np.random.default_rng([seed, DOMAIN_NAMES.index(name)])
    class_names = list(domain.classes)
    labels = np.empty(n, dtype=np.int64)
    texts: list[str] = []
    for i in range(n):
        labels[i] = rng.integers(len(class_names))
        texts.append(_text(rng, domain, class_names[labels[i]]))
    return texts, labels


def tokenizer_training_texts(n_per_domain: int = 300, seed: int = 12345) -> list[str]:
    """Texts to train the built-in models' tokenizers on: corpus samples plus every vocabulary word.

    The vocabulary words are listed once each so that every domain, cue and filler word is seen
    even when it is rare in the sample.
    """
    texts: list[str] = []
    for name in DOMAIN_NAMES:
        texts += generate_domain(name, n_per_domain, seed)[0]
    for domain in DOMAINS:
        texts.append(" ".join([*domain.topics, *(w for cues in domain.classes.values() for w in cues)]))
        texts += domain.templates
    texts.append(" ".join(_FUNCTION_WORDS))
    texts.append(" ".join(filler_words()[0]))
    return texts
