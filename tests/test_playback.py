"""Mark bookkeeping: sparse marks, what the caller heard, checked against a simulated Twilio
playback queue that plays in real time on a fake clock."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bridge.playback import MARK_EVERY_MS, Playback

CHUNK = 160  # 20 ms of mu-law, the size of a model audio delta


class Clock:
    """A monotonic clock the test moves by hand. Binary fractions keep the arithmetic exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def playback(clock: Clock | None = None) -> Playback:
    """A Playback on a clock that stands still unless the test moves it: heard = echoed marks."""
    return Playback(clock or Clock())


def send(p: Playback, item: str, size: int) -> list[str]:
    """One chunk as the bridge sends it: the marks to send around it, in order."""
    marks = [p.mark_before(item), p.sent(item, size)]
    return [name for name in marks if name is not None]


# --- when marks go out ------------------------------------------------------------------------


def test_a_mark_goes_out_every_mark_every_ms_not_every_chunk() -> None:
    assert MARK_EVERY_MS == 100
    p = playback()
    marks = [send(p, "item_a", CHUNK) for _ in range(10)]  # 10 x 20 ms
    assert [len(m) for m in marks] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
    assert marks[4] != marks[9]


def test_chunks_that_do_not_divide_the_interval_mark_at_the_first_chunk_past_it() -> None:
    p = playback()
    marks = [send(p, "item_a", 320) for _ in range(6)]  # 40 ms deltas: a mark every 120 ms
    assert [len(m) for m in marks] == [0, 0, 1, 0, 0, 1]


def test_a_mark_closes_an_item_before_the_next_items_audio() -> None:
    p = playback()
    send(p, "item_a", CHUNK)
    send(p, "item_a", CHUNK)
    closing = p.mark_before("item_b")
    assert closing is not None  # sent before item_b's media: a mark never spans two items
    assert p.sent("item_b", CHUNK) is None
    assert (p.playing_item, p.queued_ms) == ("item_a", 60)
    p.acked(closing)
    assert (p.heard_ms("item_a"), p.playing_item, p.queued_ms) == (40, "item_b", 20)


def test_audio_of_another_item_while_one_is_unmarked_is_refused() -> None:
    p = playback()
    p.sent("item_a", CHUNK)
    with pytest.raises(ValueError, match="mark_before"):
        p.sent("item_b", CHUNK)


def test_mark_closes_the_unmarked_audio_at_the_end_of_a_response() -> None:
    p = playback()
    assert p.mark() is None  # nothing sent: nothing to close
    send(p, "item_a", CHUNK)
    send(p, "item_a", CHUNK)
    last = p.mark()
    assert last is not None and p.mark() is None
    p.acked(last)
    assert (p.heard_ms("item_a"), p.queued_ms, p.playing_item) == (40, 0, None)


def test_empty_chunks_add_nothing_to_mark() -> None:
    p = playback()
    assert send(p, "item_a", 0) == []
    assert (p.playing_item, p.queued_ms, p.mark()) == (None, 0, None)
    send(p, "item_a", CHUNK)
    assert send(p, "item_a", 0) == []
    assert (p.playing_item, p.queued_ms, p.sent_ms("item_a")) == ("item_a", 20, 20)


def test_unmarked_audio_is_queued_and_playing() -> None:
    p = playback()
    assert send(p, "item_a", CHUNK) == []
    assert (p.playing_item, p.queued_ms, p.sent_ms("item_a"), p.heard_ms("item_a")) == (
        "item_a",
        20,
        20,
        0,
    )


# --- what was heard, from echoed marks --------------------------------------------------------


def test_heard_follows_echoed_marks() -> None:
    p = playback()
    (first,) = send(p, "item_a", 1600)  # 200 ms
    (second,) = send(p, "item_a", 800)  # 100 ms
    assert first != second
    assert (p.playing_item, p.queued_ms, p.heard_ms("item_a")) == ("item_a", 300, 0)
    p.acked(first)
    assert (p.heard_ms("item_a"), p.queued_ms) == (200, 100)
    p.acked(second)
    assert (p.heard_ms("item_a"), p.queued_ms, p.playing_item) == (300, 0, None)
    assert p.sent_ms("item_a") == 300


