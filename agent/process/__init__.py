"""Local process supervision: spawn, probe, restart, adopt and stop process trees.

Knows nothing of etcd, prefill or decode: it runs `ProcessSpec`s.
"""
