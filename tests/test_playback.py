"""Mark bookkeeping: what the caller heard, checked against a simulated Twilio playback queue."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bridge.playback import Playback


def test_heard_follows_echoed_marks() -> None:
    playback = Playback()
    first = playback.sent("item_a", 1600)  # 200 ms
    second = playback.sent("item_a", 800)  # 100 ms
    assert first != second
    assert (playback.playing_item, playback.queued_ms, playback.heard_ms("item_a")) == (
        "item_a",
        300,
        0,
    )
    playback.acked(first)
    assert (playback.heard_ms("item_a"), playback.queued_ms) == (200, 100)
    playback.acked(second)
    assert (playback.heard_ms("item_a"), playback.queued_ms, playback.playing_item) == (
        300,
        0,
        None,
    )
    assert playback.sent_ms("item_a") == 300


def test_mark_names_carry_the_generation() -> None:
    playback = Playback()
    assert playback.sent("i", 160).startswith("g0:")
    playback.cleared()
    assert playback.generation == 1
    assert playback.sent("i", 160).startswith("g1:")


def test_a_later_mark_acknowledges_everything_before_it() -> None:
    playback = Playback()
    playback.sent("item_a", 800)
    playback.sent("item_a", 800)
    last_of_a = playback.sent("item_a", 800)
    first_of_b = playback.sent("item_b", 400)
    playback.sent("item_b", 400)
    playback.acked(first_of_b)
    assert playback.heard_ms("item_a") == 300
    assert playback.heard_ms("item_b") == 50
    assert playback.playing_item == "item_b"
    assert playback.queued_ms == 50
    playback.acked(last_of_a)  # late echo of an already-covered mark: no effect
    assert (playback.heard_ms("item_a"), playback.heard_ms("item_b")) == (300, 50)


def test_marks_flushed_by_clear_do_not_count() -> None:
    playback = Playback()
    played = playback.sent("item_a", 800)
    flushed = [playback.sent("item_a", 800) for _ in range(3)]
    playback.acked(played)
    playback.cleared()
    assert (playback.queued_ms, playback.playing_item) == (0, None)
    for name in flushed:  # Twilio echoes every mark still queued when it clears
        playback.acked(name)
    assert playback.heard_ms("item_a") == 100
    assert playback.sent_ms("item_a") == 400


def test_audio_sent_for_an_item_after_clear_cut_it_is_never_counted() -> None:
    playback = Playback()
    playback.acked(playback.sent("item_a", 800))
    playback.sent("item_a", 800)  # flushed by the clear below: the caller missed it
    playback.cleared()
    late = playback.sent("item_a", 800)  # plays, but after a gap
    playback.acked(late)
    assert playback.heard_ms("item_a") == 100
    # An item the clear did not cut keeps counting.
    playback.acked(playback.sent("item_b", 800))
    assert playback.heard_ms("item_b") == 100


def test_clear_with_nothing_unacknowledged_cuts_nothing() -> None:
    playback = Playback()
    playback.acked(playback.sent("item_a", 800))
    playback.cleared()
    playback.acked(playback.sent("item_a", 800))
    assert playback.heard_ms("item_a") == 200


@pytest.mark.parametrize("name", ["", "nonsense", "g0:", "g:1", "g99:1", "g0:999", "g0:1:2"])
def test_unknown_and_malformed_names_are_ignored(name: str) -> None:
    playback = Playback()
    playback.sent("item_a", 800)
    playback.acked(name)
    assert (playback.heard_ms("item_a"), playback.queued_ms, playback.playing_item) == (
        0,
        100,
        "item_a",
    )


def test_unknown_item_was_not_heard() -> None:
    assert Playback().heard_ms("never") == 0


def test_negative_byte_count_is_refused() -> None:
    with pytest.raises(ValueError, match="ulaw_bytes"):
        Playback().sent("item_a", -1)


def test_forget_drops_finished_items_only() -> None:
    playback = Playback()
    done = playback.sent("item_a", 800)
    playback.sent("item_b", 800)
    playback.acked(done)
    playback.forget("item_a")
    playback.forget("item_b")  # still queued: kept
    assert playback.sent_ms("item_a") == 0
    assert playback.sent_ms("item_b") == 100


# --- property tests -------------------------------------------------------------------------

ITEMS = ("item_a", "item_b", "item_c")


class TwilioPlaybackMachine(RuleBasedStateMachine):
    """Playback driven by a faithful model of Twilio's outbound queue.

    Twilio plays audio in order and echoes a mark when playback reaches it; `clear` drops the
    queue and echoes every mark still in it. Echoes travel back with a delay, so some arrive
    after a later `clear`. The model knows the truth (bytes of each item actually played).
    """

    def __init__(self) -> None:
        super().__init__()
        self.playback = Playback()
        self.twilio_queue: deque[tuple[str, str, int]] = deque()  # (item, mark name, bytes)
        self.echoes_in_flight: deque[str] = deque()
        # Bytes of each item's start the caller heard without a gap, and items with a gap.
        self.truly_heard: dict[str, int] = dict.fromkeys(ITEMS, 0)
        self.gapped: set[str] = set()
        # Items with audio whose fate the bridge could not know at a clear (see Playback).
        self.cut: set[str] = set()
        self.sent: dict[str, int] = dict.fromkeys(ITEMS, 0)
        # mark name -> (generation, item, item offset after the chunk), and chunk size
        self.mark_offsets: dict[str, tuple[int, str, int]] = {}
        self.mark_sizes: dict[str, int] = {}
        self.generation = 0
        self.expected_heard: dict[str, int] = dict.fromkeys(ITEMS, 0)
        self.last_heard: dict[str, int] = dict.fromkeys(ITEMS, 0)
        self.names: list[str] = []

    @rule(item=st.sampled_from(ITEMS), size=st.integers(0, 2000))
    def send(self, item: str, size: int) -> None:
        name = self.playback.sent(item, size)
        assert name not in self.mark_offsets, "mark names must never repeat"
        self.sent[item] += size
        self.mark_offsets[name] = (self.generation, item, self.sent[item])
        self.mark_sizes[name] = size
        self.twilio_queue.append((item, name, size))
        self.names.append(name)

    @precondition(lambda self: self.twilio_queue)
    @rule(count=st.integers(1, 5))
    def twilio_plays(self, count: int) -> None:
        for _ in range(min(count, len(self.twilio_queue))):
            item, name, size = self.twilio_queue.popleft()
            if item not in self.gapped:
                self.truly_heard[item] += size
            self.echoes_in_flight.append(name)

    @rule()
    def clear(self) -> None:
        for name in self.unacked():
            if self.mark_sizes[name]:
                self.cut.add(self.mark_offsets[name][1])
        self.playback.cleared()
        self.generation += 1
        while self.twilio_queue:
            item, name, size = self.twilio_queue.popleft()
            self.echoes_in_flight.append(name)  # flushed, never played
            if size:
                self.gapped.add(item)

    @precondition(lambda self: self.echoes_in_flight)
    @rule()
    def echo_arrives(self) -> None:
        name = self.echoes_in_flight.popleft()
        generation, item, offset = self.mark_offsets[name]
        before = self.snapshot()
        self.playback.acked(name)
        if generation != self.generation:
            assert self.snapshot() == before, "a mark from a cleared generation counted"
        elif item not in self.cut:
            self.expected_heard[item] = max(self.expected_heard[item], offset)

    @rule(data=st.data())
    def stray_mark(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.names) if self.names else st.text(max_size=8))
        if name in self.echoes_in_flight or name in {n for _, n, _ in self.twilio_queue}:
            return  # a real echo still to come; covered by echo_arrives
        before = self.snapshot()
        self.playback.acked(name)
        assert self.snapshot() == before, "a duplicate or unknown mark changed the state"

    def snapshot(self) -> tuple[object, ...]:
        return (
            tuple(self.playback.heard_ms(item) for item in ITEMS),
            self.playback.queued_ms,
            self.playback.playing_item,
        )

    @invariant()
    def heard_is_exact_and_never_overclaims(self) -> None:
        for item in ITEMS:
            heard = self.playback.heard_ms(item)
            assert heard == self.expected_heard[item] // 8
            assert heard <= self.truly_heard[item] // 8, "claimed audio the caller never heard"
            assert heard <= self.playback.sent_ms(item) == self.sent[item] // 8
            assert heard >= self.last_heard[item], "heard went backwards"
            self.last_heard[item] = heard

    def unacked(self) -> list[str]:
        """Marks of the current generation not yet back: echo in flight, or still queued."""
        return [
            name
            for name in (*self.echoes_in_flight, *(n for _, n, _ in self.twilio_queue))
            if self.mark_offsets[name][0] == self.generation
        ]

    @invariant()
    def queue_matches_twilio(self) -> None:
        unacked = self.unacked()
        assert self.playback.queued_ms == sum(self.mark_sizes[n] for n in unacked) // 8
        oldest = self.mark_offsets[unacked[0]][1] if unacked else None
        assert self.playback.playing_item == oldest


TestTwilioPlayback = TwilioPlaybackMachine.TestCase
TestTwilioPlayback.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("sent"), st.sampled_from(ITEMS), st.integers(0, 4000)),
            st.tuples(st.just("acked"), st.integers(0, 60), st.just(0)),
            st.tuples(st.just("cleared"), st.just(""), st.just(0)),
            st.tuples(st.just("garbage"), st.text(max_size=6), st.just(0)),
        ),
        max_size=80,
    )
)
def test_any_interleaving_keeps_heard_bounded_and_monotonic(ops: list[tuple]) -> None:
    """Acks in any order (even ones Twilio would never produce) cannot break the bounds."""
    playback = Playback()
    names: list[tuple[str, int]] = []  # (name, generation when sent)
    last = dict.fromkeys(ITEMS, 0)
    for op, arg, size in ops:
        if op == "sent":
            names.append((playback.sent(arg, size), playback.generation))
        elif op == "acked" and names:
            name, generation = names[arg % len(names)]
            before = [playback.heard_ms(i) for i in ITEMS]
            playback.acked(name)
            if generation != playback.generation:
                assert [playback.heard_ms(i) for i in ITEMS] == before
        elif op == "cleared":
            playback.cleared()
        elif op == "garbage":
            playback.acked(arg)
        for item in ITEMS:
            heard = playback.heard_ms(item)
            assert last[item] <= heard <= playback.sent_ms(item)
            last[item] = heard
        assert playback.queued_ms >= 0
