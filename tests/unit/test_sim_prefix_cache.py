"""The simulated engine's prefix cache on its own: blocks, the longest cached prefix, LRU bound."""

from __future__ import annotations

from pdsupervisor.simengine.prefixcache import BLOCK_TOKENS, PrefixCache, block_keys
from pdsupervisor.simengine.shapes import prompt_tokens


def words(n: int, tag: str = "w") -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def test_keys_are_chained_over_full_blocks_only():
    a, b = words(40), words(16) + words(24, "x")
    assert len(block_keys(a)) == 2 == len(block_keys(b))  # the partial third block is not keyed
    assert block_keys(a)[0] == block_keys(b)[0] and block_keys(a)[1] != block_keys(b)[1]
    # a block's key stands for the whole prefix: the same second block after another first differs
    assert block_keys(words(16, "y") + a[16:32])[1] != block_keys(a)[1]
    assert block_keys(list(range(48))) == block_keys(list(range(48)) + [1, 2])
    assert block_keys(a, limit=1) == block_keys(a)[:1]


def test_a_repeated_prompt_is_cached_but_its_last_token_is_always_computed():
    cache = PrefixCache(100)
    prompt = words(100)
    assert cache.cached_tokens(prompt) == 0
    cache.store(prompt)
    assert len(cache) == 6
    assert cache.cached_tokens(prompt) == 96  # the 4 tokens after the last full block are computed
    exact = words(4 * BLOCK_TOKENS, "e")
    cache.store(exact)
    assert cache.cached_tokens(exact) == 3 * BLOCK_TOKENS  # not 64: one token at least is computed
    # another ending after a shared prefix: the shared full blocks only
    assert cache.cached_tokens(words(40) + words(60, "z")) == 32


def test_the_cache_holds_at_most_its_capacity_and_evicts_tails_before_heads():
    cache = PrefixCache(8)
    first = words(6 * BLOCK_TOKENS + 1)
    cache.store(first)
    cache.store(words(4 * BLOCK_TOKENS + 1, "o"))
    assert len(cache) == 8
    # the 2 blocks evicted were the first prompt's last ones: what is left of it is a prefix
    assert cache.cached_tokens(first) == 4 * BLOCK_TOKENS
    cache.store(words(20 * BLOCK_TOKENS, "big"))
    assert len(cache) == 8 and cache.cached_tokens(first) == 0


def test_prompt_tokens_are_the_words_of_the_prompt_or_its_token_ids():
    assert prompt_tokens({"prompt": "a  b\nc"}, chat=False) == ["a", "b", "c"]
    assert prompt_tokens({"prompt": [5, 6, 7]}, chat=False) == [5, 6, 7]
    assert prompt_tokens({"prompt": ["a b", "c"]}, chat=False) == ["a", "b", "c"]
    chat = {"messages": [{"role": "system", "content": "s t"}, {"role": "user", "content": [{"type": "text", "text": "u"}]}]}
    assert prompt_tokens(chat, chat=True) == ["s", "t", "u"]
    assert prompt_tokens({"prompt": ""}, chat=False) == []