def test_mark_names_carry_the_generation() -> None:
    p = playback()
    assert send(p, "i", 800)[0].startswith("g0:")
    p.cleared()
    assert p.generation == 1
    assert send(p, "i", 800)[0].startswith("g1:")


def test_a_later_mark_acknowledges_everything_before_it() -> None:
    p = playback()
    send(p, "item_a", 800)
    (last_of_a,) = send(p, "item_a", 800)
    send(p, "item_a", 400)  # unmarked until item_b starts
    (closes_a,) = send(p, "item_b", 400)
    (first_of_b,) = send(p, "item_b", 400)
    send(p, "item_b", 400)
    p.acked(first_of_b)
    assert p.heard_ms("item_a") == 250
    assert p.heard_ms("item_b") == 100
    assert p.playing_item == "item_b"
    assert p.queued_ms == 50
    for late in (last_of_a, closes_a):  # late echoes of already-covered marks: no effect
        p.acked(late)
    assert (p.heard_ms("item_a"), p.heard_ms("item_b")) == (250, 100)


def test_marks_flushed_by_clear_do_not_count() -> None:
    p = playback()
    (played,) = send(p, "item_a", 800)
    flushed = [name for _ in range(3) for name in send(p, "item_a", 800)]
    send(p, "item_a", 160)  # and some unmarked audio
    p.acked(played)
    p.cleared()
    assert (p.queued_ms, p.playing_item) == (0, None)
    for name in flushed:  # Twilio echoes every mark still queued when it clears
        p.acked(name)
    assert p.heard_ms("item_a") == 100
    assert p.sent_ms("item_a") == 420


def test_audio_sent_for_an_item_after_clear_cut_it_is_never_counted() -> None:
    p = playback()
    p.acked(send(p, "item_a", 800)[0])
    send(p, "item_a", 800)  # flushed by the clear below: the caller missed it
    p.cleared()
    (late,) = send(p, "item_a", 800)  # plays, but after a gap
    p.acked(late)
    assert p.heard_ms("item_a") == 100
    # An item the clear did not cut keeps counting.
    p.acked(send(p, "item_b", 800)[0])
    assert p.heard_ms("item_b") == 100


def test_clear_cuts_items_whose_only_unacknowledged_audio_is_unmarked() -> None:
    clock = Clock()
    p = playback(clock)
    p.acked(send(p, "item_a", 800)[0])
    send(p, "item_a", CHUNK)  # unmarked: no mark will ever say whether it played
    clock.now = 1.0
    assert p.heard_ms("item_a") == 120  # the estimate: it has surely played by now...
    p.cleared()
    assert p.heard_ms("item_a") == 100  # ...but once cut, only echoed marks count
    (late,) = send(p, "item_a", 800)
    p.acked(late)
    assert p.heard_ms("item_a") == 100


def test_clear_with_nothing_unacknowledged_cuts_nothing() -> None:
    p = playback()
    p.acked(send(p, "item_a", 800)[0])
    p.cleared()
    p.acked(send(p, "item_a", 800)[0])
    assert p.heard_ms("item_a") == 200


@pytest.mark.parametrize("name", ["", "nonsense", "g0:", "g:1", "g99:1", "g0:999", "g0:1:2"])
def test_unknown_and_malformed_names_are_ignored(name: str) -> None:
    p = playback()
    send(p, "item_a", 800)
    p.acked(name)
    assert (p.heard_ms("item_a"), p.queued_ms, p.playing_item) == (0, 100, "item_a")


def test_unknown_item_was_not_heard() -> None:
    assert playback().heard_ms("never") == 0


def test_negative_byte_count_is_refused() -> None:
    with pytest.raises(ValueError, match="ulaw_bytes"):
        playback().sent("item_a", -1)


