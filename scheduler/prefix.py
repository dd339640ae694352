"""The router-side prefix record: which prompt blocks were sent to which instance.

A router cannot read an engine's prefix cache. What it can know is what it
sent where: every prompt it dispatched, as the request's chained block
hashes (``request.prefix_hashes``, blocks of ``request.block_tokens``
tokens). :class:`PrefixRecord` keeps that per instance and answers "how
many leading blocks of this prompt does that instance probably cache": the
longest leading run of the prompt's blocks in the instance's record.
Hashes are chained, so the run ends at the first block not recorded.

The model and its simplifications, against the engine's cache
(:mod:`sim.kv`, SGLang's RadixCache):

* **Bounded like the cache.** Each instance's record holds at most its KV
  capacity in tokens (``kv_capacity_tokens // block_tokens`` full blocks),
  and evicts least recently *sent* blocks first. A prompt's blocks are
  refreshed deepest first, so its own tail goes before its head, as the
  radix tree evicts leaves before their parents. The engine evicts least
  recently *released* unpinned blocks, and its running requests' private
  tokens share the capacity: the record overestimates what a busy instance
  still holds, and it never learns of an engine-side eviction or restart.
* **Blocks are keyed by hash and size**, as the engine keys them: a prompt
  ending inside a block and a longer one filling it name different blocks.
  A request with hashes but no ``block_tokens`` gets blocks of
  ``ceil(prompt / len(hashes))`` tokens.
* **Recorded at dispatch.** A block counts as cached from the moment it is
  sent, before its prefill has run: a router cannot see a prefill finish
  before the first token, and by the time the next request of a
  conversation arrives, it has.
* **Prompts without hashes** are never matched. With ``count_unhashed``
  they still take room (the SGLang gateway's tree grows with every text it
  routes), evicting like blocks; by default they are ignored, as the engine
  caches nothing of them.

Cost: recording and matching are proportional to the prompt's blocks; the
keys of the last request seen are kept, so the lookups of one arrival over
many instances compute them once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from scheduler.policy import RequestLike

__all__ = ["PrefixRecord", "prompt_block_keys"]

_SIZE_BITS = 32
_SIZE_MASK = (1 << _SIZE_BITS) - 1


def prompt_block_keys(request: RequestLike) -> tuple[int, ...]:
    """Record keys of the request's prompt blocks: ``(hash << 32) | block size in tokens``.

    Hashes past the prompt's end are ignored; the last block may be partial.
    Empty when the request has no hashes or no prompt.
    """
    hashes, prompt = request.prefix_hashes, request.prompt_tokens
    if hashes is None or len(hashes) == 0 or prompt <= 0:
        return ()
    block = request.block_tokens or -(-prompt // len(hashes))
    n = min(len(hashes), -(-prompt // block))
    keys = [(int(h) << _SIZE_BITS) | block for h in hashes[:n]]
    last = prompt - (n - 1) * block
    if last < block:
        keys[-1] = (int(hashes[n - 1]) << _SIZE_BITS) | last
    return tuple(keys)


#: Dispatches a record takes in before it brings itself up to date unasked:
#: bounds the backlog when nobody reads the record (the keys of 16k prompts
#: of 40 blocks are about 25 MB); rarer flushes cost less (measured on the
#: simulator's benchmark: 4k costs 5% of a run, 16k under 1%).
_BACKLOG = 16384


class _Blocks:
    """One instance's record: keys least recently sent first, with their sizes.

    Recording is lazy: dispatched prompts queue in a backlog that the first
    read applies (a simulated router whose policy never asks pays a list
    append per dispatch). A backlog is applied at once, not send by send:
    after any run of sends, an LRU bounded by size holds exactly the distinct
    keys in order of last send, newest first, up to the first that no longer
    fits. So a flush walks the backlog newest first (stopping when its keys
    alone fill the record), moves what it found to the recent end and evicts
    from the other: its cost is bounded by the backlog and by the capacity,
    never by what the record already holds (a router reads the record on
    every arrival, so a cost of the record's size would be paid each time).
    The result is the same as recording every send as it happens (tested).
    """

    __slots__ = ("_keys", "_pending", "_size", "capacity_tokens")

    def __init__(self, capacity_tokens: int) -> None:
        self._keys: OrderedDict[Hashable, int] = OrderedDict()
        self._pending: list[Sequence[int]] = []
        self._size = 0
        self.capacity_tokens = capacity_tokens

    @property
    def keys(self) -> OrderedDict[Hashable, int]:
        """Key -> tokens, least recently sent first."""
        if self._pending:
            self.flush()
        return self._keys

    @property
    def size_tokens(self) -> int:
        if self._pending:
            self.flush()
        return self._size

    def add(self, entries: list[tuple[Hashable, int]]) -> None:
        """Record keys of explicit sizes, the first most recent."""
        if self._pending:
            self.flush()
        keys = self._keys
        for key, tokens in reversed(entries):  # the head ends most recent: evicted last
            if key in keys:
                keys.move_to_end(key)
            else:
                keys[key] = tokens
                self._size += tokens
        self._evict()

    def add_blocks(self, block_keys: Sequence[int]) -> None:
        """Record prompt block keys, whose low bits are their sizes (on every dispatch)."""
        pending = self._pending
        pending.append(block_keys)
        if len(pending) >= _BACKLOG:
            self.flush()

    def flush(self) -> None:
        """Apply the backlog.

        The backlog's distinct keys are found newest first (stopping once
        they alone fill the capacity: then they are the whole record), then
        moved to the recent end, oldest first, and the least recent evicted:
        the cost is the backlog's, never the record's size.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        cap, size = self.capacity_tokens, 0
        newest: dict[Hashable, int] = {}  # newest first
        full = False
        for block_keys in reversed(pending):
            for key in block_keys:  # a prompt's head is its most recent block
                if key in newest:
                    continue
                tokens = key & _SIZE_MASK
                if size + tokens > cap:
                    full = True
                    break
                newest[key] = tokens
                size += tokens
            if full:
                break
        if full:
            self._keys = OrderedDict(reversed(newest.items()))
            self._size = size
            return
        keys, total, move = self._keys, self._size, self._keys.move_to_end
        for key, tokens in reversed(newest.items()):
            if key in keys:
                move(key)
            else:
                keys[key] = tokens
                total += tokens
        self._size = total
        if total > cap:
            self._evict()

    def _evict(self) -> None:
        keys, size, cap = self._keys, self._size, self.capacity_tokens
        pop = keys.popitem
        while size > cap and keys:
            size -= pop(last=False)[1]
        self._size = size


