"""The built-in corpus: deterministic, labelled by domain and class, heavy-tailed lengths."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from moespec.data import DOMAIN_NAMES, DOMAINS, BuiltinSource, generate_domain
from moespec.data.corpus import domain_by_name


def test_six_domains_with_two_to_four_classes():
    assert len(DOMAINS) == 6
    assert all(2 <= len(d.classes) <= 4 for d in DOMAINS)


def test_generation_is_deterministic_prefix_stable_and_seeded():
    texts, labels = generate_domain("news", 30, seed=1)
    again, again_labels = generate_domain("news", 30, seed=1)
    assert texts == again and np.array_equal(labels, again_labels)
    assert generate_domain("news", 10, seed=1)[0] == texts[:10]  # n_per_domain=10 is a prefix of 30
    assert generate_domain("news", 10, seed=2)[0] != texts[:10]


def test_a_domain_does_not_depend_on_the_other_domains_requested():
    alone = BuiltinSource(n_per_domain=5, domains=["social"]).load()
    everything = BuiltinSource(n_per_domain=5).load()
    social = everything.domain == everything.domain_names.index("social")
    assert alone.texts == [t for t, keep in zip(everything.texts, social) if keep]


def test_every_class_occurs_and_its_cue_words_mark_it():
    texts, labels = generate_domain("products", 300)
    domain = domain_by_name("products")
    names = list(domain.classes)
    assert set(labels.tolist()) == set(range(len(names)))
    for code, name in enumerate(names):
        cues = set(domain.classes[name])
        has_cue = np.array([any(w.strip(".,?") in cues for w in t.lower().split()) for t in texts])
        rate = [has_cue[labels == code].mean(), has_cue[labels != code].mean()]
        assert rate[0] > rate[1]  # a class's cue words occur more in its own texts


def test_lengths_are_heavy_tailed_like_real_text():
    texts, _ = generate_domain("movies", 2000)
    words = np.array([len(t.split()) for t in texts])
    assert 30 <= np.median(words) <= 50
    assert np.percentile(words, 95) > 3 * np.median(words)
    assert words.min() >= 4 and words.max() <= 450


def test_builtin_source_labels_and_ids():
    texts = BuiltinSource(n_per_domain=4, domains=["medical", "movies"], seed=7).load()
    assert texts.domain_names == ["medical", "movies"]
    assert texts.text_id[:2] == ["medical/0", "medical/1"] and texts.text_id[4] == "movies/0"
    assert texts.label_names == ["medical/symptom", "medical/treatment", "movies/positive", "movies/negative"]
    assert texts.label_domain.tolist() == [0, 0, 1, 1]
    assert np.all(texts.label_domain[texts.label] == texts.domain)  # each label belongs to its row's domain
    assert texts.sources[0]["kind"] == "builtin"


def test_unknown_builtin_domain_is_rejected():
    with pytest.raises(ValidationError, match="unknown built-in domain"):
        BuiltinSource(domains=["poetry"])
    assert set(DOMAIN_NAMES) == {"movies", "products", "news", "science", "social", "medical"}
