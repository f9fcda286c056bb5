"""tools.matching: spoken references to records (pure functions, no database)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools.matching import (
    MATCH_CUTOFF,
    MAX_CHOICES,
    TIE_MARGIN,
    Candidate,
    Resolution,
    is_phone_reference,
    normalize,
    phone_matches,
    rank,
    resolve,
    search,
    tag,
    token_score,
    unresolved_reply,
    untag,
)

PEOPLE = [
    Candidate(
        1,
        "Mike Johnson, kitchen remodel, 555-0142",
        ("Mike Johnson", "kitchen remodel"),
        ("+15555550142",),
    ),
    Candidate(
        2,
        "Sarah Johnson, water heater, 555-0199",
        ("Sarah Johnson", "water heater"),
        ("+15555550199",),
    ),
    Candidate(3, "Mike Johnston", ("Mike Johnston",), ("+15555550777",)),
    Candidate(4, "Bob Smith, Smith Roofing", ("Bob Smith", "Smith Roofing")),
    Candidate(5, "Priya Raman", ("Priya Raman",), ("+15555551234",)),
]


def keys(resolution: Resolution) -> list[object]:
    return [s.candidate.key for s in resolution.matches]


@pytest.mark.parametrize(
    ("reference", "key"),
    [
        ("Mike Johnson", 1),  # exact beats the near-identical Johnston
        ("mike johnson", 1),
        ("  Mike   JOHNSON. ", 1),
        ("Sara Johnson", 2),  # one letter misheard
        ("Sarah", 2),
        ("Johnson kitchen", 1),  # words from two fields of one record
        ("Jonson kitchen remodel", 1),
        ("the water heater", 2),
        ("Priya", 5),
        ("Pria Raman", 5),
        ("Smith Roofing", 4),
        ("555-0142", 1),  # phone, spoken as the local part
        ("(555) 555-0199", 2),
        ("+1 555 555 1234", 5),
        ("3", 3),  # an id from an earlier result
    ],
)
def test_resolves_one_record(reference: str, key: int) -> None:
    resolution = resolve(reference, PEOPLE)
    assert resolution.status == "found", resolution
    assert resolution.key == key


@pytest.mark.parametrize(
    ("reference", "tied"),
    [
        ("Johnson", {1, 2}),  # two Johnsons: ask
        ("Mike", {1, 3}),
        ("Jonson", {1, 2}),
        ("Mike Jonson", {1, 3}),  # misheard between Johnson and Johnston
    ],
)
def test_equally_good_matches_are_ambiguous(reference: str, tied: set[int]) -> None:
    resolution = resolve(reference, PEOPLE)
    assert resolution.status == "ambiguous"
    assert set(keys(resolution)) == tied
    with pytest.raises(LookupError):
        _ = resolution.key


def test_two_records_with_the_same_name_are_ambiguous_even_when_exact() -> None:
    twins = [*PEOPLE, Candidate(9, "Mike Johnson, deck repair", ("Mike Johnson", "deck repair"))]
    resolution = resolve("Mike Johnson", twins)
    assert resolution.status == "ambiguous"
    assert {1, 9} <= set(keys(resolution))
    # ...and the extra detail in the reference settles it
    assert resolve("Mike Johnson deck", twins).key == 9


def test_shared_phone_number_is_ambiguous() -> None:
    household = [*PEOPLE, Candidate(7, "Ann Raman", ("Ann Raman",), ("+15555551234",))]
    resolution = resolve("555-1234", household)
    assert resolution.status == "ambiguous"
    assert set(keys(resolution)) == {5, 7}


def test_no_match_offers_close_suggestions() -> None:
    resolution = resolve("Smithers", PEOPLE)
    assert resolution.status == "not_found"
    assert keys(resolution)[0] == 4
    assert all(s.score < MATCH_CUTOFF for s in resolution.matches)
    assert resolve("Zebediah Quux", PEOPLE) == Resolution("not_found")
    assert resolve("", PEOPLE) == Resolution("not_found")
    assert resolve("555-9999", PEOPLE) == Resolution("not_found")
    assert resolve("Mike", []) == Resolution("not_found")


def test_reply_for_the_model() -> None:
    ambiguous = unresolved_reply(resolve("Johnson", PEOPLE), kind="lead", reference="Johnson")
    assert ambiguous["status"] == "ambiguous"
    assert ambiguous["candidates"] == [
        {"id": 1, "label": "Mike Johnson, kitchen remodel, 555-0142"},
        {"id": 2, "label": "Sarah Johnson, water heater, 555-0199"},
    ]
    missing = unresolved_reply(resolve("Smithers", PEOPLE), kind="contact", reference="Smithers")
    assert missing["status"] == "not_found"
    assert missing["suggestions"][0] == {"id": 4, "label": "Bob Smith, Smith Roofing"}
    with pytest.raises(ValueError):
        unresolved_reply(resolve("Priya", PEOPLE), kind="lead", reference="Priya")


def test_phone_helpers() -> None:
    assert is_phone_reference("555-0142")
    assert is_phone_reference("+1 (555) 555-0142")
    assert not is_phone_reference("142")  # too short to be a number rather than an id
    assert not is_phone_reference("Route 66 diner 1234")
    assert phone_matches("5550142", "+15555550142")
    assert phone_matches("+1 555 555 0142", "555-555-0142")
    assert not phone_matches("5550143", "+15555550142")
    assert not phone_matches("0142", "")


def test_rank_orders_best_first_and_keeps_input_order_for_ties() -> None:
    ranked = rank("Johnson", PEOPLE)
    assert [s.candidate.key for s in ranked[:2]] == [1, 2]
    assert ranked[0].score == ranked[1].score == 100.0
    assert [s.score for s in ranked] == sorted((s.score for s in ranked), reverse=True)


# --- properties --------------------------------------------------------------------------

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=9)
names = st.lists(words, min_size=1, max_size=3).map(" ".join)


@given(names, names)
def test_token_score_is_a_bounded_similarity(a: str, b: str) -> None:
    score = token_score(normalize(a), normalize(b))
    assert 0.0 <= score <= 100.0
    assert token_score(normalize(a), normalize(a)) == 100.0


@given(names, names, words)
def test_more_words_on_a_record_never_lower_its_score(
    reference: str, text: str, extra: str
) -> None:
    assert token_score(reference, f"{text} {extra}") >= token_score(reference, text)


@settings(max_examples=60)
@given(st.lists(names, min_size=1, max_size=8, unique=True), st.data())
def test_resolution_invariants(people: list[str], data: st.DataObject) -> None:
    candidates = [Candidate(i, name, (name,)) for i, name in enumerate(people)]
    reference = data.draw(st.one_of(names, st.sampled_from(people)))
    resolution = resolve(reference, candidates)

    if resolution.status == "found":
        assert len(resolution.matches) == 1
    elif resolution.status == "ambiguous":
        scores = [s.score for s in resolution.matches]
        assert len(scores) >= 2
        assert min(scores) >= MATCH_CUTOFF and max(scores) - min(scores) <= TIE_MARGIN
    else:
        assert all(s.score < MATCH_CUTOFF for s in resolution.matches)

    # The outcome does not depend on the order the rows came back from the database.
    shuffled = candidates[:]
    random.Random(len(people)).shuffle(shuffled)
    again = resolve(reference, shuffled)
    assert again.status == resolution.status
    if len(resolution.matches) < MAX_CHOICES:  # beyond that, which ties are listed may vary
        assert set(keys(again)) == set(keys(resolution))


@settings(max_examples=60)
@given(st.lists(names, min_size=1, max_size=8, unique_by=normalize))
def test_every_distinct_name_resolves_to_its_record(people: list[str]) -> None:
    candidates = [Candidate(100 + i, name, (name,)) for i, name in enumerate(people)]
    for index, name in enumerate(people):
        assert resolve(name, candidates).key == 100 + index


def test_records_of_several_kinds_resolve_as_one_pool() -> None:
    pool = tag("contact", PEOPLE[:2]) + tag(
        "lead", [Candidate(2, "Mike Johnson, deck", ("Mike Johnson", "deck"))]
    )
    assert untag("lead:2") == ("lead", "2") and untag(7) == (None, "7")
    mixed = resolve("Mike Johnson", pool)
    assert mixed.status == "ambiguous"
    assert {s.candidate.label for s in mixed.matches} == {
        "contact: Mike Johnson, kitchen remodel, 555-0142",
        "lead: Mike Johnson, deck",
    }
    assert resolve("lead:2", pool).key == "lead:2"
    assert resolve("1", pool).key == "contact:1"  # a bare id, unique across kinds
    assert set(keys(resolve("2", pool))) == {"contact:2", "lead:2"}  # the same id in two kinds


def test_search_lists_every_plausible_record() -> None:
    assert [s.candidate.key for s in search("Johnson", PEOPLE)] == [1, 2, 3]
    assert [s.candidate.key for s in search("555-0142", PEOPLE)] == [1]
    assert search("   ", PEOPLE) == []
