"""Chained block hashes of token ids: what a prefix cache keys a prompt's blocks by.

A prompt's token ids are cut into consecutive blocks of ``block_tokens``
tokens (the last one may be shorter); block ``i``'s hash covers block ``i``'s
ids *and* block ``i - 1``'s hash, so two prompts share their first ``k``
hashes exactly when they share their first ``k`` blocks of tokens (as the
prefix caches of vLLM and SGLang key their blocks). These are the
``prefix_hashes`` a :class:`traces.Request` carries, so an emulated engine, a
router's prefix record and a trace agree on what a prefix is.

The hash is BLAKE2b over the previous hash and the block's ids as 64-bit
little-endian integers, truncated to 63 bits: the same in every process and
on every machine (unlike Python's ``hash``), and a non-negative value that
fits a numpy ``int64`` column. A partial last block is hashed like any other;
its size tells it apart from a full block of the same start
(:func:`sim.kv.block_keys` keys blocks by hash and size).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from hashlib import blake2b

__all__ = ["DEFAULT_BLOCK_TOKENS", "block_hashes"]

#: Tokens per block unless told otherwise (SGLang's and vLLM's page size for
#: prefix caching on GPUs).
DEFAULT_BLOCK_TOKENS = 16

_MASK_63 = (1 << 63) - 1


def block_hashes(token_ids: Sequence[int], block_tokens: int = DEFAULT_BLOCK_TOKENS) -> list[int]:
    """The chained hash of each block of ``block_tokens`` ids (one per block, the last may be partial).

    Raises:
        ValueError: ``block_tokens`` below 1, or an id outside 0 .. 2**63 - 1.
    """
    if block_tokens < 1:
        raise ValueError(f"block_tokens: expected an integer >= 1; got {block_tokens!r}")
    try:
        ids = array("q", token_ids)
    except OverflowError:
        raise ValueError("token ids must be integers in 0 .. 2**63 - 1") from None
    if sys.byteorder == "big":
        ids.byteswap()  # little-endian everywhere, so every machine agrees
    raw = ids.tobytes()
    if any(i < 0 for i in token_ids):
        raise ValueError("token ids must be integers in 0 .. 2**63 - 1")
    step = 8 * block_tokens
    out: list[int] = []
    prev = b""
    for start in range(0, len(raw), step):
        digest = blake2b(prev + raw[start : start + step], digest_size=8).digest()
        prev = digest
        out.append(int.from_bytes(digest, "little") & _MASK_63)
    return out
