"""`--policy prefix` on its own: how prompts are keyed, and the picking rules."""

from __future__ import annotations

import pytest

from pdsupervisor.proxy.instances import Registry
from pdsupervisor.proxy.prefix import BLOCK_CHARS, MAX_BLOCKS, TOKENS_PER_BLOCK, PrefixIndex, block_keys, prompt_text

SYSTEM = "You are a careful assistant. " * 40  # 1,160 characters: 9 whole blocks


def text(n_blocks: int, tag: str = "a") -> str:
    return (tag * BLOCK_CHARS) * n_blocks


def completion(prompt: str) -> dict:
    return {"prompt": prompt, "max_tokens": 4}


# ---- keys ---------------------------------------------------------------------------------


def test_keys_are_chained_over_whole_blocks_of_characters():
    assert block_keys("x" * (BLOCK_CHARS - 1)) == []
    assert len(block_keys("x" * (3 * BLOCK_CHARS + 5))) == 3  # the partial block is not keyed
    a, b = block_keys(SYSTEM + "question one?" * 20), block_keys(SYSTEM + "and another" * 20)
    shared = len(SYSTEM) // BLOCK_CHARS
    assert a[:shared] == b[:shared] and a[shared] != b[shared]
    # a block's key stands for the whole prefix up to it: the same block after another start differs
    assert block_keys(text(1, "b") + text(1))[1] != block_keys(text(2))[1]
    assert block_keys("é" * BLOCK_CHARS) != block_keys("e" * BLOCK_CHARS)  # characters, not bytes
    assert len(block_keys(text(MAX_BLOCKS + 5))) == MAX_BLOCKS


def test_the_text_keyed_is_the_prompt_or_the_rendered_messages():
    assert prompt_text({"prompt": "hello"}, chat=False) == "hello"
    assert prompt_text({"prompt": [1, 2, 3]}, chat=False) == "[1,2,3]"  # token ids: a prefix stays a prefix
    assert prompt_text({}, chat=False) == "null"
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    rendered = prompt_text({"messages": msgs}, chat=True)
    assert rendered == '<|system|>\nbe brief\n<|user|>\n[{"type":"text","text":"hi"}]\n'
    assert prompt_text({"messages": msgs[:1]}, chat=True) == rendered[:len("<|system|>\nbe brief\n")]
    assert prompt_text({"messages": "nope"}, chat=True) == ""
    # the role is part of the text: the same words as the system's or the user's are other prompts
    assert prompt_text({"messages": [{"role": "user", "content": "be brief"}]}, chat=True) != rendered[:20]


def test_only_the_prefix_policy_keys_prompts():
    assert Registry(policy="load").prompt_keys(completion(SYSTEM), chat=False) == []
    assert Registry(policy="round-robin").prompt_keys(completion(SYSTEM), chat=False) == []
    assert Registry(policy="prefix").prompt_keys(completion(SYSTEM), chat=False) == block_keys(SYSTEM)


# ---- picking ------------------------------------------------------------------------------


def registry(n: int = 3, **kw) -> Registry:
    reg = Registry(policy="prefix", **kw)
    reg.set_endpoints("prefill", [f"p{i}" for i in range(n)])
    reg.set_endpoints("decode", ["d0", "d1"])
    return reg


def inst(reg: Registry, endpoint: str):
    return next(i for i in reg.instances() if i.endpoint == endpoint)


def route(reg: Registry, prompt: str, exclude=frozenset()):
    return reg.pick("prefill", exclude, reg.prompt_keys(completion(prompt), chat=False))


def test_a_shared_prefix_goes_where_it_went_last_and_a_new_one_by_load():
    reg = registry()
    first = route(reg, SYSTEM + "first question")
    assert first.endpoint == "p0"  # nothing known: by load (all idle: the first)
    first.tokens = 500  # still busy with it, well within the bound (slack x 9 blocks of 32 tokens)
    assert route(reg, SYSTEM + "second question") is first
    assert route(reg, text(10, "z")).endpoint == "p1"  # another prefix: the least loaded
    assert reg.prefix_routed == {"hit": 1, "busy": 0, "miss": 2}


