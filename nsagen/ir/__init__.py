"""The IR: the op graph of a spec and the passes that lower it to a kernel plan."""
from .graph import build_graph, describe
from .passes import KernelPlan, Plan, lower

__all__ = ["build_graph", "describe", "lower", "Plan", "KernelPlan"]
