"""Incremental detokenization of one request's output, and where a stop string ends it. No torch.

Detokenizer keeps vLLM-style prefix/read offsets so each step decodes a few tokens, not the
whole output; StopMatcher finds stop strings in O(new text) per step.
"""
from __future__ import annotations


class StopMatcher:
    """Where a stop string ends in a growing text, fed only the new characters: one KMP
    automaton per stop string, so each step costs O(new text), whatever the stop strings' length
    and the text's. Its states also say how much of the text's end could still grow into a stop
    string (held back from a stream)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.fail = [_failure(s) for s in stops]
        self.state = [0] * len(stops)    # per stop: longest prefix of it that ends the text

    def feed(self, text: str, start: int) -> int | None:
        """Advance over text[start:]; the index where the earliest-starting stop string that ends
        within it begins, or None."""
        hit = None
        for j, (s, fail) in enumerate(zip(self.stops, self.fail)):
            k, n = self.state[j], len(s)
            for i in range(start, len(text)):
                c = text[i]
                while k and s[k] != c:
                    k = fail[k - 1]
                if s[k] == c:
                    k += 1
                if k == n:
                    begin = i - n + 1
                    hit = begin if hit is None else min(hit, begin)
                    k = fail[k - 1]
                    break
            self.state[j] = k
        return hit

    @property
    def pending(self) -> int:
        """Characters at the end of the text that are a proper prefix of some stop string."""
        return max(self.state, default=0)


def _failure(s: str) -> list[int]:
    """KMP failure function: f[i] = length of the longest proper border of s[:i + 1]."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class Detokenizer:
    """Incremental text of one request: prefix/read offsets (vLLM-style) so each step decodes
    a few tokens, not the whole output; a stop string cuts the text; text that may be the start
    of a stop string (or an incomplete UTF-8 character) is held back from the stream."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop = tokenizer, stop
        self.matcher = StopMatcher(stop) if stop else None
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0
        self.text = ""
        self.emitted = 0

    def push(self, ids: list[int]) -> bool:
        """Add tokens; True when a stop string appeared (the text is cut before it). Only the new
        text is searched."""
        self.ids.extend(ids)
        before = len(self.text)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self.text += full[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
        if self.matcher is not None and len(self.text) > before:
            hit = self.matcher.feed(self.text, before)
            if hit is not None:
                self.text = self.text[:hit]
                return True
        return False

    def flush(self) -> None:
        """At the end: whatever is still pending (an incomplete character) becomes text."""
        if self.read < len(self.ids):
            prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
            self.text += self.tok.decode(self.ids[self.prefix:])[len(prefix_text):]
            self.read = len(self.ids)

    def delta(self, finished: bool) -> str:
        safe = len(self.text)
        if not finished and self.matcher is not None:  # hold back a suffix that could grow into a stop string
            safe -= self.matcher.pending
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out
