"""Tokens to text pieces with stop strings: a piece is sent once no stop string can start in it."""

from __future__ import annotations


class TextStream:
    """Incremental text of a request's tokens, cut at the first stop string.

    Text that could be the start of a stop string is held back (at most the longest stop string
    less one character); ``stopped`` turns true when a stop string appears, and the text before it
    is the last piece.
    """

    def __init__(self, decoder, stops: tuple[str, ...] = ()):
        self.decoder = decoder
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False
        self.tokens = 0

    def feed(self, token: int) -> str:
        """The text now safe to send after ``token`` ('' while held back or after a stop)."""
        if self.stopped:
            return ""
        self.tokens += 1
        self.pending += self.decoder.feed(token)
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text at the end of generation."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cuts = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            piece, self.pending = self.pending[:min(cuts)], ""
            return piece
        keep = 0 if final else min(self.hold, len(self.pending))
        piece = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(piece):]
        return piece
