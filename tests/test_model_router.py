"""The SMS model router: which tier answers which text (the rules in app/model_router.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.model_router import LONG_CHARS, ModelTiers, route

TIERS = ModelTiers(fast="tiny-model", standard="mid-model", reasoning="big-model")


@pytest.mark.parametrize(
    ("text", "tier", "rule"),
    [
        ("yes", "fast", "small talk"),
        ("Yes please!", "fast", "small talk"),
        ("ok thanks", "fast", "small talk"),
        ("Hi", "fast", "small talk"),
        ("no", "fast", "small talk"),
        ("My kitchen tap is dripping", "standard", "default"),
        ("12 Elm Street, Springfield", "standard", "default"),
        ("yes, at 12 Elm Street", "standard", "default"),  # digits: more than a yes
        ("Are you open Saturday?", "standard", "default"),
        ("How much would a new faucet cost?", "reasoning", "money"),
        ("Can you give me a quote", "reasoning", "money"),
        ("We have $800 set aside", "reasoning", "money"),
        ("Why did the tech not come?", "reasoning", "comparison or why"),
        ("Which is better, tankless or a tank?", "reasoning", "comparison or why"),
        ("The basement is flooding", "reasoning", "escalation signal"),
        ("I want to speak to the owner", "reasoning", "escalation signal"),
        ("Are you open? Do you do drains?", "reasoning", "long or several questions"),
        ("word " * (LONG_CHARS // 5 + 1), "reasoning", "long or several questions"),
        ("", "standard", "empty text"),
    ],
)
def test_routes(text: str, tier: str, rule: str) -> None:
    chosen = route(text, TIERS)
    assert (chosen.tier, chosen.rule) == (tier, rule)
    assert chosen.model == TIERS.model(chosen.tier)


def test_a_yes_to_an_open_confirmation_is_named_as_such() -> None:
    chosen = route("YES", TIERS, open_confirmations=1)
    assert (chosen.tier, chosen.rule) == ("fast", "answer to a confirmation")


def test_photos_go_to_the_standard_model() -> None:
    assert route("", TIERS, media=2).rule == "photos only"
    assert route("thanks", TIERS, media=1).tier == "standard"


def test_amounts_without_money_words_are_money() -> None:
    assert route("it is a 3k job", TIERS).rule == "money"
    assert route("about 12 grand", TIERS).rule == "money"
    assert route("call me at 5551234567", TIERS).tier == "standard"  # a number is not money


@given(st.text(max_size=600))
def test_always_a_configured_model(text: str) -> None:
    chosen = route(text, TIERS)
    assert chosen.model in {"tiny-model", "mid-model", "big-model"}
    assert chosen.model == TIERS.model(chosen.tier)
