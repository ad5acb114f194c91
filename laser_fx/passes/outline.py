"""Outline one call of a shared block: move its nodes into a graph module of their own.

After a plain trace a call of the recursive block is a run of nodes sharing a module-stack
entry (``net@3``). `outline_call` turns that run into a ``GraphModule`` that is a pure function
of the call's inputs: parameters and buffers read inside it (``get_attr``) stay in the outer
graph and are passed in, so no tensor gets a second owner in ``state_dict`` and ``.to()`` keeps
one copy. Leaf modules called inside (``call_module``) are shared by reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Graph, GraphModule, Node

__all__ = ["Outlined", "OutlineError", "outline_call"]


class OutlineError(Exception):
    """The nodes of a call cannot be outlined (they are not a convex region of the graph)."""


@dataclass
class Outlined:
    """An outlined call: ``module(*inputs)`` computes what ``outputs`` computed."""

    module: GraphModule
    inputs: list[Node]  # outer nodes, in the order the outlined module takes them
    is_param: list[bool]  # per input: read from a parameter/buffer (get_attr)
    outputs: list[Node]  # the original nodes whose values leave the call


def _descendants_in(span: list[Node], roots: set[Node]) -> set[Node]:
    hit = set(roots)
    for n in span:
        if n not in hit and any(a in hit for a in n.all_input_nodes):
            hit.add(n)
    return hit


def outline_call(root: GraphModule, group: list[Node], name: str) -> Outlined:
    """Build the outlined module for ``group`` (nodes of one call, in graph order).

    Nodes of the outer graph that lie between the group's first and last node but are not part
    of it are moved before the group when they do not depend on it, and after it when they do
    but the group does not depend on them; otherwise the group is not convex: `OutlineError`.
    The outer graph is not changed except for that reordering. ``group`` must hold no
    ``get_attr`` node (see `graph_nodes_of_call`).
    """
    graph = root.graph
    members = set(group)
    order = {n: i for i, n in enumerate(graph.nodes)}
    first, last = group[0], group[-1]
    span = [n for n in graph.nodes if order[first] <= order[n] <= order[last]]
    outsiders = [n for n in span if n not in members]
    if outsiders:
        after = _descendants_in(span, members) - members
        # Outsiders feeding the group must not depend on it.
        feeding = set()
        for n in reversed(span):
            if n in members or n in feeding:
                feeding.update(a for a in n.all_input_nodes if a in set(span))
        bad = [n for n in outsiders if n in after and n in feeding]
        if bad:
            raise OutlineError(f"node {bad[0].name} both depends on and feeds call {name}")
        for n in outsiders:
            if n in after:
                last.append(n)
                last = n
            else:
                first.prepend(n)

    inputs: list[Node] = []
    is_param: list[bool] = []
    sub = Graph()
    env: dict[Node, Node] = {}

    def add_input(a: Node) -> None:
        inputs.append(a)
        is_param.append(a.op == "get_attr")
        env[a] = sub.placeholder(f"in_{len(inputs) - 1}_{a.name}")

    for n in group:
        for a in n.all_input_nodes:
            if a not in env:
                add_input(a)
        env[n] = sub.node_copy(n, lambda a: env[a])
    outputs = [n for n in group if any(u not in members for u in n.users)]
    sub.output(tuple(env[o] for o in outputs) if len(outputs) != 1 else env[outputs[0]])
    sub.lint()
    module = GraphModule(root, sub, class_name=name)
    return Outlined(module, inputs, is_param, outputs)


def graph_nodes_of_call(gm: GraphModule, path: str, call_index: int, meta_key: str) -> list[Node]:
    """Top-level nodes whose module stack contains ``(path, call_index)``, in graph order.

    ``get_attr`` nodes are never part of a call: they are read in the outer graph and passed
    in (fx creates one per attribute, at its first use, and later calls reuse it).
    """
    key = (path, call_index)
    return [
        n for n in gm.graph.nodes
        if n.op != "get_attr" and key in (tuple(e) for e in n.meta.get(meta_key, {}).get("module_stack", ()))
    ]

