"""The pure core: models, the spec, the planner, the cluster view and host checks.

No I/O here (no sockets, files, processes or clocks read behind the caller's back): every
function takes what it decides from and returns what it decided, so it can be tested
exhaustively and shown to a person before anything starts.
"""
