"""Analysis pass: find weight-shared (looped) sites.

A site is a parameterized op (linear, ``X @ W`` with a parameter on the right, conv) whose
parameter is applied two or more times by the same module: a recursion. ``W @ X`` is not a
site: the ``X`` it saves has the parameter's width on its first axis, and trackers compress
along the last one. Each application is a `Use`, in execution order (the recursion step).
Modules called two or more times whose
ancestors are not (the shared block of a looped model, e.g. TRM's ``net``) are reported as
``kind="module"`` sites, so that whole-block mechanisms can select them.

The pass reads ``node.meta["laser_fx"]`` written by `laser_fx.tracing.annotate` (module stack
with call indices, grad mode) and writes ``node.meta["laser_fx"]["site"]`` /
``["use_index"]`` on each use. Graphs captured by ``torch.export`` keep no-grad regions as
``wrap_with_set_grad_enabled`` submodules whose parameters arrive as placeholders; the walk
maps those back to the parameters they are bound to.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from . import META_KEY, PassResult

__all__ = ["Site", "Use", "find_sites_pass", "iter_nodes"]

_aten = torch.ops.aten
_LINEAR = {F.linear, _aten.linear.default}
_MATMUL = {torch.matmul, operator.matmul, torch.mm, _aten.matmul.default, _aten.mm.default}
_CONV = {
    F.conv1d, F.conv2d, F.conv3d,
    _aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
}
_WRAP_GRAD = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
_BOOKKEEPING = {operator.getitem, torch._C._set_grad_enabled, torch.is_grad_enabled, _WRAP_GRAD}


@dataclass(frozen=True)
class Use:
    """One application of a site: one recursion step.

    Attributes:
        step: position among the site's uses, in execution order.
        node: name of the graph node (``graph_path/node`` for nodes inside submodules).
        grad_enabled: whether the use runs with grad enabled (only those store activations).
        call_index: call index of the owning module (``net@3`` -> 3), or -1.
        shape: activation shape, when example inputs were given.
        nbytes: activation bytes, when example inputs were given.
    """

    step: int
    node: str
    grad_enabled: bool
    call_index: int = -1
    shape: tuple[int, ...] | None = None
    nbytes: int | None = None


@dataclass(frozen=True)
class Site:
    """A weight-shared site.

    Attributes:
        name: module path of the op's parameter (``net.blocks.0.mlp.gate``) or of the module.
        kind: ``"linear"``, ``"matmul"``, ``"conv"`` or ``"module"``.
        width: feature width of the activation the op stores (in_features / in_channels);
            for a module site, the largest width of the op sites inside it.
        uses: every application, in execution order.
        param: qualified name of the parameter (None for module sites).
        widths: for a module site, the feature widths of the op sites inside it.
        block: name of the enclosing module site, if any.
    """

    name: str
    kind: str
    width: int
    uses: tuple[Use, ...]
    param: str | None = None
    widths: tuple[int, ...] = ()
    block: str | None = None

    @property
    def num_uses(self) -> int:
        return len(self.uses)

    @property
    def grad_uses(self) -> int:
        return sum(u.grad_enabled for u in self.uses)

    @property
    def nograd_uses(self) -> int:
        return len(self.uses) - self.grad_uses

    @property
    def activation_bytes(self) -> int | None:
        """Bytes of the activations of grad-enabled uses (None without example inputs)."""
        sizes = [u.nbytes for u in self.uses if u.grad_enabled]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]

    def __str__(self) -> str:
        return (
            f"{self.name} ({self.kind}, width {self.width}): {self.num_uses} uses, "
            f"{self.grad_uses} with grad"
        )


@dataclass
class _Found:
    param: str
    kind: str
    width: int
    owner: str
    uses: list[tuple[str, Node]] = field(default_factory=list)


def iter_nodes(gm: GraphModule, prefix: str = "") -> Iterator[tuple[str, Node, dict[Node, Node]]]:
    """Yield ``(qualified node name, node, binding)`` over ``gm`` and its grad-mode submodules.

    ``binding`` maps placeholders of a ``wrap_with_set_grad_enabled`` submodule to the outer
    nodes they are bound to, so a parameter passed into a no-grad region is recognised.
    """
    yield from _walk(gm, prefix, {})


def _walk(gm: GraphModule, prefix: str, binding: dict[Node, Node]):
    for node in list(gm.graph.nodes):
        yield f"{prefix}{node.name}", node, binding
        if _WRAP_GRAD is not None and node.op == "call_function" and node.target is _WRAP_GRAD:
            sub_node = node.args[1]
            sub = getattr(gm, sub_node.target)
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            inner = {p: _resolve(a, binding) for p, a in zip(placeholders, node.args[2:])}
            yield from _walk(sub, f"{prefix}{sub_node.target}/", inner)


def _resolve(arg: object, binding: dict[Node, Node]) -> object:
    while isinstance(arg, Node) and arg in binding:
        arg = binding[arg]
    return arg


def _param_of(root: GraphModule, arg: object, binding: dict[Node, Node]) -> str | None:
    arg = _resolve(arg, binding)
    if isinstance(arg, Node) and arg.op == "get_attr":
        try:
            p = root.get_parameter(arg.target)
        except AttributeError:
            return None
        return arg.target if p.ndim >= 2 else None
    return None


def _classify(root: GraphModule, node: Node, binding) -> tuple[str, str, int] | None:
    """``(param, kind, width)`` when ``node`` applies a parameter, else None."""
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        if isinstance(mod, nn.Linear):
            return f"{node.target}.weight", "linear", mod.in_features
        if isinstance(mod, nn.modules.conv._ConvNd):
            return f"{node.target}.weight", "conv", mod.in_channels
        return None
    if node.op not in ("call_function", "call_method") or len(node.args) < 2:
        return None
    target = node.target
    if target in _LINEAR or target in _CONV:
        param = _param_of(root, node.args[1], binding)
        if param is None:
            return None
        w = root.get_parameter(param)
        if target in _LINEAR:
            return param, "linear", w.shape[1]
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        return param, "conv", w.shape[1] * int(groups)
    if target in _MATMUL or (node.op == "call_method" and target == "matmul"):
        # Only X @ W stores X along the parameter's input width; W @ X is left alone.
        param = _param_of(root, node.args[1], binding)
        if param is None:
            return None
        return param, "matmul", root.get_parameter(param).shape[0]
    return None


def _meta(node: Node) -> dict:
    return node.meta.setdefault(META_KEY, {})


def _owner(param: str) -> str:
    return param[: -len(".weight")] if param.endswith(".weight") else param


def _shape_of(node: object) -> tuple[tuple[int, ...], int] | None:
    if not isinstance(node, Node):
        return None
    # tensor_meta is recorded from the example inputs (concrete); export's val may be symbolic
    val = node.meta.get("tensor_meta", node.meta.get("val"))
    shape = getattr(val, "shape", None)
    dtype = getattr(val, "dtype", None)
    if shape is None or dtype is None:
        return None
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None
    numel = 1
    for s in shape:
        numel *= s
    return shape, numel * torch.empty((), dtype=dtype).element_size()


def find_sites_pass(gm: GraphModule) -> PassResult:
    """Find the weight-shared sites of an annotated graph module.

    Returns:
        ``PassResult(gm, modified=False, record=list[Site])``; op sites first (in order of
        first use), then module sites.
    """
    found: dict[tuple[str, str], _Found] = {}
    calls: dict[str, dict[int, bool]] = {}  # module path -> call index -> any grad
    for qname, node, binding in iter_nodes(gm):
        meta = node.meta.get(META_KEY, {})
        grad = bool(meta.get("grad_enabled", True))
        # Bookkeeping nodes say nothing about a call's grad mode: export's getitem that
        # unpacks a no-grad region's outputs runs with grad on but copies a module stack
        # from inside the region, and a grad-mode switch is tagged with the mode after it.
        counts = node.op in ("call_function", "call_method", "call_module") and not (
            node.target in _BOOKKEEPING
        )
        for path, idx in meta.get("module_stack", ()):
            if path:
                seen = calls.setdefault(path, {})
                seen[idx] = seen.get(idx, False) or (grad and counts)
        hit = _classify(gm, node, binding)
        if hit is None:
            continue
        param, kind, width = hit
        stack = meta.get("module_stack", ())
        # Group by (parameter, applying module): a matrix tied between two different modules
        # (embedding and lm_head) is two single-use groups, not a recursion.
        owner = stack[-1][0] if stack else _owner(param)
        entry = found.setdefault((param, owner), _Found(param, kind, int(width), owner))
        entry.uses.append((qname, node))

    shared_modules = [p for p, idx in calls.items() if len(idx) >= 2]
    blocks = [
        p for p in shared_modules
        if not any(p.startswith(q + ".") for q in shared_modules if q != p)
    ]
    names: dict[str, int] = {}
    sites: list[Site] = []
    for f in found.values():
        if len(f.uses) < 2:
            continue  # applied once (or tied to another op): not a recursion
        name = _owner(f.param)
        names[name] = names.get(name, 0) + 1
        if names[name] > 1:
            name = f"{name}@{f.owner}"
        uses = []
        for step, (qname, node) in enumerate(f.uses):
            meta = _meta(node)
            meta["site"], meta["use_index"] = name, step
            stack = meta.get("module_stack", ())
            sb = _shape_of(node.args[0])
            uses.append(Use(
                step=step,
                node=qname,
                grad_enabled=bool(meta.get("grad_enabled", True)),
                call_index=stack[-1][1] if stack else -1,
                shape=sb[0] if sb else None,
                nbytes=sb[1] if sb else None,
            ))
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        sites.append(Site(name, f.kind, f.width, tuple(uses), param=f.param, block=block))

    for b in blocks:
        inner = [s for s in sites if s.block == b]
        if not inner:
            continue  # a parameter-free module called twice is nothing to compress
        widths = tuple(sorted({s.width for s in inner}))
        uses = tuple(
            Use(step=i, node=f"{b}@{idx}", grad_enabled=g, call_index=idx)
            for i, (idx, g) in enumerate(sorted(calls[b].items()))
        )
        sites.append(Site(b, "module", max(widths), uses, widths=widths))
    return PassResult(gm, modified=False, record=sites)
