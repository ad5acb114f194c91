"""Command line: ``python -m laser_fx analyze --model MODULE:FACTORY ...``.

``analyze`` builds a model with a factory named by its import path, runs `laser_fx.analyze`
on it and writes a Markdown report, PNG plots and JSON. The factory returns
``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``; it receives
``seed`` and ``batch`` when its signature takes them, and every ``--kw KEY=VALUE``. After the
colon, a dotted path walks attributes, and keys of a mapping: the library's own small models
are ``laser_fx.testing.zoo:ZOO.trm_attn`` (and the other `ZOO` names).

The TRM analysis of the repository (trained checkpoints) is an example script, not part of
the command line: run ``PYTHONPATH=. python examples/analyze_trm.py`` from the repository root.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "load_factory", "main"]

_EXAMPLE = "laser_fx.testing.zoo:ZOO.trm_attn"


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:attr.attr"`` (mapping keys walk like attributes).

    Raises:
        SystemExit: the spec is malformed, the module does not import, or an attribute is missing.
    """
    m = re.fullmatch(r"([\w.]+):([\w.]+)", spec)
    if m is None:
        raise SystemExit(f"--model must look like PACKAGE.MODULE:FACTORY (e.g. {_EXAMPLE}), "
                         f"got {spec!r}.")
    module_name, path = m.groups()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"--model {spec}: cannot import {module_name!r} ({e}); run from the "
                         "directory that holds it, or add it to PYTHONPATH.") from e
    walked = module_name
    for part in path.split("."):
        try:
            obj = obj[part] if isinstance(obj, Mapping) else getattr(obj, part)
        except (KeyError, AttributeError) as e:
            have = sorted(obj) if isinstance(obj, Mapping) else sorted(
                n for n in dir(obj) if not n.startswith("_"))
            raise SystemExit(f"--model {spec}: {walked} has no {part!r}. It has: "
                             f"{', '.join(map(str, have[:30]))}.") from e
        walked = f"{walked}.{part}"
    if not callable(obj):
        raise SystemExit(f"--model {spec} names a {type(obj).__name__}, not a callable factory.")
    return obj


def _keywords(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--kw takes KEY=VALUE (e.g. --kw d=64), got {pair!r}.")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text  # a bare word: a string
    return out


def _build(args: argparse.Namespace) -> tuple[Any, tuple, dict]:
    """Call the factory; returns ``(model, example_inputs, example_kwargs)``."""
    from torch import nn

    factory = load_factory(args.model)
    kwargs = _keywords(args.kw)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in ("seed", "batch"):
        if takes_any or name in params:
            kwargs.setdefault(name, getattr(args, name))
    built = factory(**kwargs)
    if not (isinstance(built, tuple) and len(built) in (2, 3) and isinstance(built[0], nn.Module)):
        raise SystemExit(
            f"--model {args.model} must return (model, example_inputs) or (model, "
            f"example_inputs, example_kwargs), got {type(built).__name__}."
        )
    model, inputs = built[0], built[1]
    example_kwargs = dict(built[2] or {}) if len(built) == 3 else {}
    return model, inputs if isinstance(inputs, tuple) else (inputs,), example_kwargs


def _analyze(args: argparse.Namespace) -> int:
    import torch

    from .analysis import analyze, plot_analysis, write_markdown

    torch.set_num_threads(args.threads)
    model, inputs, example_kwargs = _build(args)
    label = args.label or re.split(r"[:.]", args.model)[-1]
    an = analyze(model, inputs, example_kwargs=example_kwargs or None, label=label,
                 linear_memory=args.linear_memory)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot_analysis(an, out, f"analysis_{label}")
    (out / f"analysis_{label}.json").write_text(json.dumps(an.to_dict()))
    argv = " ".join(["--model", args.model, "--seed", str(args.seed), "--batch", str(args.batch),
                     *(f"--kw {kw}" for kw in args.kw)])
    header = (f"# Analysis of `{args.model}`\n\nReproduce: `python -m laser_fx analyze {argv}`")
    md = write_markdown([an], out / f"analysis_{label}.md", header=header,
                        images={an.model: [p.name for p in pngs]})
    print(md.read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``analyze`` command and its options."""
    p = argparse.ArgumentParser(prog="python -m laser_fx", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser(
        "analyze", help="activation spectra, effective rank, tracking, plots",
        description="Analyse the activations a looped model stores for backward. For the TRM "
        "analysis of the repository's trained checkpoints, run examples/analyze_trm.py instead "
        "(PYTHONPATH=. python examples/analyze_trm.py, from the repository root).")
    a.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="factory returning (model, example_inputs[, example_kwargs]), e.g. "
                   f"{_EXAMPLE} (a small TRM-like model, random init)")
    a.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of the factory (a Python literal); repeatable")
    a.add_argument("--seed", type=int, default=0, help="passed when the factory takes `seed`")
    a.add_argument("--batch", type=int, default=8, help="passed when the factory takes `batch`")
    a.add_argument("--label", default=None, help="name in the report (default: the factory's)")
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--out-dir", type=Path, default=Path("results"))
    a.add_argument("--linear-memory", action="store_true",
                   help="also measure bytes saved with mode='linear' per op site")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--trm" in argv or "--zoo" in argv:
        raise SystemExit(
            "`--trm` and `--zoo` were removed. The TRM analysis is an example script: run "
            "`PYTHONPATH=. python examples/analyze_trm.py` from the repository root. A zoo "
            f"model is a factory path: `python -m laser_fx analyze --model {_EXAMPLE}`."
        )
    args = build_parser().parse_args(argv)
    return _analyze(args)


if __name__ == "__main__":
    raise SystemExit(main())
