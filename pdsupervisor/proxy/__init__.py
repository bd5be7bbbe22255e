"""The built-in PD proxy: OpenAI-compatible front door that runs prefill, then decode.

Membership comes from flags or live from etcd, so engines join and leave without a
restart; failing instances are ejected at once and probed back in.
"""
