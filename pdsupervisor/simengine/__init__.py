"""A simulated vLLM OpenAI server, so the whole system runs and is tested with no accelerator.

It accepts vLLM's command line (unknown flags are ignored with a warning), honours the
prefill/decode roles of `--kv-transfer-config`, and shows what it was given at
`GET /debug/config` so tests can prove a plan reached the process. With DP size > 1 it is
one rank of a DP group that forms, serves and breaks as real ranks do (dpgroup.py).
"""
