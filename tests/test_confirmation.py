"""The confirmation protocol's pure core: who may confirm, and what counts as a yes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools.confirmation import (
    Party,
    PendingAction,
    Reason,
    Replies,
    State,
    Verdict,
    belongs_to,
    judge_replies,
    judge_reply,
    precheck,
    tokens,
)

BOOKING = "I'll book a boiler service for Tuesday at 3 PM."
CANCELLING = "I'll cancel your appointment on Friday at 10 AM."

# --- what counts as a yes -------------------------------------------------------------------

MILD_YES = [
    "yes",
    "Yes.",
    "YES!",
    "yeah",
    "Yeah, that's fine.",
    "yep",
    "yup",
    "sure",
    "sure, thanks",
    "ok",
    "OK.",
    "okay",
    "Okay, thank you.",
    "alright",
    "all right",
    "fine",
    "uh-huh",
    "Mm-hmm.",
    "mhm",
    "sounds good",
    "that works for me",
    "perfect",
    "great, thanks",
    "yes please",
    "Yes please, thanks a lot!",
    "yesss",
    "Yeah yeah",
    "um, yes",
    "Uh, yeah, go ahead.",
    "👍",
    "k",
    "of course",
    "Yes, Tuesday at 3 is good.",
    "Yes, at 3pm",
    "Yes, 3 PM works",
    "yes, book it",
]

EXPLICIT_YES = [
    "confirm",
    "Confirmed.",
    "I confirm.",
    "affirmative",
    "yes, go ahead",
    "Yes, go ahead please.",
    "yeah, do it",
    "ok, go ahead",
    "sure, do it",
    "Yes I'm sure",
    "yes I am sure",
    "Yes, absolutely.",
    "yes definitely",
    "yes, that's right",
    "Yes, that is correct.",
    "Yeah go for it",
    "okay, proceed",
    "Yes, cancel it.",
    "yes, cancel",
    "yes, delete it",
]

NOT_EXPLICIT = [
    "yes",
    "yeah",
    "yep",
    "ok",
    "okay",
    "sure",
    "fine",
    "alright",
    "yes please",
    "go ahead",
    "absolutely",
    "uh-huh",
    "yeah yeah",
    "sounds good",
    "👍",
]

NEGATED = [
    "no",
    "No.",
    "nope",
    "nah",
    "no thanks",
    "No, Thursday instead.",
    "not yet",
    "yes... actually no",
    "Yes, no, sorry, not that one.",
    "I don't think so",
    "I dont want that",
    "don't",
    "Don’t do that",
    "yes I can't",
    "never mind",
    "nevermind",
    "forget it",
    "stop",
    "that's wrong",
    "No problem",
    "sure, why not",
    "noooo",
    "NO!!",
    "ok cancel that",
    "yes, cancel it",  # for a booking, "cancel" refuses it
]

HESITANT = [
    "wait",
    "Wait, what?",
    "hold on",
    "hang on a second",
    "hmm",
    "Hmm, let me think",
    "maybe",
    "yes?",
    "Yes, but only in the morning",
    "yes if it's before noon",
    "Yes, at 4pm",
    "yes at 5",
    "okay, what time was that",
    "actually, yes",
    "I guess so",
    "I think so",
    "probably",
    "sorry?",
    "yes, and also the kitchen sink",
    "Okay so what I really want is a Thursday slot",
    "later",
]

UNCLEAR = [
    "thanks",
    "Thank you.",
    "hello",
    "The blue house on the corner",
    "Ok and my neighbour needs a plumber for her bathroom",
    "x" * 2000,
]


@pytest.mark.parametrize("text", MILD_YES)
@pytest.mark.parametrize("risk", ["low", "medium"])
def test_mild_yes_affirms_low_and_medium(text: str, risk: str) -> None:
    judgement = judge_reply(text, risk=risk, context=BOOKING, action="create_booking")
    assert judgement.verdict is Verdict.AFFIRMED, judgement
    assert judgement.affirmed


@pytest.mark.parametrize("text", EXPLICIT_YES)
def test_explicit_yes_affirms_high(text: str) -> None:
    judgement = judge_reply(text, risk="high", context=CANCELLING, action="cancel_booking")
    assert judgement.verdict is Verdict.AFFIRMED, judgement


@pytest.mark.parametrize("text", NOT_EXPLICIT)
def test_bare_yes_is_not_explicit_enough_for_high(text: str) -> None:
    judgement = judge_reply(text, risk="high", context=CANCELLING, action="cancel_booking")
    assert judgement.verdict is Verdict.NOT_EXPLICIT, judgement
    assert not judgement.affirmed
    # ...but the same words do agree to something less risky.
    assert judge_reply(text, risk="medium", context=CANCELLING, action="cancel_booking").affirmed


@pytest.mark.parametrize("text", NEGATED)
@pytest.mark.parametrize("risk", ["low", "medium", "high"])
def test_negations_refuse(text: str, risk: str) -> None:
    judgement = judge_reply(text, risk=risk, context=BOOKING, action="create_booking")
    assert judgement.verdict is Verdict.NEGATED, judgement


@pytest.mark.parametrize("text", HESITANT)
@pytest.mark.parametrize("risk", ["low", "high"])
def test_hesitations_are_not_a_yes(text: str, risk: str) -> None:
    judgement = judge_reply(text, risk=risk, context=BOOKING, action="create_booking")
    assert judgement.verdict is Verdict.HESITANT, judgement


@pytest.mark.parametrize("text", UNCLEAR)
def test_replies_that_say_something_else_are_unclear(text: str) -> None:
    judgement = judge_reply(text, risk="low", context=BOOKING, action="create_booking")
    assert judgement.verdict is Verdict.UNCLEAR, judgement


@pytest.mark.parametrize("text", [None, "", "   ", "\n"])
def test_no_words_is_no_reply(text: str | None) -> None:
    assert judge_reply(text, risk="low").verdict is Verdict.NO_REPLY


def test_cancel_agrees_only_to_a_cancellation() -> None:
    assert judge_reply("yes, cancel it", risk="high", action="cancel_booking").affirmed
    # The summary names a cancellation even when the tool's name does not.
    assert judge_reply(
        "ok, cancel it", risk="medium", context="I'll mark booking 7 as cancelled.", action="x"
    ).affirmed
    assert judge_reply("ok, cancel it", risk="medium", action="create_booking").verdict is (
        Verdict.NEGATED
    )


def test_words_of_the_proposal_can_be_repeated_back() -> None:
    context = "I'll send the quote for the second bathroom after the inspection."
    assert judge_reply(
        "yes, the second bathroom after the inspection", risk="low", context=context
    ).affirmed
    assert not judge_reply("yes, the second bathroom", risk="low", context=BOOKING).affirmed


def test_tokens_normalise_what_transcripts_and_texts_look_like() -> None:
    assert tokens("Don’t  DO it!") == ["dont", "do", "it"]
    assert tokens("Uh-huh, 3pm") == ["uhhuh", "3", "pm"]
    assert tokens("yesssss") == ["yes"]
    assert tokens("👍") == ["ok"]
    assert tokens("Ｙｅｓ") == ["yes"]  # full-width letters


# --- robustness (hypothesis) ------------------------------------------------------------------

RISKS = st.sampled_from(["read", "low", "medium", "high"])
NEGATION_WORDS = st.sampled_from(
    ["no", "not", "nope", "don't", "never", "can't", "won't", "NO", "Nope", "stop", "wrong"]
)


@settings(max_examples=500)
@given(text=st.text(), risk=RISKS, context=st.text(max_size=80), action=st.text(max_size=30))
def test_judging_never_raises(text: str, risk: str, context: str, action: str) -> None:
    judgement = judge_reply(text, risk=risk, context=context, action=action)
    assert isinstance(judgement.verdict, Verdict)
    assert judgement.message


@given(
    before=st.lists(st.sampled_from(MILD_YES + EXPLICIT_YES + ["please", "thanks"]), max_size=3),
    after=st.lists(st.sampled_from(MILD_YES + EXPLICIT_YES + ["please", "thanks"]), max_size=3),
    negation=NEGATION_WORDS,
    risk=RISKS,
)
def test_a_negation_anywhere_overrides_any_yes(
    before: list[str], after: list[str], negation: str, risk: str
) -> None:
    text = " ".join([*before, negation, *after])
    judgement = judge_reply(text, risk=risk, context=BOOKING, action="create_booking")
    assert judgement.verdict is Verdict.NEGATED


@given(
    text=st.text(max_size=60) | st.sampled_from(MILD_YES + EXPLICIT_YES),
    action=st.text(max_size=20),
)
def test_a_yes_for_high_risk_is_a_yes_for_less(text: str, action: str) -> None:
    if judge_reply(text, risk="high", context=CANCELLING, action=action).affirmed:
        for risk in ("read", "low", "medium"):
            assert judge_reply(text, risk=risk, context=CANCELLING, action=action).affirmed


@given(
    texts=st.lists(st.text(max_size=30) | st.sampled_from(MILD_YES + NEGATED), max_size=5),
    negation=st.sampled_from(NEGATED[:10]),
    position=st.integers(min_value=0, max_value=5),
)
def test_an_earlier_refusal_is_never_overridden(
    texts: list[str], negation: str, position: int
) -> None:
    texts.insert(min(position, len(texts)), negation)
    replies = Replies(texts=(*texts, "yes, go ahead"))
    assert not judge_replies(replies, risk="low", context=BOOKING).affirmed


# --- replies since a proposal ----------------------------------------------------------------


def test_latest_reply_decides_after_hesitation() -> None:
    replies = Replies(texts=("wait, what time was that?", "Tuesday at 3", "ok, yes"))
    assert judge_replies(replies, risk="medium", context=BOOKING).affirmed


def test_latest_reply_must_be_the_yes() -> None:
    replies = Replies(texts=("yes", "hmm, wait"))
    assert judge_replies(replies, risk="medium").verdict is Verdict.HESITANT


def test_refusal_before_a_yes_refuses() -> None:
    replies = Replies(texts=("no, Thursday instead", "yes"))
    judgement = judge_replies(replies, risk="medium", context=BOOKING)
    assert judgement.verdict is Verdict.REFUSED_EARLIER
    assert judgement.reply == "no, Thursday instead"


def test_untranscribed_audio_means_no_judgement() -> None:
    replies = Replies(texts=("yes",), complete=False)
    assert judge_replies(replies, risk="low").verdict is Verdict.UNTRANSCRIBED


def test_nothing_said_is_no_reply() -> None:
    assert judge_replies(Replies(), risk="low").verdict is Verdict.NO_REPLY


# --- who may confirm, and when -----------------------------------------------------------------

NOW = 1_700_000_000.0


def action(**overrides: object) -> PendingAction:
    fields: dict[str, object] = {
        "id": "cf_1",
        "tool": "create_booking",
        "arguments": {"day": "tue"},
        "tenant": "acme",
        "conversation_id": "CA1",
        "channel": "voice",
        "caller": "+15551230001",
        "persona": "dispatcher",
        "risk": "medium",
        "summary": BOOKING,
        "created_at": NOW,
        "expires_at": NOW + 300,
    }
    return PendingAction(**(fields | overrides))  # type: ignore[arg-type]


SAME_CALL = Party("acme", "CA1", "+15551230001")
SAME_CALLER_BY_SMS = Party("acme", "sms:acme:+15551230001", "+15551230001")
OTHER_CALLER = Party("acme", "sms:acme:+15559999999", "+15559999999")
OTHER_TENANT = Party("globex", "CA1", "+15551230001")


def test_same_conversation_and_same_caller_may_confirm() -> None:
    assert precheck(action(), State.PENDING, SAME_CALL, NOW + 1) is None
    assert precheck(action(), State.PENDING, SAME_CALLER_BY_SMS, NOW + 1) is None
    assert belongs_to(action(), SAME_CALLER_BY_SMS)


def test_strangers_and_other_tenants_may_not() -> None:
    assert precheck(action(), State.PENDING, OTHER_CALLER, NOW + 1) is Reason.OTHER_CONVERSATION
    # Another tenant does not even learn that the confirmation exists.
    assert precheck(action(), State.PENDING, OTHER_TENANT, NOW + 1) is Reason.UNKNOWN
    assert precheck(None, None, SAME_CALL, NOW) is Reason.UNKNOWN


@pytest.mark.parametrize("caller", ["anonymous", "", "Restricted", "+1", "15551230001"])
def test_withheld_numbers_only_confirm_in_their_own_conversation(caller: str) -> None:
    pending = action(caller=caller)
    assert precheck(pending, State.PENDING, Party("acme", "CA1", caller), NOW) is None
    elsewhere = Party("acme", "CA2", caller)
    assert precheck(pending, State.PENDING, elsewhere, NOW) is Reason.OTHER_CONVERSATION


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (State.EXECUTING, Reason.ALREADY_EXECUTED),
        (State.EXECUTED, Reason.ALREADY_EXECUTED),
        (State.FAILED, Reason.PREVIOUSLY_FAILED),
        (State.CANCELLED, Reason.CANCELLED),
        (State.EXPIRED, Reason.EXPIRED),
    ],
)
def test_settled_actions_are_final(state: State, reason: Reason) -> None:
    assert precheck(action(), state, SAME_CALL, NOW + 1) is reason


def test_expiry_is_checked_against_the_clock() -> None:
    assert precheck(action(), State.PENDING, SAME_CALL, NOW + 299.9) is None
    assert precheck(action(), State.PENDING, SAME_CALL, NOW + 300) is Reason.EXPIRED
    # A settled state says more than the clock does.
    assert precheck(action(), State.EXECUTED, SAME_CALL, NOW + 301) is Reason.ALREADY_EXECUTED