class PrefixRecord:
    """Per instance, the prompt blocks sent there, bounded and evicting (see the module doc).

    Args:
        capacity_tokens: record size per instance, in tokens, for instances
            without their own (:meth:`set_capacity`); ``None``: an instance
            must be given one before anything is recorded for it.
        count_unhashed: prompts without hashes take room (never matched).

    Raises:
        ValueError: a capacity below 1.
    """

    __slots__ = ("_capacity", "_count_unhashed", "_default", "_memo_keys", "_memo_req", "_records")

    def __init__(self, capacity_tokens: int | None = None, *, count_unhashed: bool = False) -> None:
        if capacity_tokens is not None:
            _check_capacity(capacity_tokens)
        self._default = capacity_tokens
        self._count_unhashed = count_unhashed
        self._capacity: dict[int, int] = {}
        self._records: dict[int, _Blocks] = {}
        self._memo_req: object = None
        self._memo_keys: tuple[int, ...] = ()

    def set_capacity(self, instance_id: int, capacity_tokens: int) -> None:
        """Bound the instance's record to ``capacity_tokens`` (its KV capacity), evicting now if over.

        Raises:
            ValueError: a capacity below 1.
        """
        _check_capacity(capacity_tokens)
        self._capacity[instance_id] = capacity_tokens
        rec = self._records.get(instance_id)
        if rec is not None:
            rec.flush()  # what was sent before fits the old capacity
            rec.capacity_tokens = capacity_tokens
            rec.add([])

    def record(self, instance_id: int, request: RequestLike) -> None:
        """Note that ``request``'s prompt was sent to the instance (call on dispatch).

        Raises:
            KeyError: the instance has no capacity and there is no default.
        """
        keys = self._keys(request)
        if keys:
            self.record_keys(instance_id, keys)
        elif self._count_unhashed and request.prompt_tokens > 0:
            entry = (("prompt", request.request_id), request.prompt_tokens)
            self._blocks(instance_id).add([entry])

    def record_keys(self, instance_id: int, keys: Sequence[int]) -> None:
        """:meth:`record` for a prompt whose :func:`prompt_block_keys` the caller has already.

        A driver that keys its own cache the same way (the simulator's engine
        does) computes them once per request.
        """
        if keys:
            rec = self._records.get(instance_id)
            (rec or self._blocks(instance_id)).add_blocks(keys)

    def cached_blocks(self, instance_id: int, request: RequestLike) -> int:
        """Leading blocks of ``request``'s prompt in the instance's record (0 if none)."""
        return self.cached_keys(instance_id, self._keys(request))

    def cached_keys(self, instance_id: int, keys: Sequence[int]) -> int:
        """:meth:`cached_blocks` for a prompt's :func:`prompt_block_keys`."""
        rec = self._records.get(instance_id)
        if rec is None:
            return 0
        held, n = rec.keys, 0
        for k in keys:
            if k not in held:
                break
            n += 1
        return n

    def _blocks(self, instance_id: int) -> _Blocks:
        rec = self._records.get(instance_id)
        if rec is None:
            cap = self._capacity.get(instance_id, self._default)
            if cap is None:
                raise KeyError(f"prefix record: no capacity set for instance {instance_id}")
            rec = self._records[instance_id] = _Blocks(cap)
        return rec

    def size_tokens(self, instance_id: int) -> int:
        """Tokens in the instance's record."""
        rec = self._records.get(instance_id)
        return rec.size_tokens if rec else 0

    def forget(self, instance_id: int) -> None:
        """Drop the instance's record (it left, or went unhealthy and may come back empty)."""
        self._records.pop(instance_id, None)

    def reset(self) -> None:
        """Forget every record (capacities stay)."""
        self._records.clear()
        self._memo_req, self._memo_keys = None, ()

    def _keys(self, request: RequestLike) -> tuple[int, ...]:
        if request is not self._memo_req:
            self._memo_keys = prompt_block_keys(request)
            self._memo_req = request
        return self._memo_keys


def _check_capacity(capacity_tokens: int) -> None:
    if capacity_tokens < 1:
        raise ValueError(f"prefix record: capacity_tokens must be >= 1; got {capacity_tokens}")
