"""Token bytes and stop strings matched across token boundaries.

Byte-level BPE tokenizers (Qwen's, GPT-2's, our tiny one) map every token to an exact byte
string; the text of a sequence is the concatenation of its tokens' bytes. Matching stop
strings on bytes handles a stop string split over several tokens, and a token that holds a
stop string plus more text after it.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = [
    "find_new_stop",
    "token_bytes_table",
]


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes_table(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Bytes of every token id in [0, vocab_size); special tokens map to b"" (they are not text).

    Byte-level tokenizers are mapped exactly. For any other tokenizer each id is decoded on
    its own, which is exact for whole-character tokens.
    """
    decoder = _byte_decoder()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {v: k for k, v in (tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}).items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    table: list[bytes] = []
    byte_level = _looks_byte_level(tokenizer)
    for i, piece in enumerate(pieces):
        if i in special:
            table.append(b"")
        elif i in added:
            table.append(added[i].encode("utf-8"))
        elif byte_level and piece is not None and all(ch in decoder for ch in piece):
            table.append(bytes(decoder[ch] for ch in piece))
        else:
            table.append(tokenizer.decode([i], skip_special_tokens=True).encode("utf-8"))
    table.extend(b"" for _ in range(vocab_size - len(table)))  # embedding rows with no token
    return table


def _looks_byte_level(tokenizer: Any) -> bool:
    probe = "Hi é 12 </answer>"
    try:
        ids = tokenizer.encode(probe, add_special_tokens=False)
        pieces = tokenizer.convert_ids_to_tokens(ids)
        decoder = _byte_decoder()
        return b"".join(bytes(decoder[ch] for ch in p) for p in pieces) == probe.encode("utf-8")
    except (KeyError, TypeError):
        return False


def find_new_stop(buffer: bytes | bytearray, new_bytes: int, stops: list[bytes]) -> tuple[int, bytes] | None:
    """The earliest stop-string occurrence in ``buffer`` that ends inside its last ``new_bytes`` bytes.

    Returns (start offset, stop bytes) or None. Occurrences that ended earlier were either
    matched before or were deliberately ignored (min_tokens), so they are not reported.
    """
    best: tuple[int, bytes] | None = None
    old_len = len(buffer) - new_bytes
    for stop in stops:
        start = buffer.find(stop, max(0, old_len - len(stop) + 1))
        if start != -1 and (best is None or start < best[0]):
            best = (start, stop)
    return best
