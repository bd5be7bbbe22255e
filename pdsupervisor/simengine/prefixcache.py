"""The simulated engine's prefix cache: an LRU of full blocks of prompt tokens, as vLLM's.

A prompt's tokens (the simulator's: see `shapes.prompt_tokens`) are cut into blocks of
BLOCK_TOKENS; block i is keyed by a hash of its tokens chained with block i-1's key, so one key
stands for the whole prompt up to the end of its block. A lookup counts the leading blocks that
are cached (those tokens need no prefill); at least the last token is always computed, as
vLLM recomputes it for the logits even when the whole prompt is cached. Once a prefill is
done its full blocks are stored, deepest first: a chain's first blocks, shared by the most
prompts, are then the most recently used and the last evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

BLOCK_TOKENS = 16  # vLLM's default block size


def block_keys(tokens: Sequence[str] | Sequence[int], limit: int | None = None) -> list[int]:
    """The chained keys of the full blocks of `tokens` (at most `limit` of them)."""
    n = len(tokens) // BLOCK_TOKENS
    if limit is not None:
        n = min(n, limit)
    keys: list[int] = []
    prev = 0
    for i in range(0, n * BLOCK_TOKENS, BLOCK_TOKENS):
        prev = hash((prev, *tokens[i:i + BLOCK_TOKENS]))
        keys.append(prev)
    return keys


class PrefixCache:
    """At most `capacity` blocks, least recently used evicted first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def cached_tokens(self, tokens: Sequence[str] | Sequence[int]) -> int:
        """Tokens of the prompt's longest cached prefix (whole blocks, never every token); the
        blocks hit count as used."""
        hits = 0
        for key in block_keys(tokens, limit=(len(tokens) - 1) // BLOCK_TOKENS):
            if key not in self._blocks:
                break
            self._blocks.move_to_end(key)
            hits += 1
        return hits * BLOCK_TOKENS

    def store(self, tokens: Sequence[str] | Sequence[int]) -> None:
        """Keep the prompt's full blocks (its prefill is done), evicting the least recently used."""
        blocks = self._blocks
        for key in reversed(block_keys(tokens)):
            blocks[key] = None
            blocks.move_to_end(key)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
