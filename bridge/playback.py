"""What the caller actually heard, from Twilio's echoed marks and the clock. No I/O.

The model produces audio faster than real time and Twilio queues it, so "sent" is not
"heard". The bridge sends a `mark` after its audio now and then; Twilio echoes a mark when
playback reaches it. Audio plays in order, so an echoed mark means everything sent before it
has been played. On barge-in the bridge sends `clear`: Twilio drops its queue and echoes every
mark still queued, which is indistinguishable by shape from "played" — hence the generation in
each mark name: marks from a cleared generation are ignored.

Marks are sparse (every echo is a WebSocket message each way): one goes out once
`MARK_EVERY_MS` of audio has been sent since the previous one, before audio of another item
(a mark never spans two items, or its echo could not say how much of each was heard), and
when the bridge asks for one with `mark()` (at the end of a response, so that "everything
has played" becomes known promptly). Audio sent but not yet marked is queued like any other:
it counts in `queued_ms`, `playing_item`, `sent_ms`, and a `clear` cuts its item.

`heard_ms(item)` is how much of the start of that item's audio the caller has heard, without a
gap (what `conversation.item.truncate` wants as `audio_end_ms`). It is an estimate: the offset
of the item's last echoed mark, plus what Twilio, playing continuously in real time, has played
of the audio after it since it started on it — when that mark's echo arrived, or when that
audio was sent if it was sent later (it cannot play before it is there). It is safe to
overestimate only this far: it never goes past the next mark not yet echoed (had playback
reached it, it would have been echoed) nor past the audio actually sent of the item, so it
claims at most one mark interval beyond what is known, and only audio that was queued for
playing. Latency cuts both ways (an echo arrives after Twilio reached its mark, audio reaches
Twilio after it is sent), and a segment sent slower than real time may have played with gaps,
which the estimate does not see: both are bounded by that same cap.

Once a `clear` has cut an item (dropped some of its audio, marked or not, unacknowledged) the
estimate is gone: only audio up to its last echoed mark counts, and nothing sent for it later
either, since the caller did not hear what lay in between. Ask `heard_ms` before `cleared()`
to truncate at the estimate. The bridge should stop sending a cut item's audio.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

MULAW_BYTES_PER_MS = 8
_BYTES_PER_S = MULAW_BYTES_PER_MS * 1000
# Why 100 ms: a mark per 20 ms model delta made marks and their echoes a third of a call's
# WebSocket messages; one per 100 ms is 10 a second each way instead of 50. Precision between
# marks comes from interpolation, whose worst case (late echoes, audio sent with gaps) is
# capped at one interval: 100 ms keeps that under a syllable. The end of a response is always
# marked, so "everything has played" is not delayed by the interval.
MARK_EVERY_MS = 100
MARK_EVERY_BYTES = MARK_EVERY_MS * MULAW_BYTES_PER_MS


@dataclass(slots=True, eq=False)
class _Segment:
    """Audio of one item between two marks, in send (= playback) order."""

    item_id: str
    start: int  # item offset (bytes) where it begins
    end: int  # item offset after its last chunk: the offset of its mark, once it has one
    opened_at: float  # when its first chunk was sent: it cannot have played before that
    name: str = ""  # the mark closing it, once sent


class Playback:
    """Mark bookkeeping for one call's outbound audio.

    Per model audio chunk: `mark_before(item)` (send its mark, if any, before the media), then
    `sent(item, n)` (send its mark, if any, after the media). `mark()` closes the unmarked
    audio, `acked(name)` takes Twilio's echoes, `cleared()` follows a `clear`.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock  # monotonic seconds
        self._generation = 0
        self._sequence = 0
        # Marked segments of the current generation not yet echoed, oldest first, then the
        # audio sent after the last mark (None when there is none).
        self._queue: deque[_Segment] = deque()
        self._open: _Segment | None = None
        self._queued_names: set[str] = set()
        self._queued_bytes = 0
        # When the last mark was echoed: playback moved on from there. Audio sent later (after
        # a clear, say) starts when it is sent, so this needs no reset.
        self._echoed_at = -math.inf
        self._sent_bytes: dict[str, int] = {}
        self._heard_bytes: dict[str, int] = {}  # offset of each item's last echoed mark
        self._cut_items: set[str] = set()

    def mark_before(self, item_id: str) -> str | None:
        """Before sending a chunk of `item_id`: the mark to send first, if any.

        Unmarked audio of another item is closed here: a mark never spans two items.
        """
        segment = self._open
        if segment is None or segment.item_id == item_id:
            return None
        return self._close(segment)

    def sent(self, item_id: str, ulaw_bytes: int) -> str | None:
        """Record `ulaw_bytes` of `item_id` queued at Twilio; returns the mark to send after
        it, if one is due (`MARK_EVERY_MS` of audio unmarked)."""
        if ulaw_bytes < 0:
            raise ValueError(f"ulaw_bytes must be >= 0, not {ulaw_bytes}")
        offset = self._sent_bytes.get(item_id, 0) + ulaw_bytes
        self._sent_bytes[item_id] = offset
        if not ulaw_bytes:
            return None  # nothing to play, nothing to mark
        segment = self._open
        if segment is None:
            # The one clock read per mark interval: when this audio can start playing.
            segment = _Segment(item_id, offset - ulaw_bytes, offset, self._clock())
            self._open = segment
        elif segment.item_id != item_id:
            raise ValueError(f"audio of {segment.item_id!r} is unmarked: call mark_before first")
        else:
            segment.end = offset
        self._queued_bytes += ulaw_bytes
        if segment.end - segment.start >= MARK_EVERY_BYTES:
            return self._close(segment)
        return None

    def mark(self) -> str | None:
        """The mark to send now to close the audio sent since the last one (None if none).

        At the end of a response: without it the last few chunks would count as queued until
        the next response's audio.
        """
        segment = self._open
        return None if segment is None else self._close(segment)

    def _close(self, segment: _Segment) -> str:
        self._open = None
        self._sequence += 1
        name = f"g{self._generation}:{self._sequence}"
        segment.name = name
        self._queue.append(segment)
        self._queued_names.add(name)
        return name

    def acked(self, name: str) -> None:
        """Twilio echoed mark `name`: everything sent up to it has played.

        Marks of a cleared generation, marks already accounted for, unknown and malformed
        names are all simply not in the queue, so they are ignored.
        """
        if name not in self._queued_names:
            return
        self._echoed_at = self._clock()
        heard = self._heard_bytes
        while True:
            segment = self._queue.popleft()
            self._queued_names.discard(segment.name)
            self._queued_bytes -= segment.end - segment.start
            item_id = segment.item_id
            if item_id not in self._cut_items and segment.end > heard.get(item_id, 0):
                heard[item_id] = segment.end
            if segment.name == name:
                return

    def cleared(self) -> None:
        """We sent `clear`: Twilio's queue is empty and the marks it echoes now mean nothing."""
        # Unacknowledged audio, marked or not, may or may not have played; we cannot know
        # which, so its items are cut at what is known to be heard.
        self._cut_items.update(segment.item_id for segment in self._queue)
        if self._open is not None:
            self._cut_items.add(self._open.item_id)
        self._generation += 1
        self._queue.clear()
        self._open = None
        self._queued_names.clear()
        self._queued_bytes = 0

    def heard_ms(self, item_id: str) -> int:
        """Ms of `item_id`'s audio the caller has heard by now (0 for an item never played).

        The last echoed mark plus real-time playback since, capped at the next mark (see the
        module docstring).
        """
        heard = self._heard_bytes.get(item_id, 0)
        head = self._queue[0] if self._queue else self._open
        # Only the oldest unacknowledged audio can be playing. Unless a clear cut the item,
        # all of it before that audio was echoed: the estimate continues from `heard`.
        if head is not None and head.item_id == item_id and item_id not in self._cut_items:
            started = max(self._echoed_at, head.opened_at)
            played = int((self._clock() - started) * _BYTES_PER_S)
            if played > 0:
                heard += min(played, head.end - head.start)
        return heard // MULAW_BYTES_PER_MS

    def sent_ms(self, item_id: str) -> int:
        """Ms of `item_id`'s audio forwarded to Twilio, played or not."""
        return self._sent_bytes.get(item_id, 0) // MULAW_BYTES_PER_MS

    def forget(self, item_id: str) -> None:
        """Drop an item's counters once nothing will ask about it again (long calls)."""
        queued = self._open is not None and self._open.item_id == item_id
        if queued or any(segment.item_id == item_id for segment in self._queue):
            return
        self._sent_bytes.pop(item_id, None)
        self._heard_bytes.pop(item_id, None)
        self._cut_items.discard(item_id)

    @property
    def playing_item(self) -> str | None:
        """The item Twilio is playing now: the oldest one with audio not yet acknowledged."""
        if self._queue:
            return self._queue[0].item_id
        return None if self._open is None else self._open.item_id

    @property
    def queued_ms(self) -> int:
        """Audio sent in the current generation and not yet acknowledged, marked or not."""
        return self._queued_bytes // MULAW_BYTES_PER_MS

    @property
    def generation(self) -> int:
        return self._generation
