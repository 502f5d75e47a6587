"""Sentiment gold for free text: VADER (vaderSentiment, MIT, a lexicon that runs offline).

"Make the reply friendlier" is the default alignment target on chitchat. Raw VADER compound scores saturate on long
text and reward repetition ("love love love"), so the score is the mean compound score of the sentences, times the
fraction of distinct words; an empty reply scores `empty_score` (by default the worst score, -1).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

from framework.errors import ConfigError
from framework.interfaces import RewardFunction
from framework.records import Prompt

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
WORD = re.compile(r"[A-Za-z']+")


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:  # a core dependency; only a broken install gets here
        raise ConfigError("the sentiment gold needs the vaderSentiment package: pip install vaderSentiment") from err
    return SentimentIntensityAnalyzer()


def friendliness(text: str, repetition_penalty: bool = True, empty_score: float = -1.0) -> float:
    """Mean VADER compound score over sentences in [-1, 1], scaled by the distinct-word fraction."""
    sentences = [s for s in SENTENCE_END.split(text.strip()) if s.strip()]
    if not sentences:
        return empty_score
    analyzer = _analyzer()
    score = sum(analyzer.polarity_scores(s)["compound"] for s in sentences) / len(sentences)
    if repetition_penalty:
        words = [w.lower() for w in WORD.findall(text)]
        if words:
            score *= len(set(words)) / len(words)
    return score


class Sentiment(RewardFunction):
    """Friendliness of the completion (the prompt is not read)."""

    name = "sentiment"

    def __init__(self, repetition_penalty: bool = True, empty_score: float = -1.0):
        self.repetition_penalty, self.empty_score = repetition_penalty, empty_score

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        return [friendliness(c, self.repetition_penalty, self.empty_score) for c in completions]
