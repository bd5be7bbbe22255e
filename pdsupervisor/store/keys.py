"""The key layout of one cluster (all of it under one prefix)::

    /pdsupervisor/<cluster>/spec                 cluster spec record (JSON) with its generation
    /pdsupervisor/<cluster>/members/<node>       NodeFacts, under the agent's lease
    /pdsupervisor/<cluster>/leader               coordinator's name, under its lease
    /pdsupervisor/<cluster>/assignments/<node>   NodeAssignment, written only by the leader
    /pdsupervisor/<cluster>/status/<node>        NodeStatus, written by the node's agent
    /pdsupervisor/<cluster>/events/<seq>         bounded event log, for people
"""

from __future__ import annotations


class Keys:
    """Key names of one cluster."""

    def __init__(self, cluster: str) -> None:
        self.root = f"/pdsupervisor/{cluster}/"
        self.spec = self.root + "spec"
        self.leader = self.root + "leader"
        self.members = self.root + "members/"
        self.assignments = self.root + "assignments/"
        self.status = self.root + "status/"
        self.events = self.root + "events/"

    def member(self, node: str) -> str:
        return self.members + node

    def assignment(self, node: str) -> str:
        return self.assignments + node

    def node_status(self, node: str) -> str:
        return self.status + node