def test_forget_drops_finished_items_only() -> None:
    p = playback()
    (done,) = send(p, "item_a", 800)
    send(p, "item_b", 800)
    send(p, "item_c", 160)  # unmarked: still queued too
    p.acked(done)
    for item in ("item_a", "item_b", "item_c"):
        p.forget(item)
    assert (p.sent_ms("item_a"), p.sent_ms("item_b"), p.sent_ms("item_c")) == (0, 100, 20)


# --- what was heard, between marks ------------------------------------------------------------


def test_heard_grows_in_real_time_from_when_the_audio_was_sent() -> None:
    clock = Clock()
    p = playback(clock)
    for _ in range(15):  # 300 ms sent at once, marks at 100, 200 and 300 ms
        send(p, "item_a", CHUNK)
    clock.now = 0.0625
    assert p.heard_ms("item_a") == 62
    clock.now = 0.25
    # Twilio would have echoed the 100 ms mark had it played that far: it is late, or
    # playback is, so the estimate stops at it.
    assert p.heard_ms("item_a") == 100


def test_heard_grows_from_the_last_echo_capped_at_the_next_unechoed_mark() -> None:
    clock = Clock()
    p = playback(clock)
    marks = [name for _ in range(15) for name in send(p, "item_a", CHUNK)]
    clock.now = 0.125
    p.acked(marks[0])  # Twilio was at 100 ms, at the latest now
    assert p.heard_ms("item_a") == 100
    clock.now = 0.1875
    assert p.heard_ms("item_a") == 162
    clock.now = 0.5
    assert p.heard_ms("item_a") == 200


def test_heard_is_capped_by_the_audio_sent() -> None:
    clock = Clock()
    p = playback(clock)
    send(p, "item_a", CHUNK)
    send(p, "item_a", CHUNK)  # 40 ms, unmarked
    clock.now = 1.0
    assert p.heard_ms("item_a") == 40


def test_audio_sent_after_the_echo_plays_from_when_it_was_sent() -> None:
    clock = Clock()
    p = playback(clock)
    (mark,) = send(p, "item_a", 800)
    clock.now = 0.125
    p.acked(mark)  # Twilio's queue ran dry here
    clock.now = 0.5
    send(p, "item_a", 320)  # 40 ms more, when Twilio had nothing left to play
    clock.now = 0.515625  # 15.625 ms later
    assert p.heard_ms("item_a") == 115  # not 100 + 40: it started playing on arrival


def test_only_the_oldest_queued_item_can_be_playing() -> None:
    clock = Clock()
    p = playback(clock)
    send(p, "item_a", 800)
    send(p, "item_b", 800)
    clock.now = 1.0
    assert (p.heard_ms("item_a"), p.heard_ms("item_b")) == (100, 0)


def test_after_a_clear_new_audio_plays_from_when_it_was_sent() -> None:
    clock = Clock()
    p = playback(clock)
    p.acked(send(p, "item_a", 800)[0])
    send(p, "item_a", 800)
    p.cleared()  # the echo time before the clear says nothing about what plays after it
    clock.now = 10.0
    send(p, "item_b", 800)
    clock.now = 10.03125
    assert p.heard_ms("item_b") == 31


# --- property tests -------------------------------------------------------------------------

ITEMS = ("item_a", "item_b", "item_c")


