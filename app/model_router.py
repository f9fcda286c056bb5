"""Which model answers an inbound text: fast, standard or reasoning. Pure and deterministic.

The rules, first match wins:

1. **reasoning** — the text needs judgement the small models get wrong: it mentions money
   (a quote, a budget, "$…"), compares or asks why, names an escalation-worthy situation
   (`tools.escalation.detect` finds something), or it is long (over `LONG_CHARS` characters
   or several questions).
2. **fast** — a short answer that only moves the conversation along: a yes/no to an open
   confirmation, a thanks, a greeting, an acknowledgement (at most `SHORT_CHARS` characters,
   no digits, no question).
3. **standard** — everything else (describing a job, giving an address, asking a question).

Photos alone (an MMS without text) go to standard: there is something to attach and say.
The chosen model and the rule that chose it are recorded with every turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tools.escalation import detect, money_amounts

Tier = Literal["fast", "standard", "reasoning"]

LONG_CHARS = 400
SHORT_CHARS = 40

_MONEY_WORDS = re.compile(
    r"\$|\b(?:quote|estimate|budget|price|cost|costs|how\s+much|dollars|grand)\b", re.IGNORECASE
)
_THINKING_WORDS = re.compile(
    r"\b(?:why|compare|versus|vs\.?|which\s+(?:is|one|option)|pros\s+and\s+cons|explain)\b",
    re.IGNORECASE,
)
_SMALL_WORD = (
    r"(?:y|yes|yeah|yep|yup|sure|ok|okay|k|no|nope|nah|confirm|confirmed|go ahead|do it|please|"
    r"cancel|stop|thanks|thank you|thx|ty|great|perfect|cool|sounds good|got it|hi|hello|hey|"
    r"good (?:morning|afternoon|evening)|bye|goodbye)"
)
_SMALL_TALK = re.compile(rf"{_SMALL_WORD}(?:[\s!.,]+{_SMALL_WORD})*[\s!.,]*", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ModelTiers:
    fast: str
    standard: str
    reasoning: str

    def model(self, tier: Tier) -> str:
        return getattr(self, tier)


@dataclass(frozen=True, slots=True)
class Route:
    tier: Tier
    model: str
    rule: str  # which rule chose it, recorded with the turn


def route(
    text: str,
    tiers: ModelTiers,
    *,
    budget_limit: float = 2000.0,
    open_confirmations: int = 0,
    media: int = 0,
) -> Route:
    """The model for an inbound text (see the module docstring for the rules)."""
    body = " ".join(text.split())

    def pick(tier: Tier, rule: str) -> Route:
        return Route(tier, tiers.model(tier), rule)

    if not body:
        return pick("standard", "photos only" if media else "empty text")
    if len(body) > LONG_CHARS or body.count("?") >= 2:
        return pick("reasoning", "long or several questions")
    if _MONEY_WORDS.search(body) or money_amounts(body):
        return pick("reasoning", "money")
    if _THINKING_WORDS.search(body):
        return pick("reasoning", "comparison or why")
    if detect(body, budget_limit=budget_limit):
        return pick("reasoning", "escalation signal")
    short = len(body) <= SHORT_CHARS and "?" not in body and not any(c.isdigit() for c in body)
    if short and not media and _SMALL_TALK.fullmatch(body):
        rule = "answer to a confirmation" if open_confirmations else "small talk"
        return pick("fast", rule)
    return pick("standard", "default")
