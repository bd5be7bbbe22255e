"""A tiny random Llama and its tokenizer, made here from nothing (no model hub): what
`make test-vllm` serves with real vLLM on CPU.

Run with the vLLM environment's Python (it has torch, transformers and tokenizers):
    .venv-vllm/bin/python tests/vllm/make_tiny_model.py DIR
Writes DIR (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat
template) unless DIR/config.json is there already: the weights are random, so one copy serves
every run. Not collected by pytest (no test_ prefix): `make test` never imports vLLM.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB_SIZE = 512
# {bos} then one "role: content" line per message, then the assistant's turn
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
WORDS = ("the a of to and in is it that for on with as was at by this be from or an are not have "
         "prefill decode cache engine node agent cluster token model request proxy serve ready").split()


def corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """Made-up sentences over a small word list plus digits and punctuation: enough for a BPE
    with a few hundred merges; the byte-level alphabet covers any other text."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 16))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", f" {rng.randint(0, 9999)}."]))
    return out


def make_tokenizer(out: Path) -> int:
    """A byte-level BPE trained on `corpus()`, saved as a PreTrainedTokenizerFast; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def make_model(out: Path, vocab_size: int) -> None:
    """2 layers, hidden 128, 2 heads of 64 (a head size vLLM's CPU attention supports), random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=SPECIALS.index("<s>"), eos_token_id=SPECIALS.index("</s>"),
        pad_token_id=SPECIALS.index("<pad>"), tie_word_embeddings=False, torch_dtype="float32",
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out, safe_serialization=True)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} DIR")
    out = Path(sys.argv[1])
    if (out / "config.json").exists():
        print(f"tiny model already in {out}")
        return
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    make_model(tmp, make_tokenizer(tmp))
    tmp.rename(out)  # whole or absent: a killed run leaves only .tmp, redone next time
    print(f"tiny model written to {out}")


if __name__ == "__main__":
    main()
