"""Stop strings matched on generated text, not tokens, so a stop is found whatever the tokenization."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds on text deltas; releases text only once it cannot be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Return (text safe to emit, the stop string reached or None); the earliest in the text wins."""
        if not self._stops:
            return text, None
        buffer = self._held + text
        found = [(i, stop) for i, stop in ((buffer.find(stop), stop) for stop in self._stops) if i >= 0]
        if found:
            self._held = ""
            position, stop = min(found, key=lambda match: match[0])
            return buffer[:position], stop
        keep = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """The held-back text, when generation ends without reaching a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, buffer: str) -> int:
        """The longest suffix of buffer that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
