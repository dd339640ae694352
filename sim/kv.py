"""KV-cache accounting of one instance, with a radix-tree prefix cache.

The pool holds ``capacity_tokens`` token slots, split three ways::

    |<--------------------------- capacity_tokens --------------------------->|
    | private (running requests) | cached blocks: pinned | cached: evictable  | free |
                                  `--- cache_tokens ---------------------------'

* *private* slots belong to one running request (its uncached prompt tokens
  and the tokens it generated);
* *cached blocks* are prompt blocks named by ``Request.prefix_hashes``; a
  block is *pinned* while some running request uses it, and *evictable*
  once none does;
* an allocation that finds too few free slots evicts cached blocks first;
  when even that is not enough it fails and the caller decides.

Cached blocks form a radix tree, as in SGLang's RadixCache: a node holds a
run of consecutive block keys, its children continue it. Hashes are chained,
so a request's hit is the path from the root matching its leading keys.
A running request pins the path to its deepest node (counts walk up the
parent links). Eviction frees whole unpinned leaves, least recently released
first, until enough slots are free (SGLang's ``RadixCache.evict``); a node
released together with its ancestors is older than they are, so leading
(shared) blocks go last. The work per request is proportional to the nodes
on its path, not to its blocks.

A block is keyed by its hash and its size (:func:`block_keys`): a prompt
ending inside a block and a longer one filling it may name the block alike,
but they are different blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from heapq import heappop, heappush

__all__ = ["KvPool", "Node", "block_keys", "block_sizes"]

_SIZE_BITS = 32
_SIZE_MASK = (1 << _SIZE_BITS) - 1


def _tokens(keys: Sequence[int]) -> int:
    """Total size of blocks given by their keys."""
    return sum(map(_SIZE_MASK.__and__, keys))


def block_sizes(prompt_tokens: int, block_tokens: int, n_hashes: int) -> list[int]:
    """Token counts of a prompt's blocks (the last one may be partial).

    Hashes past the end of the prompt are ignored.
    """
    n = min(n_hashes, -(-prompt_tokens // block_tokens))
    sizes = [block_tokens] * n
    if n and n * block_tokens > prompt_tokens:
        sizes[-1] = prompt_tokens - (n - 1) * block_tokens
    return sizes


def block_keys(hashes: Sequence[int], prompt_tokens: int, block_tokens: int) -> list[int]:
    """Cache keys of a prompt's blocks: ``(hash << 32) | size``; the size is ``key & 0xFFFFFFFF``."""
    n = min(len(hashes), -(-prompt_tokens // block_tokens))
    keys = [(int(h) << _SIZE_BITS) | block_tokens for h in hashes[:n]]
    if n and n * block_tokens > prompt_tokens:
        keys[-1] = (int(hashes[n - 1]) << _SIZE_BITS) | (prompt_tokens - (n - 1) * block_tokens)
    return keys


class Node:
    """A run of cached blocks; its children continue the run. Owned by a :class:`KvPool`."""

    __slots__ = ("alive", "children", "keys", "parent", "refs", "tick", "tokens")

    def __init__(self, keys: list[int], parent: Node | None, tokens: int, refs: int) -> None:
        self.keys = keys
        self.parent = parent
        self.tokens = tokens
        #: Running requests whose path includes this node.
        self.refs = refs
        self.children: dict[int, Node] | None = None
        #: When it was last released (LRU order among leaves).
        self.tick = 0
        self.alive = True


def _common(node_keys: list[int], keys: Sequence[int], start: int) -> int:
    """Length of the common prefix of ``node_keys`` and ``keys[start:]``."""
    n = len(node_keys)
    if keys[start : start + n] == node_keys:
        return n
    m = 0
    limit = min(n, len(keys) - start)
    while m < limit and node_keys[m] == keys[start + m]:
        m += 1
    return m


class KvPool:
    """Slots of one instance's KV cache and the prefix blocks held in them.

    Args:
        capacity_tokens: slots in all (SGLang's ``max_total_tokens``).
    """

    __slots__ = (
        "_heap",
        "_root",
        "_tick",
        "cache_tokens",
        "capacity_tokens",
        "evictable_tokens",
        "evicted_tokens",
        "private_tokens",
    )

    def __init__(self, capacity_tokens: int) -> None:
        if capacity_tokens <= 0:
            raise ValueError(f"max_total_tokens must be positive, got {capacity_tokens}")
        self.capacity_tokens = int(capacity_tokens)
        #: Slots owned by single running requests.
        self.private_tokens = 0
        #: Slots holding cached blocks, pinned or not.
        self.cache_tokens = 0
        #: Slots of unpinned cached blocks (evictable).
        self.evictable_tokens = 0
        #: Slots evicted so far (a counter that only grows).
        self.evicted_tokens = 0
        self._root = Node([], None, 0, 1)
        self._root.children = {}
        self._tick = 0
        # (tick, node) of unpinned leaves; stale entries are skipped on pop.
        self._heap: list[tuple[int, Node]] = []

    # -- reading --------------------------------------------------------------

    @property
    def used_tokens(self) -> int:
        """Slots in use (private plus cached)."""
        return self.private_tokens + self.cache_tokens

    @property
    def free_tokens(self) -> int:
        """Slots neither private nor cached."""
        return self.capacity_tokens - self.private_tokens - self.cache_tokens

    @property
    def available_tokens(self) -> int:
        """Slots an allocation could get: free plus evictable."""
        return (
            self.capacity_tokens - self.private_tokens - self.cache_tokens + self.evictable_tokens
        )

    @property
    def n_blocks(self) -> int:
        """Cached blocks held."""
        return sum(len(node.keys) for node in self._nodes())

    def match(self, keys: Sequence[int]) -> tuple[int, int, int]:
        """``(blocks, tokens, evictable tokens)`` of the leading run of ``keys`` held here.

        Reads only. The evictable part is what pinning the run would take
        out of reach of allocations.
        """
        node, i, n = self._root, 0, len(keys)
        tokens = evictable = 0
        while i < n and node.children:
            child = node.children.get(keys[i])
            if child is None:
                break
            m = _common(child.keys, keys, i)
            t = child.tokens if m == len(child.keys) else _tokens(child.keys[:m])
            tokens += t
            if not child.refs:
                evictable += t
            i += m
            if m < len(child.keys):
                break
            node = child
        return i, tokens, evictable

    # -- changing -------------------------------------------------------------

    def allocate(self, tokens: int) -> bool:
        """Take ``tokens`` private slots, evicting cached leaves if needed.

        Returns False, changing nothing, when even eviction cannot make room.
        """
        free = self.capacity_tokens - self.private_tokens - self.cache_tokens
        if free < tokens:
            if free + self.evictable_tokens < tokens:
                return False
            self._evict(tokens - free)
        self.private_tokens += tokens
        return True

    def release(self, tokens: int) -> None:
        """Give back ``tokens`` private slots."""
        self.private_tokens -= tokens

    def acquire(self, keys: Sequence[int], n_blocks: int) -> Node:
        """Pin the first ``n_blocks`` of ``keys`` (held here) for one request.

        Returns the node the request now holds (pass it to :meth:`insert`
        and :meth:`release_path`).
        """
        node, i = self._root, 0
        while i < n_blocks:
            child = node.children[keys[i]]  # type: ignore[index]
            m = min(_common(child.keys, keys, i), n_blocks - i)
            if m < len(child.keys):
                child = self._split(child, m)
            i += m
            node = child
        self._pin_path(node)
        return node

    def insert(self, node: Node | None, keys: Sequence[int]) -> tuple[Node, int]:
        """Cache blocks a request computed after the ones it holds (``node``).

        Their slots move from the request's private slots to the cache. Blocks
        already held (another request cached them meanwhile) are pinned
        instead, and the request's private copies freed.

        Returns:
            ``(node the request now holds, private slots it no longer owns)``.
        """
        cur = node if node is not None else self._root
        moved, i, n = _tokens(keys), 0, len(keys)
        while i < n:
            child = cur.children.get(keys[i]) if cur.children else None
            if child is None:
                rest = list(keys[i:]) if i else list(keys)
                tokens = moved - _tokens(keys[:i]) if i else moved
                child = Node(rest, cur, tokens, 1)
                if cur.children is None:
                    cur.children = {}
                cur.children[rest[0]] = child
                self.cache_tokens += tokens
                cur = child
                break
            m = _common(child.keys, keys, i)
            if m < len(child.keys):
                child = self._split(child, m)
            if not child.refs:
                self.evictable_tokens -= child.tokens
            child.refs += 1
            cur = child
            i += m
        self.private_tokens -= moved
        return cur, moved

    def release_path(self, node: Node) -> None:
        """One request stopped using the blocks on ``node``'s path."""
        root = self._root
        while node is not root:
            node.refs -= 1
            if not node.refs:
                self.evictable_tokens += node.tokens
                self._tick += 1
                node.tick = self._tick
                if not node.children:
                    heappush(self._heap, (node.tick, node))
            node = node.parent  # type: ignore[assignment]

    def _pin_path(self, node: Node) -> None:
        root = self._root
        while node is not root:
            if not node.refs:
                self.evictable_tokens -= node.tokens
            node.refs += 1
            node = node.parent  # type: ignore[assignment]

    def _split(self, node: Node, m: int) -> Node:
        """Cut ``node`` after its first ``m`` blocks; return the new head node."""
        head_keys = node.keys[:m]
        head = Node(head_keys, node.parent, _tokens(head_keys), node.refs)
        head.tick = node.tick
        head.children = {node.keys[m]: node}
        node.parent.children[head_keys[0]] = head  # type: ignore[union-attr,index]
        node.keys = node.keys[m:]
        node.tokens -= head.tokens
        node.parent = head
        return head

    def _evict(self, tokens: int) -> None:
        """Free at least ``tokens`` cached slots: whole leaves, least recently released first."""
        heap, root = self._heap, self._root
        freed = 0
        while freed < tokens:
            tick, node = heappop(heap)
            if not node.alive or node.refs or node.children or node.tick != tick:
                continue  # stale: pinned, grown or evicted since it was pushed
            freed += node.tokens
            node.alive = False
            parent = node.parent
            del parent.children[node.keys[0]]  # type: ignore[union-attr]
            if parent is not root and not parent.refs and not parent.children:
                heappush(heap, (parent.tick, parent))
        self.cache_tokens -= freed
        self.evictable_tokens -= freed
        self.evicted_tokens += freed

    # -- checking -------------------------------------------------------------

    def _nodes(self):
        stack = list(self._root.children.values())  # type: ignore[union-attr]
        while stack:
            node = stack.pop()
            yield node
            if node.children:
                stack.extend(node.children.values())

    def check(self) -> None:
        """Assert the accounting invariants (tests and debug runs)."""
        assert self.private_tokens >= 0, self.private_tokens
        assert 0 <= self.evictable_tokens <= self.cache_tokens
        assert self.used_tokens <= self.capacity_tokens, (self.used_tokens, self.capacity_tokens)
        nodes = list(self._nodes())
        assert self.cache_tokens == sum(n.tokens for n in nodes)
        assert self.evictable_tokens == sum(n.tokens for n in nodes if not n.refs)
        for node in nodes:
            assert node.alive and node.keys and node.tokens == _tokens(node.keys)
            assert node.parent is not None and node.parent.children[node.keys[0]] is node
            if node.children:
                assert sum(c.refs for c in node.children.values()) <= node.refs