class TwilioPlaybackMachine(RuleBasedStateMachine):
    """Playback driven by a faithful model of Twilio's outbound queue, on a shared clock.

    Twilio plays queued audio in order at 8 bytes a millisecond, idles when it has none, and
    echoes a mark when playback reaches it; `clear` drops the queue and echoes every mark still
    in it. Echoes travel back with a delay, so some arrive after a later `clear`. The model
    knows the truth: bytes of each item's start actually played, without a gap.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now_ms = 0
        self.playback = Playback(lambda: self.now_ms / 1000)
        # ("media", item, bytes) or ("mark", name, 0), in the order they were sent
        self.twilio_queue: deque[tuple[str, str, int]] = deque()
        self.echoes_in_flight: deque[str] = deque()
        self.truly_heard: dict[str, int] = dict.fromkeys(ITEMS, 0)
        self.gapped: set[str] = set()  # items of which a clear dropped audio
        # Items with audio whose fate the bridge could not know at a clear (see Playback).
        self.cut: set[str] = set()
        self.sent: dict[str, int] = dict.fromkeys(ITEMS, 0)
        # The audio sent since the last mark: its item and size.
        self.unmarked_item: str | None = None
        self.unmarked_bytes = 0
        # mark name -> (generation, item, item offset at the mark), and bytes since the last
        self.mark_offsets: dict[str, tuple[int, str, int]] = {}
        self.mark_sizes: dict[str, int] = {}
        self.generation = 0
        self.expected_heard: dict[str, int] = dict.fromkeys(ITEMS, 0)  # last echoed marks
        self.last_heard: dict[str, int] = dict.fromkeys(ITEMS, 0)
        self.names: list[str] = []
        # Twilio went idle in the middle of audio not yet closed by a mark (the bridge sent
        # it slower than real time): the estimate cannot see that gap, so it may count this
        # much too much, until Twilio reaches the next mark.
        self.playing_unmarked = False
        self.slack_bytes = 0

    def _mark_sent(self, name: str | None) -> None:
        if name is None:
            return
        assert name not in self.mark_offsets, "mark names must never repeat"
        assert self.unmarked_item is not None and self.unmarked_bytes > 0, "an empty mark"
        self.mark_offsets[name] = (
            self.generation,
            self.unmarked_item,
            self.sent[self.unmarked_item],
        )
        self.mark_sizes[name] = self.unmarked_bytes
        self.unmarked_item, self.unmarked_bytes = None, 0
        self.names.append(name)
        if any(kind == "media" for kind, _, _ in self.twilio_queue):
            self.twilio_queue.append(("mark", name, 0))
        else:  # nothing left to play before it: Twilio echoes it at once
            self.twilio_queue.clear()
            self._reached(name)

    @rule(item=st.sampled_from(ITEMS), size=st.integers(0, 1200))
    def send(self, item: str, size: int) -> None:
        self._mark_sent(self.playback.mark_before(item))
        after = self.playback.sent(item, size)
        self.sent[item] += size
        if size:
            assert self.unmarked_item in (None, item), "a mark spans two items"
            self.unmarked_item = item
            self.unmarked_bytes += size
            self.twilio_queue.append(("media", item, size))
            if after is None:
                assert self.unmarked_bytes < 800, "a mark was due"
        self._mark_sent(after)

    @rule()
    def response_done(self) -> None:
        had_unmarked = self.unmarked_bytes > 0
        self._mark_sent(self.playback.mark())
        assert self.unmarked_bytes == 0 and (had_unmarked or self.playback.mark() is None)

    def _reached(self, name: str) -> None:
        self.echoes_in_flight.append(name)
        self.playing_unmarked = False
        self.slack_bytes = 0

    @rule(ms=st.integers(1, 300))
    def time_passes(self, ms: int) -> None:
        budget = ms * 8
        while budget:
            while self.twilio_queue and self.twilio_queue[0][0] == "mark":
                self._reached(self.twilio_queue.popleft()[1])
            if not self.twilio_queue:
                if self.playing_unmarked:
                    self.slack_bytes += budget
                break
            _, item, size = self.twilio_queue[0]
            played = min(size, budget)
            if item not in self.gapped:
                self.truly_heard[item] += played
            budget -= played
            self.playing_unmarked = True
            if played == size:
                self.twilio_queue.popleft()
            else:
                self.twilio_queue[0] = ("media", item, size - played)
        while self.twilio_queue and self.twilio_queue[0][0] == "mark":
            self._reached(self.twilio_queue.popleft()[1])
        self.now_ms += ms

    @rule()
    def clear(self) -> None:
        for name in self.unacked():
            self.cut.add(self.mark_offsets[name][1])
        if self.unmarked_bytes:
            self.cut.add(self.unmarked_item)  # type: ignore[arg-type]
        self.unmarked_item, self.unmarked_bytes = None, 0
        self.playback.cleared()
        self.generation += 1
        while self.twilio_queue:
            kind, what, _ = self.twilio_queue.popleft()
            if kind == "mark":
                self.echoes_in_flight.append(what)  # flushed, never played
            else:
                self.gapped.add(what)
        self.playing_unmarked = False
        self.slack_bytes = 0
        # Cut items fall back from the estimate to their last echoed mark.
        for item in self.cut:
            self.last_heard[item] = self.expected_heard[item] // 8

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
        if name in self.echoes_in_flight or ("mark", name, 0) in self.twilio_queue:
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
    def heard_is_bounded_by_echoes_and_by_what_played(self) -> None:
        for item in ITEMS:
            heard = self.playback.heard_ms(item)
            known = self.expected_heard[item] // 8
            assert heard >= known, "less than the echoed marks say"
            if item in self.cut:
                assert heard == known, "a cut item counted audio after its last echoed mark"
            assert heard * 8 <= self.truly_heard[item] + self.slack_bytes, "claimed unheard audio"
            assert heard <= self.playback.sent_ms(item) == self.sent[item] // 8
            assert heard >= self.last_heard[item], "heard went backwards"
            self.last_heard[item] = heard

    def unacked(self) -> list[str]:
        """Marks of the current generation not yet back: echo in flight, or still queued."""
        queued = (what for kind, what, _ in self.twilio_queue if kind == "mark")
        return [
            name
            for name in (*self.echoes_in_flight, *queued)
            if self.mark_offsets[name][0] == self.generation
        ]

    @invariant()
    def queue_matches_twilio(self) -> None:
        unacked = self.unacked()
        marked = sum(self.mark_sizes[n] for n in unacked)
        assert self.playback.queued_ms == (marked + self.unmarked_bytes) // 8
        oldest = self.mark_offsets[unacked[0]][1] if unacked else self.unmarked_item
        assert self.playback.playing_item == oldest


TestTwilioPlayback = TwilioPlaybackMachine.TestCase
TestTwilioPlayback.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("sent"), st.sampled_from(ITEMS), st.integers(0, 4000)),
            st.tuples(st.just("mark"), st.just(""), st.just(0)),
            st.tuples(st.just("acked"), st.integers(0, 60), st.just(0)),
            st.tuples(st.just("cleared"), st.just(""), st.just(0)),
            st.tuples(st.just("garbage"), st.text(max_size=6), st.just(0)),
            st.tuples(st.just("time"), st.just(""), st.integers(0, 500)),
        ),
        max_size=80,
    )
)
def test_any_interleaving_keeps_heard_bounded_and_monotonic(ops: list[tuple]) -> None:
    """Acks in any order (even ones Twilio would never produce) cannot break the bounds."""
    clock = Clock()
    p = playback(clock)
    names: list[tuple[str, int]] = []  # (name, generation when sent)
    last = dict.fromkeys(ITEMS, 0)
    for op, arg, size in ops:
        if op == "sent":
            names.extend((name, p.generation) for name in send(p, arg, size))
        elif op == "mark":
            name = p.mark()
            if name is not None:
                names.append((name, p.generation))
        elif op == "acked" and names:
            name, generation = names[arg % len(names)]
            before = [p.heard_ms(i) for i in ITEMS]
            p.acked(name)
            if generation != p.generation:
                assert [p.heard_ms(i) for i in ITEMS] == before
        elif op == "cleared":
            p.cleared()
            last = {item: p.heard_ms(item) for item in ITEMS}  # cut items fall back
        elif op == "garbage":
            p.acked(arg)
        elif op == "time":
            clock.now += size / 1000
        for item in ITEMS:
            heard = p.heard_ms(item)
            assert last[item] <= heard <= p.sent_ms(item)
            last[item] = heard
        assert p.queued_ms >= 0
