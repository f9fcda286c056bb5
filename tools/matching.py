"""Which record did the caller mean? Fuzzy resolution of spoken references to CRM rows.

Callers name things the way people talk ("the Johnson job", "Mike", "555-0142"), and
speech-to-text misspells names. A tool that takes a person, company or deal accepts
either an id from an earlier result or such a reference; this module decides whether it names
exactly one row, several rows equally well (the model must ask which one), or none (the model
offers the closest suggestions).

Scoring is token-wise (Monge-Elkan over rapidfuzz's `fuzz.ratio`): every word the caller said is
matched to its best word in the record and the scores are averaged. Unlike whole-string
ratios this makes a surname alone a perfect match for every record carrying it (so two
Johnsons tie and the caller is asked), tolerates one misheard letter per word ("Jonson"), and
never rewards a record merely for being short or long.

Everything here is pure: handlers fetch the rows, build `Candidate`s and act on the
`Resolution`.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rapidfuzz import fuzz, process
from rapidfuzz.utils import default_process

# A record matches when its score reaches MATCH_CUTOFF (out of 100). 80 admits one wrong
# letter in a six-letter word ("Jonson" ~ "Johnson" scores 92) but not a different word of
# similar shape ("Smith" ~ "Smithers" scores 77, offered only as a suggestion).
MATCH_CUTOFF = 80.0
# Records within TIE_MARGIN of the best are "equally good": the caller has to choose.
TIE_MARGIN = 5.0
# Below the cutoff, records above SUGGESTION_FLOOR are offered as "did you mean".
SUGGESTION_FLOOR = 60.0
# A search lists records scoring at least this: looser than a match, tighter than a guess.
SEARCH_FLOOR = 70.0
# A reference with at least this many digits (and nothing but digits and phone punctuation)
# is a phone number, matched by its trailing digits.
MIN_PHONE_DIGITS = 4
MAX_CHOICES = 5

_PHONE_LIKE = re.compile(r"^[\d\s().+\-]+$")

Status = Literal["found", "ambiguous", "not_found"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """One record a reference might name."""

    key: Hashable  # the row id
    label: str  # how the model should say it: "Mike Johnson, kitchen remodel, 555-0142"
    names: tuple[str, ...]  # texts a caller might use: full name, company, deal title...
    phones: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Scored:
    candidate: Candidate
    score: float


@dataclass(frozen=True, slots=True)
class Resolution:
    status: Status
    # found: the one match; ambiguous: the tied matches, best first; not_found: suggestions.
    matches: tuple[Scored, ...] = field(default=())

    @property
    def key(self) -> Hashable:
        """The id of the record found (only valid when status == "found")."""
        if self.status != "found":
            raise LookupError(f"reference not resolved: {self.status}")
        return self.matches[0].candidate.key


def normalize(text: str) -> str:
    """Lower-case, punctuation to spaces, single-spaced: the form names are compared in."""
    return " ".join(default_process(text).split())


def digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def is_phone_reference(reference: str) -> bool:
    return bool(_PHONE_LIKE.match(reference)) and len(digits(reference)) >= MIN_PHONE_DIGITS


def phone_matches(reference: str, phone: str) -> bool:
    """Does a spoken/typed number name this stored phone? Trailing digits decide, so "0142",
    "555-0142" and "+1 (555) 555-0142" all name +15555550142."""
    wanted, stored = digits(reference), digits(phone)
    if len(wanted) < MIN_PHONE_DIGITS or not stored:
        return False
    return stored.endswith(wanted) or wanted.endswith(stored)


def spoken_phone(phone: str | None) -> str | None:
    """A phone number as a person would read it: "+15555550142" -> "555-555-0142"."""
    if not phone:
        return None
    number = digits(phone)
    if len(number) == 11 and number.startswith("1"):
        number = number[1:]
    if len(number) == 10:
        return f"{number[:3]}-{number[3:6]}-{number[6:]}"
    return phone.strip()


def label(*parts: str | None) -> str:
    """A short spoken label from the parts that are present: "Mike Johnson, kitchen remodel"."""
    return ", ".join(p.strip() for p in parts if p and p.strip())


def token_score(reference: str, text: str, **_: Any) -> float:
    """Monge-Elkan similarity (0-100): each word of `reference` against its best word of `text`.

    Accepts and ignores rapidfuzz's scorer keyword arguments (`processor`, `score_cutoff`) so it
    can be handed to `rapidfuzz.process` as a scorer; inputs must already be normalized.
    """
    wanted, offered = reference.split(), text.split()
    if not wanted or not offered:
        return 0.0
    pairwise = process.cdist(wanted, offered, scorer=fuzz.ratio)
    return float(pairwise.max(axis=1).mean())


def rank(reference: str, candidates: Sequence[Candidate]) -> list[Scored]:
    """Every candidate with its score, best first (input order among equals).

    A candidate's names are scored as one bag of words, so a reference may mix them ("Johnson
    kitchen" names Mike Johnson's kitchen remodel); with Monge-Elkan, adding words to the
    record can only raise its score, so this is never worse than scoring each name alone.
    """
    texts = [normalize(" ".join(candidate.names)) for candidate in candidates]
    scored = process.extract(
        normalize(reference), texts, scorer=token_score, processor=None, limit=None
    )
    ordered = sorted(((float(score), index) for _text, score, index in scored), key=_best_first)
    return [Scored(candidates[index], score) for score, index in ordered]


def _best_first(item: tuple[float, int]) -> tuple[float, int]:
    score, index = item
    return (-score, index)


def resolve(
    reference: str,
    candidates: Iterable[Candidate],
    *,
    cutoff: float = MATCH_CUTOFF,
    tie_margin: float = TIE_MARGIN,
    suggestion_floor: float = SUGGESTION_FLOOR,
    limit: int = MAX_CHOICES,
) -> Resolution:
    """Decide which candidate `reference` names.

    Order of evidence: an exact id; a phone number; a name that equals exactly one record's
    name; otherwise the fuzzy ranking, where a lone best match wins and near-ties are ambiguous.
    """
    pool = list(candidates)
    reference = reference.strip()
    if not reference:
        return Resolution("not_found")

    by_id = [c for c in pool if str(c.key) == reference]
    if not by_id and reference.isdigit():
        # A bare number names a tagged key ("lead:12") of any kind.
        by_id = [c for c in pool if untag(c.key)[1] == reference]
    if len(by_id) == 1:
        return Resolution("found", (Scored(by_id[0], 100.0),))
    if by_id:
        return Resolution("ambiguous", tuple(Scored(c, 100.0) for c in by_id[:limit]))

    if is_phone_reference(reference):
        by_phone = [c for c in pool if any(phone_matches(reference, p) for p in c.phones)]
        if len(by_phone) == 1:
            return Resolution("found", (Scored(by_phone[0], 100.0),))
        if by_phone:
            return Resolution("ambiguous", tuple(Scored(c, 100.0) for c in by_phone[:limit]))
        return Resolution("not_found")

    wanted = normalize(reference)
    exact = [c for c in pool if any(normalize(name) == wanted for name in c.names)]
    if len(exact) == 1:
        return Resolution("found", (Scored(exact[0], 100.0),))

    ranked = rank(reference, pool)
    if not ranked or ranked[0].score < cutoff:
        suggestions = tuple(s for s in ranked[:limit] if s.score >= suggestion_floor)
        return Resolution("not_found", suggestions)
    top = ranked[0].score
    tied = tuple(s for s in ranked if s.score >= cutoff and top - s.score <= tie_margin)
    if len(tied) == 1:
        return Resolution("found", tied)
    return Resolution("ambiguous", tied[:limit])


def tag(kind: str, candidates: Iterable[Candidate]) -> list[Candidate]:
    """Candidates of one kind, keyed "kind:id" and labelled with the kind, so that records of
    several kinds (a contact, a lead, a project) can be resolved as one pool."""
    return [
        Candidate(f"{kind}:{c.key}", f"{kind}: {c.label}", c.names, c.phones) for c in candidates
    ]


def untag(key: Hashable) -> tuple[str | None, str]:
    """ "lead:12" -> ("lead", "12"); an untagged key -> (None, "12")."""
    kind, sep, ident = str(key).rpartition(":")
    return (kind, ident) if sep else (None, ident)


def search(
    reference: str, candidates: Iterable[Candidate], *, floor: float = SEARCH_FLOOR
) -> list[Scored]:
    """Every candidate `reference` plausibly names, best first: a search, not a pick.

    A phone-like reference keeps the records with that number; anything else keeps the
    records scoring at least `floor`.
    """
    pool = list(candidates)
    reference = reference.strip()
    if not reference:
        return []
    if is_phone_reference(reference):
        return [
            Scored(c, 100.0) for c in pool if any(phone_matches(reference, p) for p in c.phones)
        ]
    return [s for s in rank(reference, pool) if s.score >= floor]


def unresolved_reply(resolution: Resolution, *, kind: str, reference: str) -> dict[str, Any]:
    """The tool result for a reference that did not name exactly one record.

    Written for the voice model: it should read out the choices and ask, or offer the
    suggestions, rather than guess.
    """
    choices = [{"id": s.candidate.key, "label": s.candidate.label} for s in resolution.matches]
    if resolution.status == "ambiguous":
        return {
            "status": "ambiguous",
            "kind": kind,
            "query": reference,
            "candidates": choices,
            "message": f"Several {kind}s match {reference!r}; ask the caller which one they mean.",
        }
    if resolution.status == "not_found":
        message = f"No {kind} matches {reference!r}."
        if choices:
            message += " Offer the closest ones and ask if they meant one of them."
        return {
            "status": "not_found",
            "kind": kind,
            "query": reference,
            "suggestions": choices,
            "message": message,
        }
    raise ValueError("unresolved_reply() called for a resolved reference")
