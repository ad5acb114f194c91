"""Command line: ``python -m laser_fx analyze ...``.

``analyze --zoo NAME`` analyses a model of `laser_fx.testing.zoo` (random init) and writes a
Markdown report, PNG plots and JSON; ``analyze --trm [options]`` runs the TRM analysis of the
repository's ``examples/analyze_trm.py`` (run from the repository root).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _analyze_zoo(args: argparse.Namespace) -> int:
    import torch

    from .analysis import analyze, plot_analysis, write_markdown
    from .testing.zoo import ZOO

    torch.set_num_threads(args.threads)
    model, inputs = ZOO[args.zoo](seed=args.seed, batch=args.batch)
    an = analyze(model, inputs, label=args.zoo, linear_memory=args.linear_memory)
    out = args.out_dir
    pngs = plot_analysis(an, out, f"analysis_{args.zoo}")
    (out / f"analysis_{args.zoo}.json").write_text(json.dumps(an.to_dict()))
    header = (f"# Analysis of zoo model `{args.zoo}` (random init)\n\nReproduce: "
              f"`python -m laser_fx analyze --zoo {args.zoo} --seed {args.seed} --batch {args.batch}`")
    md = write_markdown([an], out / f"analysis_{args.zoo}.md", header=header,
                        images={an.model: [p.name for p in pngs]})
    print(md.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``analyze`` options and run the analysis."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["analyze", "--trm"]:
        try:
            from examples.analyze_trm import main as trm_main
        except ImportError as e:
            raise SystemExit(
                f"`--trm` runs examples/analyze_trm.py, which is not importable here ({e}); "
                "run from the repository root with PYTHONPATH=."
            ) from e
        return trm_main(argv[2:])
    p = argparse.ArgumentParser(prog="python -m laser_fx", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="activation spectra, effective rank, tracking, plots")
    a.add_argument("--trm", action="store_true",
                   help="the TRM analysis (examples/analyze_trm.py; its options follow)")
    from .testing.zoo import ZOO

    a.add_argument("--zoo", choices=sorted(ZOO), default="trm_attn",
                   help="zoo model to analyse (random init)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--batch", type=int, default=8)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--out-dir", type=Path, default=Path("results"))
    a.add_argument("--linear-memory", action="store_true",
                   help="also measure bytes saved with mode='linear' per op site")
    args = p.parse_args(argv)
    return _analyze_zoo(args)


if __name__ == "__main__":
    raise SystemExit(main())
