"""Prefix-aware routing (`--policy prefix`): which instance last got a prompt's prefix.

An engine with a prefix cache (vLLM's automatic prefix caching) prefills only what follows the
longest prefix it still holds, so prompts that share a prefix (a system prompt, a document, the
earlier turns of a chat) are cheapest on the instance that served that prefix last.

Unit: the proxy has no tokenizer, so a prompt is cut into blocks of BLOCK_CHARS characters
(about 32 tokens of English text at 4 characters a token, the estimate the proxy's load weight
uses too); a partial last block is not keyed, as engines cache only whole blocks. The text is
the completion's `prompt` (when not a string, its compact JSON: token ids, or a batch), or the
chat's messages rendered one after another as `<|role|>\ncontent\n`. Block i's key is the hash
of (block i-1's key, block i's text): equal keys mean the same text from the prompt's start to
the end of block i. The hash is Python's own (`hash`, SipHash with a key drawn at start, 64
bits): a fifth of blake2b's cost per block here, and the keys never leave the process. At most
MAX_BLOCKS (128 Ki characters) are keyed.

`PrefixIndex` maps keys to the instance that last got a prompt with that prefix (an overflow
past the load bound excepted, see instances.py), an LRU of at most `capacity` keys (100,000 by
default, about 15 MB). A routed prompt's keys are touched
deepest first, so a chain's first keys, shared by the most prompts, are the most recent and
the last evicted: what remains of a chain is a prefix of it, and a lookup stops at its first
miss. Keys of an instance that left the membership or is out of rotation are not used, and are
overwritten when their prefix is routed again (or age out).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any, Generic, TypeVar

BLOCK_CHARS = 128
TOKENS_PER_BLOCK = BLOCK_CHARS // 4  # the proxy's token estimate of one block
MAX_BLOCKS = 1024
DEFAULT_CAPACITY = 100_000

T = TypeVar("T")


def prompt_text(body: dict[str, Any], chat: bool) -> str:
    """The text a prompt is keyed on: what an engine would prefill, as near as the proxy can tell."""
    if not chat:
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    parts: list[str] = []
    for msg in messages:
        if not isinstance(msg, dict):
            return "".join(parts)
        content = msg.get("content")
        if not isinstance(content, str):
            content = json.dumps(content, separators=(",", ":"))
        parts.append(f"<|{msg.get('role')}|>\n{content}\n")
    return "".join(parts)


def block_keys(text: str) -> list[int]:
    """The chained keys of the text's whole blocks (at most MAX_BLOCKS)."""
    end = min(len(text) // BLOCK_CHARS, MAX_BLOCKS) * BLOCK_CHARS
    keys: list[int] = []
    prev = 0
    for i in range(0, end, BLOCK_CHARS):
        prev = hash((prev, text[i:i + BLOCK_CHARS]))
        keys.append(prev)
    return keys


class PrefixIndex(Generic[T]):
    """Block key -> the instance (`T`) that last got a prompt with that prefix; LRU-bounded."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[int, T] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def longest(self, keys: Sequence[int], usable: Collection[T]) -> tuple[T | None, int]:
        """The usable instance that last got the longest prefix of `keys`, and how many blocks it got."""
        owner = self._owner
        best: T | None = None
        depth = 0
        for i, key in enumerate(keys, 1):
            inst = owner.get(key)
            if inst is None:
                break
            if inst in usable:
                best, depth = inst, i
        return best, depth

    def record(self, keys: Sequence[int], inst: T) -> None:
        """`inst` got a prompt with these keys: it holds each of its prefixes now."""
        owner = self._owner
        for key in reversed(keys):
            owner[key] = inst
            owner.move_to_end(key)
        while len(owner) > self.capacity:
            owner.popitem(last=False)
