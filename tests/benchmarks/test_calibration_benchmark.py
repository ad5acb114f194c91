"""benchmarks/calibration.py on tiny sizes: calibrated vs the smallest single energy."""

from __future__ import annotations

from benchmarks import calibration
from laser_fx.calibration import DEFAULT_ENERGIES


def test_quick_run_compares_calibrated_with_the_smallest_single_energy(tmp_path):
    out = tmp_path / "cal.jsonl"
    rows = calibration.main(["--quick", "--tasks", "sudoku", "--out", str(out)])
    assert [r["step"] for r in rows] == [0, 2]
    assert len(out.read_text().splitlines()) == 2  # written as it goes
    for r in rows:
        assert r["calibration_cosine"] >= r["target"]
        for energies in r["energies"].values():
            assert energies and set(energies.values()) <= set(DEFAULT_ENERGIES)
        single = r["single"]
        # the smallest single energy meets the target on the held-out batches, or is lossless
        assert single["cosine"] >= r["target"] or single["energy"] == DEFAULT_ENERGIES[-1]
        assert r["calibrated"]["stored_bytes"] > 0 and single["stored_bytes"] > 0
