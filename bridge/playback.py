"""What the caller actually heard, from Twilio's echoed marks. No I/O.

The model produces audio faster than real time and Twilio queues it, so "sent" is not
"heard". After every chunk forwarded to Twilio the bridge sends a mark; Twilio echoes a mark
when playback reaches it. Audio plays in order, so an echoed mark means everything sent before
it has been played. On barge-in the bridge sends `clear`: Twilio drops its queue and echoes
every mark still queued, which is indistinguishable by shape from "played" — hence the
generation in each mark name: marks from a cleared generation are ignored.

`heard_ms(item)` is how much of the start of that item's audio the caller has heard, without a
gap (what `conversation.item.truncate` wants as `audio_end_ms`). It is a lower bound: audio
played between the last echoed mark and a `clear` is not counted, and once a `clear` has cut an
item (dropped some of its audio unacknowledged) nothing sent for it later counts either, since
the caller did not hear what lay in between. The bridge should stop sending a cut item's audio.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

MULAW_BYTES_PER_MS = 8


@dataclass(slots=True, frozen=True)
class _QueuedMark:
    name: str
    item_id: str
    item_offset: int  # bytes of the item sent up to and including this chunk
    chunk_bytes: int


class Playback:
    """Mark bookkeeping for one call's outbound audio."""

    def __init__(self) -> None:
        self._generation = 0
        self._sequence = 0
        # Marks of the current generation not yet echoed, in send (= playback) order.
        self._queue: deque[_QueuedMark] = deque()
        self._queued_names: set[str] = set()
        self._queued_bytes = 0
        self._sent_bytes: dict[str, int] = {}
        self._heard_bytes: dict[str, int] = {}
        self._cut_items: set[str] = set()

    def sent(self, item_id: str, ulaw_bytes: int) -> str:
        """Record `ulaw_bytes` of `item_id` queued at Twilio; returns the mark to send after it."""
        if ulaw_bytes < 0:
            raise ValueError(f"ulaw_bytes must be >= 0, not {ulaw_bytes}")
        offset = self._sent_bytes.get(item_id, 0) + ulaw_bytes
        self._sent_bytes[item_id] = offset
        self._sequence += 1
        name = f"g{self._generation}:{self._sequence}"
        self._queue.append(_QueuedMark(name, item_id, offset, ulaw_bytes))
        self._queued_names.add(name)
        self._queued_bytes += ulaw_bytes
        return name

    def acked(self, name: str) -> None:
        """Twilio echoed mark `name`: everything sent up to it has played.

        Marks of a cleared generation, marks already accounted for, unknown and malformed
        names are all simply not in the queue, so they are ignored.
        """
        if name not in self._queued_names:
            return
        while True:
            mark = self._queue.popleft()
            self._queued_names.discard(mark.name)
            self._queued_bytes -= mark.chunk_bytes
            if mark.item_id not in self._cut_items and mark.item_offset > self._heard_bytes.get(
                mark.item_id, 0
            ):
                self._heard_bytes[mark.item_id] = mark.item_offset
            if mark.name == name:
                return

    def cleared(self) -> None:
        """We sent `clear`: Twilio's queue is empty and the marks it echoes now mean nothing."""
        # Unacknowledged audio may or may not have played; we cannot know which, so its
        # items are cut at what is known to be heard.
        self._cut_items.update(mark.item_id for mark in self._queue if mark.chunk_bytes)
        self._generation += 1
        self._queue.clear()
        self._queued_names.clear()
        self._queued_bytes = 0

    def heard_ms(self, item_id: str) -> int:
        """Ms of `item_id`'s audio the caller has heard (0 for an item never played)."""
        return self._heard_bytes.get(item_id, 0) // MULAW_BYTES_PER_MS

    def sent_ms(self, item_id: str) -> int:
        """Ms of `item_id`'s audio forwarded to Twilio, played or not."""
        return self._sent_bytes.get(item_id, 0) // MULAW_BYTES_PER_MS

    def forget(self, item_id: str) -> None:
        """Drop an item's counters once nothing will ask about it again (long calls)."""
        if not any(mark.item_id == item_id for mark in self._queue):
            self._sent_bytes.pop(item_id, None)
            self._heard_bytes.pop(item_id, None)
            self._cut_items.discard(item_id)

    @property
    def playing_item(self) -> str | None:
        """The item Twilio is playing now: the oldest one with audio not yet acknowledged."""
        return self._queue[0].item_id if self._queue else None

    @property
    def queued_ms(self) -> int:
        """Audio sent in the current generation and not yet acknowledged."""
        return self._queued_bytes // MULAW_BYTES_PER_MS

    @property
    def generation(self) -> int:
        return self._generation
