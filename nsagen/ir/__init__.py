"""The IR: the op graph of a spec and the passes that lower it to a kernel plan."""
from __future__ import annotations

from ..target import Target
from .dsa_passes import lower_dsa
from .graph import build_graph, describe
from .passes import KernelPlan, Plan, lower_nsa


def lower(spec, target: Target | None = None) -> Plan:
    """The kernel plan of a spec of either family (NSA: `passes.lower_nsa`, DSA:
    `dsa_passes.lower_dsa`), for `target` (default: the GPU at hand, else the default preset)."""
    return (lower_dsa if spec.family == "dsa" else lower_nsa)(spec, target)


__all__ = ["build_graph", "describe", "lower", "lower_dsa", "lower_nsa", "Plan", "KernelPlan"]
