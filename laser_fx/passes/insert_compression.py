"""Rewrite pass: route each chosen site's grad-enabled uses through its site module.

* linear sites: each use node (``call_module`` of an ``nn.Linear``, ``F.linear``/
  ``aten.linear``, ``X @ W``) becomes ``self.laser_fx.sites.<site>(x, weight, bias)``;
* block sites: the nodes of each grad-enabled call (``net@3``) are outlined into a graph
  module of their own and replaced by ``self.laser_fx.sites.<site>(3, *inputs)``.

Uses inside no-grad submodules of exported graphs are left alone: they store nothing.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule, Node

from ..modules import BlockSite, LaserState, LinearSite, site_key
from . import META_KEY, PassResult
from .find_sites import Site
from .outline import OutlineError, graph_nodes_of_call, outline_call
from .plan import Plan

__all__ = ["STATE_NAME", "insert_compression"]

#: attribute of the compressed module that holds the `LaserState`
STATE_NAME = "laser_fx"


def insert_compression(gm: GraphModule, plan: Plan) -> PassResult:
    """Add the `LaserState` and rewrite the uses of every site in ``plan.chosen``."""
    if hasattr(gm, STATE_NAME):
        return PassResult(gm, modified=False, record=plan)
    state = LaserState()
    gm.add_module(STATE_NAME, state)
    anchor = _hoist_get_attrs(gm)
    with gm.graph.inserting_after(anchor):
        gm.graph.call_module(STATE_NAME)
    for name, (site, mechanism, cfg) in plan.chosen.items():
        target = f"{STATE_NAME}.sites.{site_key(name)}"
        if mechanism == "linear":
            state.sites[site_key(name)] = LinearSite(site, cfg)
            done = _rewrite_linear(gm, site, target)
        else:
            module = BlockSite(site, mechanism, cfg)
            state.sites[site_key(name)] = module
            done = _rewrite_block(gm, site, module, target, plan)
        if not done:
            del state.sites[site_key(name)]
            plan.skipped[name] = "no grad-enabled use in the top-level graph"
    for name in plan.skipped:
        plan.chosen.pop(name, None)
    device = next((t.device for t in (*gm.parameters(), *gm.buffers()) if t.device.type != "meta"),
                  None)
    if device is not None:  # trackers live where the model does (a model on a GPU, say)
        state.to(device)
    for n in list(gm.graph.nodes):  # get_attr nodes whose only users were outlined
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    return PassResult(gm, modified=True, record=plan)


def _hoist_get_attrs(gm: GraphModule) -> Node:
    """Move every ``get_attr`` right after the placeholders (reads have no side effects), so
    that no call of a block owns one that a later call also reads. Returns the last moved
    node (or the last placeholder)."""
    nodes = list(gm.graph.nodes)
    anchor = next((n for n in nodes if n.op != "placeholder"), None)
    last = None
    for n in nodes:
        if n.op == "get_attr" and anchor is not None:
            anchor.prepend(n)
            last = n
    return last or [n for n in nodes if n.op == "placeholder"][-1]


def _rewrite_linear(gm: GraphModule, site: Site, target: str) -> int:
    nodes = {n.name: n for n in gm.graph.nodes}
    done = 0
    for use in site.uses:
        node = nodes.get(use.node)
        if node is None or not use.grad_enabled:
            continue  # inside a no-grad submodule, or stores nothing
        graph = gm.graph
        with graph.inserting_before(node):
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                w = graph.get_attr(f"{node.target}.weight")
                b = graph.get_attr(f"{node.target}.bias") if getattr(mod, "bias", None) is not None else None
                args = (node.args[0], w, b)
            else:
                args = (node.args[0], node.args[1], _bias_arg(node))
            new = graph.call_module(target, args)
        new.meta = dict(node.meta)
        new.meta.setdefault(META_KEY, {})["compressed"] = "linear"
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done += 1
    return done


def _bias_arg(node: Node):
    if len(node.args) > 2:
        return node.args[2]
    return node.kwargs.get("bias")


def _rewrite_block(gm: GraphModule, site: Site, module: BlockSite, target: str, plan: Plan) -> int:
    done = 0
    for use in site.uses:
        if not use.grad_enabled:
            continue
        group = graph_nodes_of_call(gm, site.name, use.call_index, META_KEY)
        if not group:
            continue
        try:
            out = outline_call(gm, group, f"{site_key(site.name)}_call{use.call_index}")
        except OutlineError as e:
            plan.skipped[f"{site.name}@{use.call_index}"] = f"not outlined: {e}"
            continue
        members = set(group)
        graph = gm.graph
        first = next(n for n in graph.nodes if n in members)
        with graph.inserting_before(first):
            new = graph.call_module(target, (use.call_index, *out.inputs))
        new.meta[META_KEY] = {"site": site.name, "use_index": use.step, "compressed": module.mechanism}
        if len(out.outputs) == 1:
            out.outputs[0].replace_all_uses_with(new, delete_user_cb=lambda u: u not in members)
        else:
            for i, o in enumerate(out.outputs):
                with graph.inserting_after(new):
                    item = graph.call_function(operator.getitem, (new, i))
                o.replace_all_uses_with(item, delete_user_cb=lambda u: u not in members)
        for n in reversed(group):
            graph.erase_node(n)
        module.add_call(use.call_index, out.module, out.is_param)
        done += 1
    return done

