"""The confirmation protocol's pure core: who may confirm a pending action, and whether what
the caller said is a "yes".

Sans-I/O: no Redis, no clock, no `await`. The runner feeds in the stored action, its state,
the time and the caller's replies; these functions say what happens.

Lifecycle of a pending action (the state lives in Redis, see `tools.pending`)::

    pending ──confirm (affirmed, claimed)──> executing ──> executed | failed
       │ ────cancel (claimed)──────────────> cancelled
       └ ────attempt after expires_at──────> expired

Every arrow out of `pending` is one atomic claim, so exactly one of them can ever happen.

Who may act on a pending action (`belongs_to`): the same tenant, and either the conversation
it was proposed in, or any conversation with the same caller number. That lets a proposal made
on a call be confirmed by text later (`sms:{tenant}:{number}`). The number must be a real
E.164 number: withheld caller ids ("anonymous", "") never match across conversations.

What counts as a yes (`judge_reply`), checked in this order on one reply:

1. Refusal: any negation word ("no", "not", "nope", "never", "stop", "wrong", any "...n't",
   "nevermind", "forget"...) makes the reply `negated`, whatever else it says: "yes... actually
   no" is a no, and so are idioms like "no problem" (the caller is simply asked again).
   "Cancel" is a refusal too ("ok, cancel that"), unless the proposal itself is a
   cancellation (a "cancel..." word in the tool's name or the summary).
2. Hesitation: a question mark, a question word ("what", "when"...), a pause or condition
   ("wait", "hold on", "hmm", "actually", "but", "maybe", "if", "later", "instead", "also"...)
   or a number makes it `hesitant`, unless that word or number is in the proposal's summary
   ("yes, after 2" to "...after 2 PM" is fine; "yes, at 4" to "...at 3 PM" is not).
3. There must be an affirmation ("yes", "yeah", "ok", "sure", "go ahead", "sounds good",
   "confirm", "👍"...) and little else: more than two words that are neither affirmation,
   filler, polite padding nor words of the proposal itself make it `unclear`.
4. For `high` risk the affirmation must be explicit: a "confirm" word ("confirm", "confirmed",
   "I confirm", "affirmative"), or an affirmation together with a second, distinct commitment:
   "go ahead", "do it", "proceed", "I'm sure", "absolutely", "definitely", "of course",
   "that's right", or a verb naming the action ("cancel", "book", "delete"... or a word of the
   tool's name). So "yes, cancel it", "yes I'm sure", "ok go ahead" and "confirm" are explicit;
   a bare "yes", "yeah", "ok", "sure", "yes please" or "go ahead" alone are not.

Across several replies since the proposal (`judge_replies`): the latest must be a yes by the
rules above, and none of the earlier ones may be a refusal. A caller who said "no, Thursday"
to a Tuesday booking cannot have that same Tuesday booking confirmed by their "yes" to the
Thursday one that followed. Hesitations before a final yes ("what time was that?" ... "ok,
yes") are fine. If caller audio is still untranscribed, there is no judgement: nobody knows
what the newest words were.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tools.registry import Risk

# --- the pending action and its state ---------------------------------------------------------


class State(StrEnum):
    PENDING = "pending"
    EXECUTING = "executing"
    EXECUTED = "executed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class PendingAction:
    """A write the model proposed: exactly what will run if the caller agrees."""

    id: str
    tool: str
    arguments: dict[str, Any]  # validated, in JSON form
    tenant: str
    conversation_id: str
    channel: str
    caller: str
    persona: str
    risk: Risk
    summary: str
    created_at: float  # server wall clock (time.time()), shared by every process
    expires_at: float


@dataclass(frozen=True, slots=True)
class Party:
    """Who is trying to confirm or cancel: the conversation asking."""

    tenant: str
    conversation_id: str
    caller: str


class Reason(StrEnum):
    """Why a confirm or cancel attempt was refused (the `reason` the model sees)."""

    UNKNOWN = "unknown_confirmation"
    OTHER_CONVERSATION = "other_conversation"
    NOT_ALLOWED = "not_allowed"
    ALREADY_EXECUTED = "already_executed"
    PREVIOUSLY_FAILED = "previously_failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    NOT_AFFIRMED = "not_affirmed"


REASON_MESSAGES: dict[Reason, str] = {
    Reason.UNKNOWN: "There is no pending action with that confirmation_id.",
    Reason.OTHER_CONVERSATION: "That pending action belongs to another caller.",
    Reason.NOT_ALLOWED: "That action is not available in this conversation.",
    Reason.ALREADY_EXECUTED: "That action has already been carried out; do not repeat it.",
    Reason.PREVIOUSLY_FAILED: "That action already failed once; propose it again if the "
    "caller still wants it.",
    Reason.CANCELLED: "That action was cancelled; propose it again if the caller wants it.",
    Reason.EXPIRED: "That proposal expired; propose it again and read the new summary.",
    Reason.NOT_AFFIRMED: "The caller has not clearly agreed since the proposal.",
}

_E164 = re.compile(r"\+[1-9][0-9]{6,14}")


def is_phone_number(caller: str) -> bool:
    return _E164.fullmatch(caller) is not None


def belongs_to(action: PendingAction, party: Party) -> bool:
    """May `party` confirm or cancel `action`? (The rule is in the module docstring.)"""
    if action.tenant != party.tenant:
        return False
    if action.conversation_id == party.conversation_id:
        return True
    return is_phone_number(action.caller) and action.caller == party.caller


def precheck(
    action: PendingAction | None, state: State | None, party: Party, now: float
) -> Reason | None:
    """Everything that rules an attempt out before the caller's words are looked at.

    Another tenant's action is reported as unknown: its existence is none of their business.
    """
    if action is None or action.tenant != party.tenant:
        return Reason.UNKNOWN
    if not belongs_to(action, party):
        return Reason.OTHER_CONVERSATION
    match state:
        case State.EXECUTING | State.EXECUTED:
            return Reason.ALREADY_EXECUTED
        case State.FAILED:
            return Reason.PREVIOUSLY_FAILED
        case State.CANCELLED:
            return Reason.CANCELLED
        case State.EXPIRED:
            return Reason.EXPIRED
    if now >= action.expires_at:
        return Reason.EXPIRED
    return None


# --- judging the caller's words ----------------------------------------------------------------


class Verdict(StrEnum):
    AFFIRMED = "affirmed"
    NOT_EXPLICIT = "not_explicit"  # a yes, but high risk needs an explicit one
    NEGATED = "negated"
    HESITANT = "hesitant"
    UNCLEAR = "unclear"
    NO_REPLY = "no_reply"
    UNTRANSCRIBED = "untranscribed"  # the caller's newest words are not transcribed yet
    REFUSED_EARLIER = "refused_earlier"


VERDICT_MESSAGES: dict[Verdict, str] = {
    Verdict.AFFIRMED: "The caller agreed.",
    Verdict.NOT_EXPLICIT: "This action needs an explicit confirmation: ask the caller to say "
    "something like 'yes, go ahead' or 'I confirm'.",
    Verdict.NEGATED: "The caller said no. Do not retry unless they ask again.",
    Verdict.HESITANT: "The caller hesitated or asked something: answer them, then ask again.",
    Verdict.UNCLEAR: "The caller's reply was not a clear yes: ask them to confirm.",
    Verdict.NO_REPLY: "The caller has not replied since the proposal: read the summary and "
    "ask them to confirm first.",
    Verdict.UNTRANSCRIBED: "The caller's reply could not be understood in time: ask again.",
    Verdict.REFUSED_EARLIER: "The caller refused this proposal earlier; if they now want "
    "it, propose it again and read the new summary.",
}


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    reply: str | None = None

    @property
    def affirmed(self) -> bool:
        return self.verdict is Verdict.AFFIRMED

    @property
    def message(self) -> str:
        return VERDICT_MESSAGES[self.verdict]


@dataclass(frozen=True, slots=True)
class Replies:
    """What the caller said since a proposal, oldest first."""

    texts: tuple[str, ...] = ()
    # False while caller audio committed after the proposal is still being transcribed.
    complete: bool = True

    @property
    def latest(self) -> str | None:
        return self.texts[-1] if self.texts else None


# "...n't" forms are matched with the apostrophe gone ("dont"), so "want"/"went" stay words.
_CONTRACTIONS = (
    "don't doesn't didn't isn't wasn't aren't weren't won't wouldn't shouldn't couldn't "
    "haven't hasn't hadn't ain't can't needn't mustn't mightn't shan't"
)
_NEGATIONS = frozenset(
    """
    no noo nope nah naw nay not never nothing none neither nor cannot stop abort wrong
    incorrect mistake nevermind forget negative decline refuse reject
    """.split()
) | frozenset(c.replace("'", "") for c in _CONTRACTIONS.split())
_HESITATIONS = frozenset(
    """
    wait hold hang actually but however though although maybe perhaps probably possibly might
    unsure hmm hm huh sec second moment minute later think guess suppose if unless instead
    rather else also too another different sorry pardon repeat again question what why how
    when where which who whom whose kind sort depends except only until before after first
    """.split()
)


def _phrases(text: str) -> frozenset[tuple[str, ...]]:
    """Comma-separated phrases, each as a tuple of words."""
    return frozenset(tuple(p.split()) for p in text.split(",") if p.strip())


# Everything here is an affirmation; the two sets after it say which ones are explicit on
# their own, and which count as a commitment for high-risk actions.
_AFFIRMATION_SET = _phrases(
    """
    yes, yeah, yea, yep, yup, ya, yah, yas, aye, sure, ok, okay, okey, okie, k, kk, alright,
    all right, fine, correct, absolutely, definitely, certainly, indeed, perfect, great,
    excellent, exactly, affirmative, confirm, confirmed, i confirm, agreed, agree, i agree, deal,
    please, please do, proceed, uhhuh, uh huh, mhm, mmhm, mmhmm, mm hmm, of course, go ahead,
    go for it, do it, do that, lets do it, sounds good, sounds great, sounds perfect,
    thats right, that is right, thats correct, that is correct, that works, works for me,
    im sure, i am sure, im certain, i am certain, for sure
    """
)
_AFFIRMATIONS = sorted(_AFFIRMATION_SET, key=len, reverse=True)  # longest match first
_CONFIRM_WORDS = _phrases("confirm, confirmed, i confirm, affirmative")
_COMMITMENTS = _phrases(
    """
    go ahead, go for it, do it, do that, lets do it, please do, proceed, im sure, i am sure,
    im certain, i am certain, for sure, absolutely, definitely, certainly, of course,
    thats right, that is right, thats correct, that is correct
    """
)
# Verbs that name an action ("yes, cancel it"); words of the tool's name count too.
_ACTION_VERBS = frozenset(
    """
    book schedule reschedule cancel delete remove send update change move save add create
    mark close log record charge refund pay submit apply assign dispatch order set
    """.split()
)
# Words that carry no decision: fillers, pronouns, courtesy.
_NEUTRAL = frozenset(
    """
    uh um umm er erm ah oh well so hey hi hello i im me my mine you your yours we us our it its
    itd itll that thats this these those them they the a an and to for on at in of with by is
    are be am was will would can could go do does did just now then thanks thank thx ty very
    much lot really sir madam maam mate man dude buddy friend love good let lets here there all
    both ill youll well thatll have has had got get sounds looks seems totally
    """.split()
)
_EMOJI_WORDS = str.maketrans({"👍": " ok ", "👌": " ok ", "✅": " yes ", "✔": " yes "})
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "`": "'", "´": "'", "ʼ": "'"})
_HYPHENATED = re.compile(r"(?<=[^\W\d_])-(?=[^\W\d_])")
_STRETCHED = re.compile(r"([^\W\d_])\1{2,}")  # "yesss" -> "yes", "noooo" -> "no"
_TOKENS = re.compile(r"\d+|[^\W\d_]+(?:'[^\W\d_]+)*")
_QUESTION_MARKS = ("?", "¿", "？")
MAX_OTHER_WORDS = 2
MAX_REPLY_CHARS = 1000  # a yes is short; a speech is not a yes


def tokens(text: str) -> list[str]:
    """Lower-case words, apostrophes dropped ("don't" -> "dont"), digits split from letters."""
    text = unicodedata.normalize("NFKC", text).translate(_EMOJI_WORDS).casefold()
    text = _HYPHENATED.sub("", text.translate(_APOSTROPHES))
    return [_STRETCHED.sub(r"\1", t.replace("'", "")) for t in _TOKENS.findall(text)]


def _is_negation(word: str, cancelling: bool) -> bool:
    # "Ok, cancel that" refuses a booking, but "yes, cancel it" agrees to a cancellation.
    return word in _NEGATIONS or (word.startswith("cancel") and not cancelling)


def _match_phrases(
    words: Sequence[str],
) -> tuple[list[tuple[str, ...]], list[str]]:
    """Split words into affirmation phrases (greedy, longest first) and everything else."""
    found: list[tuple[str, ...]] = []
    rest: list[str] = []
    i = 0
    while i < len(words):
        for phrase in _AFFIRMATIONS:
            if tuple(words[i : i + len(phrase)]) == phrase:
                found.append(phrase)
                i += len(phrase)
                break
        else:
            rest.append(words[i])
            i += 1
    return found, rest


def _names_action(word: str, action_words: Iterable[str]) -> bool:
    if word in _ACTION_VERBS:
        return True
    # "book" names "create_booking"; "cancelling" names "cancel_booking".
    return any(
        word == w or (len(word) >= 4 and w.startswith(word)) or (len(w) >= 4 and word.startswith(w))
        for w in action_words
    )


def judge_reply(text: str | None, *, risk: Risk, context: str = "", action: str = "") -> Judgement:
    """Is this one reply a yes to a proposal of `risk`? Never raises.

    `context` is the proposal's summary (its words and numbers may be repeated back freely);
    `action` is the tool's name (its words name the action for the explicit-yes rule).
    """
    if text is None or not text.strip():
        return Judgement(Verdict.NO_REPLY, text)
    if len(text) > MAX_REPLY_CHARS:
        return Judgement(Verdict.UNCLEAR, text)
    words = tokens(text)
    action_words = set(tokens(action.replace("_", " ")))
    known = set(tokens(context)) | action_words
    cancelling = any(w.startswith("cancel") for w in known)
    if any(_is_negation(w, cancelling) for w in words):
        return Judgement(Verdict.NEGATED, text)
    if (
        any(mark in text for mark in _QUESTION_MARKS)
        or any(w in _HESITATIONS and w not in known for w in words)
        # A number the proposal did not mention ("yes, at 4") asks for something else.
        or any(w.isdigit() and w not in known for w in words)
    ):
        return Judgement(Verdict.HESITANT, text)
    found, rest = _match_phrases(words)
    if not found:
        return Judgement(Verdict.UNCLEAR, text)
    directives = [w for w in rest if _names_action(w, action_words)]
    others = [w for w in rest if w not in _NEUTRAL and w not in known and w not in directives]
    if len(others) > MAX_OTHER_WORDS:
        return Judgement(Verdict.UNCLEAR, text)
    if risk == "high" and not _explicit(found, directives):
        return Judgement(Verdict.NOT_EXPLICIT, text)
    return Judgement(Verdict.AFFIRMED, text)


def _explicit(found: list[tuple[str, ...]], directives: list[str]) -> bool:
    if any(p in _CONFIRM_WORDS for p in found):
        return True
    commitments = [p for p in found if p in _COMMITMENTS]
    # Two distinct signals: an affirmation plus a commitment or an action verb. A lone
    # "absolutely" or "go ahead" is one signal, however strong it sounds.
    return bool(directives) or (bool(commitments) and len(found) >= 2)


def judge_replies(
    replies: Replies, *, risk: Risk, context: str = "", action: str = ""
) -> Judgement:
    """Judge everything the caller said since a proposal (rules in the module docstring)."""
    if not replies.complete:
        return Judgement(Verdict.UNTRANSCRIBED, replies.latest)
    if not replies.texts:
        return Judgement(Verdict.NO_REPLY)
    for earlier in replies.texts[:-1]:
        if judge_reply(earlier, risk=risk, context=context, action=action).verdict is (
            Verdict.NEGATED
        ):
            return Judgement(Verdict.REFUSED_EARLIER, earlier)
    return judge_reply(replies.latest, risk=risk, context=context, action=action)
