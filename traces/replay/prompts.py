"""Prompts of a trace's token lengths, sharing what the trace shares.

The model: every replayed request gets a prompt of exactly its
``prompt_tokens`` tokens (as the given tokenizer counts them), built from
token ids and sent as ids where the endpoint takes them, else as the text
of those ids. What two prompts share is the trace's, in this order:

1. **Prefix blocks.** A request with ``prefix_hashes`` (Mooncake, RAGPulse)
   is the concatenation of one block of ``block_tokens`` ids per hash, each
   block drawn from a seed derived from its hash, cut to the prompt's
   length. Two requests sharing their first ``k`` hashes share their first
   ``k * block_tokens`` tokens, as the trace says.
2. **Sessions.** Otherwise a turn of a session starts with the previous
   turn's prompt and response (the response as it came back: SGLang's
   ``output_ids``, else the response text encoded), then fresh ids up to
   its length, so a prefix cache sees the conversation's reuse. A history
   longer than the new prompt is cut to it. When the previous turn has not
   finished by the time this one is due (an open loop does not wait), its
   response is stood in for by ids of the trace's output length, drawn from
   the previous turn's seed, and the turn is counted as sent early.
3. Everything else is fresh ids from the request's own seed.

Deterministic for a seed: the same trace, seed and tokenizer give the same
prompts (session turns also depend on what the server answered).

Simplifications: a text prompt built from an HF tokenizer's ids may merge
across block boundaries, so its count is exact but sharing is to within a
token of the block edge; a chat endpoint's template adds tokens the built-in
rendering (:func:`traces.tokenizer.render_chat`) accounts for, a model's own
template does not.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from traces.tokenizer import VOCAB_SIZE, Tokenizer, WordTokenizer

__all__ = ["PromptBuilder", "SessionTurn"]

#: Prefix blocks a builder keeps (a Mooncake trace reuses a few thousand).
_BLOCK_CACHE = 16_384


def _seed(*parts: object) -> int:
    """A stable 32-bit seed from the parts (CRC-32 of their text: the same on every machine)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode("ascii"))


@dataclass
class SessionTurn:
    """What the next turn of a session starts with.

    Attributes:
        prompt_ids: the turn's prompt.
        response_ids: its response so far (complete once ``finished``).
        output_tokens: the trace's output length of the turn (the stand-in's length).
        seed: the turn's seed (draws the stand-in response).
        finished: the response has fully arrived.
    """

    prompt_ids: list[int]
    output_tokens: int
    seed: int
    response_ids: list[int] = field(default_factory=list)
    finished: bool = False


class PromptBuilder:
    """Builds each request's prompt ids (see the module docstring).

    Args:
        tokenizer: counts and draws the tokens.
        seed: the run's seed; every prompt's draw derives from it.
    """

    def __init__(self, tokenizer: Tokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self._blocks: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
        self._sessions: dict[str, SessionTurn] = {}
        #: Session turns sent before the previous turn's response was complete.
        self.early_turns = 0

    def _draw(self, n: int, seed: int) -> list[int]:
        """``n`` ids, the same for the same seed.

        Every id below the built-in vocabulary's size is a word, so numpy draws
        them (a long prompt's blocks would otherwise wait on ``random`` one id
        at a time); another tokenizer picks ids that round-trip through its text.
        """
        if type(self.tokenizer) is WordTokenizer:
            return np.random.default_rng(seed).integers(0, VOCAB_SIZE, n).tolist()
        return self.tokenizer.ids_of_length(n, seed)

    def _block(self, block_hash: int, size: int) -> list[int]:
        key = (block_hash, size)
        ids = self._blocks.get(key)
        if ids is None:
            ids = self._draw(size, _seed(self.seed, "block", block_hash))
            self._blocks[key] = ids
            if len(self._blocks) > _BLOCK_CACHE:
                self._blocks.popitem(last=False)
        return ids

    def build(
        self,
        request_id: int,
        prompt_tokens: int,
        output_tokens: int,
        *,
        session_id: str | None = None,
        prefix_hashes: Sequence[int] | None = None,
        block_tokens: int | None = None,
    ) -> list[int]:
        """The prompt ids of one request: ``prompt_tokens`` of them.

        A session turn is remembered as the session's latest, so
        :meth:`add_response` can extend it and the next turn start with it.
        """
        own = _seed(self.seed, "request", request_id)
        if prefix_hashes is not None and len(prefix_hashes) and block_tokens:
            ids: list[int] = []
            for h in prefix_hashes:
                if len(ids) >= prompt_tokens:
                    break
                ids += self._block(int(h), min(block_tokens, prompt_tokens - len(ids)))
        elif session_id is not None and session_id in self._sessions:
            prev = self._sessions[session_id]
            response = prev.response_ids
            if not prev.finished:
                self.early_turns += 1
                stand_in = self._draw(prev.output_tokens, _seed(prev.seed, "response"))
                response = response + stand_in[len(response) :]
            ids = (prev.prompt_ids + response)[:prompt_tokens]
        else:
            ids = []
        if len(ids) < prompt_tokens:
            ids = ids + self._draw(prompt_tokens - len(ids), own)
        if session_id is not None:
            self._sessions[session_id] = SessionTurn(ids, output_tokens, own)
        return ids

    def has_history(self, session_id: str) -> bool:
        """A turn of ``session_id`` was built already (the next one starts with it)."""
        return session_id in self._sessions

    def add_response(
        self, session_id: str | None, prompt_ids: list[int], response_ids: Sequence[int]
    ) -> None:
        """A session turn's response arrived in full: the next turn starts with it.

        Ignored unless ``prompt_ids`` is still the session's latest turn (a
        later turn was already sent and owns the history).
        """
        if session_id is None:
            return
        turn = self._sessions.get(session_id)
        if turn is not None and turn.prompt_ids is prompt_ids:
            turn.response_ids = list(response_ids)
            turn.finished = True
