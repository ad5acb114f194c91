"""Tests for the command line (laser_fx/__main__.py): ``python -m laser_fx analyze``."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import laser_fx.__main__ as cli
from laser_fx.testing.zoo import ZOO

_ZOO_TRM = "laser_fx.testing.zoo:ZOO.trm_attn"
_TINY = ["--kw", "d=16", "--kw", "seq=8", "--kw", "n=2", "--kw", "heads=2", "--batch", "2"]


# Regression (issue 14): the command line imported examples/ and the test zoo; a model now
# comes from a factory path the user names, so the package's own code imports neither.
def test_command_line_imports_neither_examples_nor_the_zoo() -> None:
    tree = ast.parse(Path(cli.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names]
    assert imported, "the AST walk found the imports"
    assert not [m for m in imported if m.startswith(("examples", "testing", "laser_fx.testing"))]


def test_load_factory_walks_attributes_and_mapping_keys() -> None:
    assert cli.load_factory(_ZOO_TRM) is ZOO["trm_attn"]
    assert cli.load_factory("laser_fx.testing.zoo:TRMLike").__name__ == "TRMLike"


@pytest.mark.parametrize(("spec", "match"), [
    pytest.param("laser_fx.testing.zoo", "must look like PACKAGE.MODULE:FACTORY", id="no-colon"),
    pytest.param("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'", id="no-module"),
    pytest.param("laser_fx.testing.zoo:ZOO.nope", "has no 'nope'. It has: .*trm_attn",
                 id="no-key"),
    pytest.param("laser_fx.testing.zoo:WEIGHT_SHARED", "names a tuple, not a callable",
                 id="not-callable"),
])
def test_bad_model_paths_say_what_is_wrong(spec: str, match: str) -> None:
    with pytest.raises(SystemExit, match=match):
        cli.load_factory(spec)


@pytest.mark.parametrize("flag", ["--trm", "--zoo"])
def test_removed_flags_point_at_the_example_script(flag: str) -> None:
    with pytest.raises(SystemExit, match="examples/analyze_trm.py"):
        cli.main(["analyze", flag])


def test_a_factory_must_return_model_and_inputs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"must return \(model, example_inputs\)"):
        cli.main(["analyze", "--model", "laser_fx.testing.zoo:TRMLike", "--kw", "d=16",
                  "--out-dir", str(tmp_path)])


def test_analyze_writes_report_json_and_plots(tmp_path: Path, capsys) -> None:
    assert cli.main(["analyze", "--model", _ZOO_TRM, *_TINY, "--out-dir", str(tmp_path)]) == 0
    report = (tmp_path / "analysis_trm_attn.md").read_text()
    assert f"python -m laser_fx analyze --model {_ZOO_TRM}" in report  # how to reproduce
    assert "--kw d=16" in report and report in capsys.readouterr().out
    data = json.loads((tmp_path / "analysis_trm_attn.json").read_text())
    sites = {s["site"] for s in data["sites"]}
    assert "net" in sites and "net.blocks.0.mlp.up" in sites  # the block and a shared linear
    # memory at the default config: granularity "auto" checkpoints `net` per layer
    assert sorted(data["memory"]) == ["net.blocks.0", "net.blocks.1"]
    for m in data["memory"].values():
        assert m["stored_bytes"] < m["dense_bytes"], m
    assert len(list(tmp_path.glob("analysis_trm_attn_*.png"))) == 4