def test_the_longest_prefix_wins():
    reg = registry()
    p0, p1 = inst(reg, "p0"), inst(reg, "p1")
    long_prompt = SYSTEM + text(6, "d")
    reg._prefix["prefill"] = index = PrefixIndex()
    index.record(block_keys(long_prompt), p1)  # p1 got the system prompt and 6 more blocks
    index.record(block_keys(SYSTEM + text(2, "q")), p0)  # p0 got the system prompt since, then other text
    assert route(reg, long_prompt + "and a question") is p1
    assert route(reg, SYSTEM + text(3, "q")) is p0


def test_a_holder_busier_than_the_bound_is_passed_over_for_the_least_loaded():
    reg = registry(2)
    p0, p1 = inst(reg, "p0"), inst(reg, "p1")
    prompt = text(10)
    assert route(reg, prompt) is p0
    bound = int(reg.prefix_slack * 10 * TOKENS_PER_BLOCK)  # slack x the 10 blocks' 320 tokens
    p0.tokens, p1.tokens = 100 + bound, 100  # at the bound: still the holder
    assert route(reg, prompt) is p0
    p0.tokens += 1  # past it: by load; the prefix stays with p0, which still has it cached
    assert route(reg, prompt) is p1
    p0.tokens = p1.tokens = 0
    assert route(reg, prompt) is p0
    assert reg.prefix_routed == {"hit": 2, "busy": 1, "miss": 1}
    # a short match is worth little waiting: one block allows only slack x 32 tokens more
    assert route(reg, text(1) + text(9, "n")) is p0
    p0.tokens = int(reg.prefix_slack * TOKENS_PER_BLOCK) + 1
    assert route(reg, text(1) + text(9, "m")) is p1


def test_ejected_excluded_and_removed_holders_are_skipped_and_their_keys_forgotten():
    reg = registry(3)
    p0, p1 = inst(reg, "p0"), inst(reg, "p1")
    prompt = SYSTEM + "x"
    assert route(reg, prompt) is p0
    reg.eject(p0, "test")
    p1.total_tokens = 1  # the load pick is p2 now
    assert route(reg, prompt).endpoint == "p2"
    reg.restore(p0)
    assert route(reg, prompt).endpoint == "p2"  # the prefix moved with the request
    assert route(reg, prompt, exclude={inst(reg, "p2")}) is p0  # a retry: not the instance that failed
    reg.set_endpoints("prefill", ["p1", "p2"])  # p0 leaves the membership
    assert route(reg, prompt).endpoint == "p2"  # p0 held the longest prefix: skipped, p2 still holds it
    reg.set_endpoints("prefill", ["p0", "p1", "p2"])  # back: a new instance, its old keys mean nothing
    back = inst(reg, "p0")
    assert back is not p0 and route(reg, prompt).endpoint == "p2"


def test_the_index_is_an_lru_of_keys_that_keeps_a_prefix_of_each_prompt():
    reg = registry(2, prefix_capacity=20)
    p0 = route(reg, text(12, "a"))
    for tag in "bcd":
        route(reg, text(4, tag))
    index = reg._prefix["prefill"]
    assert len(index) == 20  # 24 keys recorded: the 4 oldest, the first prompt's last blocks, went first
    holder, depth = index.longest(block_keys(text(12, "a")), [p0])
    assert (holder, depth) == (p0, 8)
    for tag in "efghijkl":
        route(reg, text(4, tag))
    assert len(index) == 20 and index.longest(block_keys(text(12, "a")), [p0]) == (None, 0)


def test_decode_is_routed_by_load_under_the_prefix_policy():
    reg = registry()
    d0, d1 = inst(reg, "d0"), inst(reg, "d1")
    d0.inflight = 1
    assert reg.pick("decode") is d1
    assert reg.pick("decode", frozenset(), ()) is d1 and reg.prefix_routed == {"hit": 0, "busy": 0, "miss": 0}


@pytest.mark.parametrize("policy", ["load", "round-robin"])
def test_other_policies_pick_as_before(policy):
    reg = registry(2)
    reg.policy = policy
    picks = [reg.pick("prefill", frozenset(), reg.prompt_keys(completion(SYSTEM), chat=False)).endpoint for _ in range(2)]
    assert picks == (["p0", "p0"] if policy == "load" else ["p0", "p1"])
