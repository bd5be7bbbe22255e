"""OpenAI/vLLM response shapes: the prompt's tokens and response/chunk builders."""

from __future__ import annotations

import json
import time
from typing import Any


def prompt_tokens(body: dict[str, Any], chat: bool) -> list[str] | list[int]:
    """A deterministic stand-in for a tokenizer: the whitespace-separated words of the prompt
    (of every message's text, for chat), or the prompt itself when it is a list of token ids.
    The engine reports at least 1 prompt token, even for an empty prompt."""
    if chat:
        words: list[str] = []
        for msg in body.get("messages") or []:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                words += content.split()
            elif isinstance(content, list):  # [{"type": "text", "text": ...}]
                for p in content:
                    if isinstance(p, dict):
                        words += str(p.get("text", "")).split()
        return words
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return prompt
        prompt = " ".join(str(p) for p in prompt)
    return str(prompt).split()


def token_text(i: int) -> str:
    return f" t{i}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def full_response(
    *, chat: bool, req_id: str, model: str, text: str, finish: str, prompt_tokens: int,
    completion_tokens: int, kv_transfer_params: dict[str, Any] | None,
) -> bytes:
    created = int(time.time())
    if chat:
        out: dict[str, Any] = {
            "id": f"chatcmpl-{req_id}", "object": "chat.completion", "created": created, "model": model,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish, "stop_reason": None,
            }],
        }
    else:
        out = {
            "id": f"cmpl-{req_id}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}],
        }
    out["usage"] = usage(prompt_tokens, completion_tokens)
    out["kv_transfer_params"] = kv_transfer_params
    return json.dumps(out, separators=(",", ":")).encode()


class ChunkMaker:
    """Builds vLLM-shaped SSE lines for one streamed request."""

    def __init__(self, *, chat: bool, req_id: str, model: str) -> None:
        self.chat = chat
        self.head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{req_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def _line(self, choices: list[dict[str, Any]], usage_: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = dict(self.head, choices=choices)
        if usage_ is not None:
            payload["usage"] = usage_
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def role(self) -> bytes:
        """Chat streams open with an assistant-role delta, as vLLM's do."""
        return self._line([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])

    def token(self, text: str, finish: str | None) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        return self._line([choice])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._line([], usage(prompt_tokens, completion_tokens))


DONE = b"data: [DONE]\n\n"


def error_body(message: str, *, type_: str = "BadRequestError", code: int = 400) -> bytes:
    return json.dumps({"object": "error", "message": message, "type": type_, "param": None, "code": code}).encode()
