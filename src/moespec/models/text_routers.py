"""Routers that pick one domain adapter per text: keyword rules and a learned classifier.

Both follow scikit-learn's estimator conventions (parameters stored in ``__init__``, ``fit``
returns ``self``, fitted attributes end in ``_``). ``predict`` returns domain indices; the learned
router also has ``predict_proba`` (its confidence, for calibration).

- :class:`KeywordRouter`: the first rule (in order) with a keyword found in the text wins, else
  the default domain. This is the routing of the system moespec's LoRA stage was built from
  (``calculate``, ``+``, ``=`` -> math; ``python``, ``function`` -> code; ...).
- :class:`LearnedRouter`: multinomial logistic regression on standardised features, here the
  frozen base model's mean-pooled hidden state after an early block
  (:func:`moespec.models.adapters.pooled_hidden`): one truncated forward pass, no generation.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence

import numpy as np


class KeywordRouter:
    """Route a text to the domain of the first rule whose keyword it contains.

    A keyword made of word characters (``python``, ``what is``) must match whole words, so that
    ``hi`` does not fire inside ``this``; any other keyword (``+``, ``=``) matches anywhere.

    Parameters
    ----------
    rules : mapping of str to list of str
        Domain name -> keywords, in priority order.
    default : str
        Domain of a text that matches no rule.
    domains : sequence of str
        Domain names; ``predict`` returns indices into this list.
    case_sensitive : bool
    """

    def __init__(
        self, rules: Mapping[str, Sequence[str]], default: str, domains: Sequence[str], case_sensitive: bool = False
    ):
        self.rules, self.default, self.domains, self.case_sensitive = rules, default, domains, case_sensitive

    def fit(self, texts: Optional[Sequence[str]] = None, domain: Optional[np.ndarray] = None) -> "KeywordRouter":
        """Compile the rules (keyword routing learns nothing from data)."""
        unknown = sorted({d for d in [*self.rules, self.default] if d not in self.domains})
        if unknown:
            raise ValueError(f"keyword rules name unknown domain(s) {unknown}; the domains are {list(self.domains)}")
        flags = 0 if self.case_sensitive else re.IGNORECASE
        self.patterns_ = [
            (list(self.domains).index(d), re.compile("|".join(_pattern(k) for k in keywords), flags))
            for d, keywords in self.rules.items()
            if keywords
        ]
        self.default_index_ = list(self.domains).index(self.default)
        return self

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Domain index of each text, ndarray of shape (n_texts,), int64."""
        return np.array([self._route(text) for text in texts], dtype=np.int64)

    def _route(self, text: str) -> int:
        for domain, pattern in self.patterns_:
            if pattern.search(text):
                return domain
        return self.default_index_


def _pattern(keyword: str) -> str:
    escaped = re.escape(keyword)
    if re.fullmatch(r"[\w ]+", keyword):
        return rf"\b{escaped}\b"
    return escaped


class LearnedRouter:
    """Multinomial logistic regression from features (pooled hidden states) to domains.

    Parameters
    ----------
    C : float
        Inverse L2 regularisation strength (scikit-learn's ``LogisticRegression``).
    max_iter : int
    random_state : int
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, random_state: int = 0):
        self.C, self.max_iter, self.random_state = C, max_iter, random_state

    def fit(self, features: np.ndarray, domain: np.ndarray) -> "LearnedRouter":
        """Fit on ``features`` of shape (n_texts, d) and their domains of shape (n_texts,)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if len(np.unique(domain)) < 2:
            raise ValueError("a learned router needs training texts of at least two domains")
        self.pipeline_ = make_pipeline(
            StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
        )
        self.pipeline_.fit(np.asarray(features, dtype=np.float64), domain)
        self.classes_ = self.pipeline_.classes_
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of each domain in ``classes_``, ndarray of shape (n_texts, n_classes)."""
        return self.pipeline_.predict_proba(np.asarray(features, dtype=np.float64))

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(features).argmax(axis=1)]
