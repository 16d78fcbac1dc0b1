"""Stop strings over streamed text, shared by every engine that detokenizes itself (no torch here)."""

from __future__ import annotations


class StopChecker:
    """Finds stop strings in streamed text and holds back text that might start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # everything produced so far (before truncation)
        self.emitted = 0  # characters of ``text`` already released to the caller

    def push(self, delta: str, check: bool = True) -> tuple[str, bool]:
        """Add ``delta``; returns (text safe to emit now, whether a stop string was hit).
        ``check`` False (before ``min_tokens``): no stop string can end the text yet, so all of
        it is released, and a stop string completed now never matches later (as in vLLM)."""
        self.text += delta
        if not check:
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out, False
        # Text before ``emitted`` cannot hold the start of a stop string (it was held back).
        hits = [at for at in (self.text.find(s, self.emitted) for s in self.stops) if at != -1]
        if hits:
            at = min(hits)
            out = self.text[self.emitted : at]
            self.text = self.text[:at]
            self.emitted = at
            return out, True
        safe = max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : safe]
        self.emitted = safe
        return out, False

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
