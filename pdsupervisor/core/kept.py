"""One value per node kept between revisions while the inputs it was made from are unchanged.

Why: the per-node memos of `cluster_view` and `node_engines` all keep an answer while the
node's inputs (its planned node, assignment, status, member facts: objects the watch-fed cache
and the plan memo keep while their keys are unchanged) are the very same objects. One helper
holds that rule: compared by identity (`same`), plus small values compared by equality (`equal`).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class KeptByNode(Generic[T]):
    """A value per node. Holds the `same` inputs, so their ids cannot be reused while kept."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple[object, ...], tuple[Hashable, ...], T]] = {}

    def get(self, node: str, same: tuple[object, ...], equal: tuple[Hashable, ...] = ()) -> T | None:
        """The node's kept value if made from exactly these inputs, else None."""
        kept = self._kept.get(node)
        if kept is None or len(kept[0]) != len(same) or kept[1] != equal:
            return None
        if all(a is b for a, b in zip(kept[0], same, strict=True)):
            return kept[2]
        return None

    def put(self, node: str, same: tuple[object, ...], value: T, equal: tuple[Hashable, ...] = ()) -> T:
        self._kept[node] = (same, equal, value)
        return value

    def drop(self, node: str) -> None:
        self._kept.pop(node, None)

    def keep_only(self, nodes: Collection[str]) -> None:
        """Forget the nodes not in `nodes` (gone from the cluster)."""
        for node in set(self._kept) - set(nodes):
            self._kept.pop(node, None)

    def clear(self) -> None:
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)
