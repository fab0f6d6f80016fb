"""Tokens -> text pieces for a streamed completion, ending at the first stop string.

Text is decoded from ALL tokens so far and the new suffix sent, so characters that span tokens (UTF-8 split
over byte tokens) and SentencePiece's leading spaces come out exactly as one full decode; a decode ending in
U+FFFD (a character still incomplete) waits for the next token. Stop strings are matched on the decoded
text, not on tokens ("." may be inside a token ". The"): the text ends before the first stop string, which is
not returned, and text that could still grow into a stop string is held back until it cannot.

A token's own text (for logprobs) is decoded after the token before it, as decode([prev, id]) minus
decode([prev]): alone, SentencePiece would drop the token's leading space.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Piece:
    text: str
    tokens: list = field(default_factory=list)   # the engine's Tokens whose text this piece completes


class TextStream:
    def __init__(self, tokenizer, stops: list[str] = (), prev_id: int | None = None):
        self.tok, self.stops = tokenizer, list(stops)
        self._prev = prev_id        # the prompt's last token: the context of the first token's text
        self.ids: list[int] = []
        self.text = ""              # decoded so far (may end in held-back text)
        self.sent = 0               # characters of self.text already returned
        self.stopped = False        # a stop string was found: the caller ends the request
        self._pending: list = []    # (token, offset of its text) not yet returned
        self.offsets: list[int] = []  # per returned token: offset of its text in the completion

    def push(self, t) -> Piece:
        """Add one engine Token; the text that is now final (possibly '')."""
        if self.stopped:
            return Piece("")
        self._pending.append((t, len(self.text)))
        if t.logprob is not None:
            t.text = self._token_text(t.id)
            t.top_text = [self._token_text(i) for i, _ in t.top]
        self._prev = t.id
        self.ids.append(t.id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return Piece("")
        self.text = text
        end = len(text)
        for s in self.stops:          # the earliest stop string wins
            i = text.find(s, max(0, self.sent - len(s) + 1))
            if i != -1 and i < end:
                end, self.stopped = i, True
        if not self.stopped:          # hold back a suffix that is a prefix of a stop string
            for s in self.stops:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if text.endswith(s[:k]):
                        end = min(end, len(text) - k)
                        break
        return self._emit(end)

    def finish(self) -> Piece:
        """The held-back rest once generation ended (it can no longer become a stop string)."""
        if self.stopped:
            return Piece("")
        return self._emit(len(self.text))

    def _token_text(self, i: int) -> str:
        if self._prev is None:
            return self.tok.decode([i])
        return self.tok.decode([self._prev, i])[len(self.tok.decode([self._prev])):]

    def _emit(self, end: int) -> Piece:
        piece = Piece(self.text[self.sent:end])
        if self.stopped:              # tokens whose text starts before the stop string
            keep = [(t, o) for t, o in self._pending if o < end]
            self._pending = []
        else:                         # tokens whose text is complete within [0, end)
            keep = []
            while self._pending and (len(self._pending) > 1 and self._pending[1][1] <= end
                                     or len(self.text) <= end):
                keep.append(self._pending.pop(0))
        piece.tokens = [t for t, _ in keep]
        self.offsets += [o for _, o in keep]
        self.sent = max(self.sent, end)
        return piece
