"""Incremental detokenization with stop strings.

Contract: feeding a request's tokens in any chunking to `IncrementalDetokenizer.add`
and concatenating the returned text deltas gives `decode_text(tokenizer, all_tokens)`
(cut before the first stop string, if one occurs). Text that might still become part
of a stop string, or an incomplete UTF-8 character, is held back until it cannot.
"""
from __future__ import annotations

_REPLACEMENT = "\ufffd"


def decode_text(tokenizer, token_ids: list[int]) -> str:
    """The one way this server turns generated token ids into text."""
    return tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop_strings: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.token_ids: list[int] = []
        self.num_tokens_used = 0      # tokens up to (and including) the one that completed a stop string
        self.stopped = False          # a stop string occurred: text is final
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""               # decoded text so far (complete characters only)
        self._sent = 0                # characters of _text already returned

    @property
    def text(self) -> str:
        return self._text

    def add(self, new_token_ids: list[int], finished: bool) -> str:
        """Append tokens; returns the text that can be released now. After a stop string
        matched, `stopped` is True and later calls return ''."""
        if self.stopped:
            return ""
        for t in new_token_ids:
            self.token_ids.append(int(t))
            self._decode_tail(final=False)
            if self.stop_strings and self._find_stop():
                return self._release(final=True)
        self.num_tokens_used = len(self.token_ids)
        if finished:
            self._decode_tail(final=True)
            if self.stop_strings:
                self._find_stop()
        return self._release(final=finished or self.stopped)

    # ---- internals -------------------------------------------------------------------
    def _decode_tail(self, final: bool) -> None:
        ids = self.token_ids
        prefix = decode_text(self.tokenizer, ids[self._prefix_offset:self._read_offset])
        full = decode_text(self.tokenizer, ids[self._prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith(_REPLACEMENT)):
            self._text += full[len(prefix):]
            # the next window starts at the tokens just read: decoding them again as a
            # prefix keeps merges across the boundary (e.g. a leading space) exact
            self._prefix_offset = self._read_offset
            self._read_offset = len(ids)

    def _find_stop(self) -> bool:
        """Cut the text before the earliest stop string that occurs in it."""
        # only the unsent tail (plus the longest stop length) can hold a new match
        start = max(0, self._sent - max(len(s) for s in self.stop_strings))
        hits = [i for i in (self._text.find(s, start) for s in self.stop_strings) if i >= 0]
        if not hits:
            return False
        cut = min(hits)
        self._text = self._text[:cut]
        self._sent = min(self._sent, cut)
        self.stopped = True
        self.num_tokens_used = len(self.token_ids)
        return True

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if not final and self.stop_strings:
            end -= self._held_back()
        if end <= self._sent:
            return ""
        delta = self._text[self._sent:end]
        self._sent = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        tail = self._text[self._sent:]
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2 style) spells every byte as one printable character: bytes
    that are printable Latin-1 stand for themselves, the other 68 are shifted to U+0100..
    in byte order. -> character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in keep]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


class TokenStrings:
    """token id -> (its text, its UTF-8 bytes), for log-probability reports. A token may
    hold part of a multi-byte character: its bytes are exact, its text shows U+FFFD there.
    Byte-level BPE pieces are mapped back to their bytes; SentencePiece pieces ("▁the",
    "<0x0A>") too; anything else falls back to decoding the one token. Cached per id."""

    _ALPHABET = _byte_level_alphabet()

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return hit

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(piece, str) and piece:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            if "\u2581" in piece:
                return piece.replace("\u2581", " ").encode("utf-8")
            if all(c in self._ALPHABET for c in piece):
                return bytes(self._ALPHABET[c] for c in piece)
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False).encode("utf-8")
