"""Keyword and learned routers: the seed's keyword rules, word boundaries, a classifier that reads features."""

from __future__ import annotations

import numpy as np
import pytest

from moespec.models.text_routers import KeywordRouter, LearnedRouter

DOMAINS = ["math", "reasoning", "code", "conversation", "knowledge"]
#: The rules of the system moespec's LoRA stage was built from, in its priority order.
SEED_RULES = {
    "math": ["calculate", "+", "="],
    "code": ["python", "function"],
    "knowledge": ["explain", "what is"],
    "conversation": ["hello"],
}


def test_the_seed_keyword_rules_route_as_the_seed_did():
    router = KeywordRouter(SEED_RULES, "reasoning", DOMAINS).fit()
    texts = [
        "What is 15 + 27?",
        "Write a Python function to reverse a string.",
        "Solve: x + 5 = 12",
        "Explain photosynthesis",
        "Hello, how are you?",
        "If all cats are grey, is Tom grey?",
        "what is the capital of France",
    ]
    expected = ["math", "code", "math", "knowledge", "conversation", "reasoning", "knowledge"]
    assert [DOMAINS[i] for i in router.predict(texts)] == expected


def test_word_keywords_match_whole_words_and_symbols_match_anywhere():
    router = KeywordRouter({"conversation": ["hi"], "math": ["+"]}, "reasoning", DOMAINS).fit()
    assert [DOMAINS[i] for i in router.predict(["this thing", "hi there", "a+b", "HI"])] == [
        "reasoning",
        "conversation",
        "math",
        "conversation",
    ]
    strict = KeywordRouter({"conversation": ["hi"]}, "reasoning", DOMAINS, case_sensitive=True).fit()
    assert DOMAINS[strict.predict(["HI"])[0]] == "reasoning"


def test_rules_naming_an_unknown_domain_are_refused():
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['poetry'\]"):
        KeywordRouter({"poetry": ["rhyme"]}, "reasoning", DOMAINS).fit()


def test_the_learned_router_recovers_separable_domains_and_gives_probabilities():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(3, 8))
    domain = np.repeat(np.arange(3), 40)
    features = centres[domain] + rng.normal(size=(120, 8))
    router = LearnedRouter(random_state=0).fit(features[::2], domain[::2])
    probs = router.predict_proba(features[1::2])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (router.predict(features[1::2]) == domain[1::2]).mean() > 0.95
    with pytest.raises(ValueError, match="at least two domains"):
        LearnedRouter().fit(features[:5], np.zeros(5, dtype=int))
