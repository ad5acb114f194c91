"""benchmarks/tracker_share.py, its tables (benchmarks/_share_report.py) and its probe
(benchmarks/_tracker_probe.py: tracker time counted once and split by phase, host reads
inside tracker methods only, compress shapes recorded, refinements sorted by call), and the
script end to end on a tiny TRM (D=32, one mode, one measured step). Step times on a shared
box are not checked, only their relations."""

from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch

from benchmarks import _share_report, _tracker_probe, tracker_share
from laser_fx import LaserConfig
from laser_fx._basis import BasisUpdates
from laser_fx._decisions import LateDecisions
from laser_fx.testing import deferred_refinements
from laser_fx.tracker import SubspaceTracker


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracker_share") / "share.md"
    rows = tracker_share.main(["--modes", "region", "--d", "32", "--n", "2", "--T", "2",
                               "--batch", "2", "--steps", "1", "--warmup", "1",
                               "--ideal-reps", "2", "--config", "oversample=2",
                               "--per-site", "--phases", "--out", str(out)])
    return rows, out


def test_table_has_the_columns_and_sane_values(run):
    rows, out = run
    (row,) = rows
    assert (row["mode"], row["D"], row["steps"]) == ("region", 32, 1)
    table = _share_report.markdown_table(rows)
    header = table.splitlines()[0]
    assert all(col in header for col in _share_report.COLUMNS), header
    assert 0.0 < row["tracker_share"] < 1.0, row
    assert 0.0 < row["tracker_ms"] <= row["step_ms"], row
    assert row["ideal_ms"] >= 0.0 and row["calls"] > 0, row
    assert row["resets"] >= 0 and row["power_updates"] >= 0, row
    # every refinement is a decision that found the basis short, about some call
    assert row["first_refines"] + row["later_refines"] <= row["calls"], row
    assert 0 <= row["host_reads"] <= row["all_reads"], row
    assert row["ratio"] is None or row["ratio"] > 0, row
    assert table in out.read_text() and "LaserConfig(oversample=2)" in out.read_text()
    (rec,) = [json.loads(ln) for ln in out.with_suffix(".jsonl").read_text().splitlines()]
    assert rec["script"] == "tracker_share" and rec["mode"] == "region"


def test_per_site_rows_add_up_to_the_mode(run):
    rows, out = run
    (row,) = rows
    sites = row["sites"]
    assert sites and all(s["site"].startswith("net:") and "@" in s["site"] for s in sites)
    # every call and power update of the step belongs to one tracker, and so does its time
    assert sum(s["calls"] for s in sites) == pytest.approx(row["calls"])
    assert sum(s["power_updates"] for s in sites) == pytest.approx(row["power_updates"])
    assert sum(s["share"] for s in sites) == pytest.approx(1.0)
    assert [s["ms"] for s in sites] == sorted((s["ms"] for s in sites), reverse=True)
    assert all(0 < s["rank"] <= s["width"] for s in sites if s["calls"] > 0), sites
    assert _share_report.site_table(sites) in out.read_text()
    roles = _share_report.role_table(sites).splitlines()[2:]
    assert roles and _share_report.role_table(sites) in out.read_text()
    # the roles partition the trackers: their shares add up to the whole
    assert sum(float(line.split("|")[-2].strip().rstrip("%")) for line in roles) == (
        pytest.approx(100.0, abs=0.1 * len(roles)))


def test_a_steps_counters_are_the_per_tracker_deltas_summed():
    # a tracker made during the step counts from 0; one gone since is not counted
    before = {1: {"calls": 5, "resets": 1, "power_updates": 2},
              2: {"calls": 9, "resets": 0, "power_updates": 4}}
    after = {1: {"calls": 8, "resets": 1, "power_updates": 3},
             3: {"calls": 2, "resets": 1, "power_updates": 0}}
    per = tracker_share._per_tracker(before, after, {1: 0.5})
    assert per == {1: {"s": 0.5, "calls": 3, "resets": 0, "power_updates": 1},
                   3: {"s": 0.0, "calls": 2, "resets": 1, "power_updates": 0}}
    assert tracker_share._summed(per) == {"resets": 1, "power_updates": 1}


def test_phases_add_up_to_the_tracker_time(run):
    rows, out = run
    (row,) = rows
    phases = row["phases_ms"]
    assert set(phases) == {*_tracker_probe.PHASES, "other"}
    # region mode projects, reconstructs for backward and refines (random init: every call)
    assert all(phases[p] > 0 for p in ("projection", "reconstruction", "refinement")), phases
    # one measured step: the mean is that step's tracker time, which the phases partition
    assert sum(phases.values()) == pytest.approx(row["tracker_ms"], rel=0.02)
    assert _share_report.phase_table(rows) in out.read_text()


def _fake_clock(monkeypatch):
    """A clock that moves only when told (``now[0] += s``), for the wall clock and for
    CUDA events alike; returns ``now`` and the list of synchronisations."""
    now, syncs = [0.0], []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.at = None

        def record(self) -> None:
            self.at = now[0]

        def elapsed_time(self, end: Event) -> float:  # milliseconds, as torch's
            return 1e3 * (end.at - self.at)

    monkeypatch.setattr(_tracker_probe.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(_tracker_probe.torch.cuda, "Event", Event)
    monkeypatch.setattr(_tracker_probe.torch.cuda, "synchronize", lambda: syncs.append(now[0]))
    return now, syncs


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_probe_counts_each_moment_in_the_innermost_phase(monkeypatch, device):
    now, _ = _fake_clock(monkeypatch)

    def refine(self, xc, total):
        now[0] += 2.0

    def decompress(self, p):  # a reconstruction that takes an open decision first
        now[0] += 1.0
        self._refine(None, 0.0)
        now[0] += 0.5

    def settle(self):
        now[0] += 0.25
        self.decompress(None)

    monkeypatch.setattr(BasisUpdates, "_refine", refine)
    monkeypatch.setattr(SubspaceTracker, "decompress", decompress)
    monkeypatch.setattr(SubspaceTracker, "settle", settle)
    trk = SubspaceTracker(4, LaserConfig())
    probe = _tracker_probe.TrackerProbe(device, phases=True)
    with probe:
        trk.settle()
        now[0] += 10.0  # outside the trackers: in no phase
        trk.decompress(None)
    assert probe.phases == {"projection": 0.0, "reconstruction": 3.0, "refinement": 4.0,
                            "other": 0.25}
    assert probe.seconds == 7.25  # the phases partition the tracker time
    assert probe.phases["refinement"] == 4.0  # read again: nothing counted twice
    probe.begin()
    assert sum(probe.phases.values()) == 0.0
    assert "_refine" in BasisUpdates.__dict__ and BasisUpdates._refine is refine  # restored


def test_probe_counts_host_reads_inside_tracker_methods_only(monkeypatch):
    t = torch.tensor(1.5)

    def reads_four(self, p):
        float(t), int(t), t.item(), bool(t)
        return p

    monkeypatch.setattr(SubspaceTracker, "decompress", reads_four)
    probe = _tracker_probe.TrackerProbe()
    with probe:
        float(t)  # outside any tracker method: the step's count only
        SubspaceTracker(4, LaserConfig()).decompress(None)
    assert (probe.host_reads, probe.all_reads, probe.calls["decompress"]) == (4, 5, 1)
    assert SubspaceTracker.decompress is reads_four  # the class got its method back
    assert float(t) == 1.5 and "__float__" not in torch.Tensor.__dict__


def test_probe_times_nested_calls_once_and_wraps_settle(monkeypatch):
    # a fake clock that moves only inside the tracker methods: 1 s in each
    now = [0.0]
    monkeypatch.setattr(_tracker_probe.time, "perf_counter", lambda: now[0])

    def settle(self):  # arrives with the tracker rewrite: wrapped when the class has it
        now[0] += 1.0
        return self.decompress(None)

    def decompress(self, p):
        now[0] += 1.0

    monkeypatch.setattr(SubspaceTracker, "settle", settle, raising=False)
    monkeypatch.setattr(SubspaceTracker, "decompress", decompress)
    probe = _tracker_probe.TrackerProbe()
    first, other = SubspaceTracker(4, LaserConfig()), SubspaceTracker(4, LaserConfig())
    with probe:
        first.settle()
    assert probe.seconds == 2.0  # 3.0 would count the nested decompress twice
    assert dict(probe.calls) == {"settle": 1}
    with probe:
        other.decompress(None)
    assert probe.by_tracker == {id(first): 2.0, id(other): 1.0}


def test_probe_records_compress_shapes():
    trk = SubspaceTracker(16, LaserConfig(rank=3))
    x = torch.randn(4, 50, 16)
    with _tracker_probe.TrackerProbe() as probe:
        packed = trk.compress(x)
    if packed.coeffs is None:  # stored dense
        assert (probe.shapes, probe.dense) == ([], 1)
    else:
        assert probe.shapes == [(200, 16, packed.basis.shape[1])]
    cost = tracker_share.ideal_seconds([(200, 16, 3)] * 2, reps=2)
    assert list(cost) == [(200, 16, 3)] and cost[(200, 16, 3)] > 0


@pytest.mark.parametrize("slow", ["matmul", "skinny"])
def test_ideal_is_the_faster_layout_of_the_projection(monkeypatch, slow):
    # each layout is timed and the faster kept: slowing one down must not move the ideal
    def slowed(fn):
        def run(a, b):
            time.sleep(0.01)
            return fn(a, b)
        return run

    if slow == "matmul":
        monkeypatch.setattr(tracker_share.torch, "matmul", slowed(torch.matmul))
    else:
        monkeypatch.setattr(tracker_share, "skinny", slowed(tracker_share.skinny))
    cost = tracker_share.ideal_seconds([(64, 16, 3)], reps=3)[(64, 16, 3)]
    assert 0 < cost < 0.005


def _in_span(seed: int, width: int = 32, rank: int = 4) -> torch.Tensor:
    """Activations (rows, width) spanning `rank` random directions of their own."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(width, rank, generator=g)).Q
    return torch.randn(256, rank, generator=g) @ q.T


def test_probe_sorts_refinements_by_first_and_later_call_of_the_step():
    original = LateDecisions._decide
    trk = SubspaceTracker(32, LaserConfig())
    trk.compress(_in_span(0))
    trk.settle()  # a basis for subspace 0
    probe = _tracker_probe.TrackerProbe()
    with probe:
        trk.compress(_in_span(1))  # first call of the "step": another subspace
        trk.compress(_in_span(1))  # decides the first call: refined; this one fits
        trk.compress(_in_span(2))  # decides the second: no refinement
        trk.settle()  # decides the third (a later call): refined
        assert (probe.first_refines, probe.later_refines) == (1, 1)
        probe.begin()  # the next step: the tracker's next decision is a first one again
        trk.compress(_in_span(3))
        trk.settle()
        assert (probe.first_refines, probe.later_refines) == (1, 0)
        trk.compress(_in_span(3))
        trk.settle()
    assert (probe.first_refines, probe.later_refines) == (1, 0)
    assert trk.revisions == 3
    assert LateDecisions._decide is original  # the mixin got its method back


def test_config_fields_parse_and_bad_ones_are_refused():
    assert tracker_share.config_fields(["energy=0.99", "oversample=0", "max_rank=None"]) == {
        "energy": 0.99, "oversample": 0, "max_rank": None}
    for bad in (["energy"], ["=3"], ["mode=linear"]):
        with pytest.raises(ValueError):
            tracker_share.config_fields(bad)
    with pytest.raises(SystemExit):  # an unknown field or a bad value: argparse's error
        tracker_share._parse(["--config", "no_such_field=1"])
    with pytest.raises(SystemExit):
        tracker_share._parse(["--config", "energy=2.0"])
    assert tracker_share._parse(["--config", "oversample=0"]).config_kw == {"oversample": 0}


def test_probe_times_cuda_calls_with_events_and_no_synchronisation(monkeypatch):
    # a fake CUDA: each event is stamped by a clock that the tracker methods move, and any
    # synchronisation inside a timed call would be seen
    now, syncs = _fake_clock(monkeypatch)

    def decompress(self, p):
        now[0] += 0.25

    monkeypatch.setattr(SubspaceTracker, "decompress", decompress)
    probe = _tracker_probe.TrackerProbe("cuda")
    trk = SubspaceTracker(4, LaserConfig())
    with probe:
        trk.decompress(None)
        now[0] += 10.0  # outside the trackers: not counted
        trk.decompress(None)
    assert syncs == []  # nothing waited around the calls
    assert probe.seconds == 0.5 and syncs == [10.5]  # read: one wait, then the events
    assert probe.seconds == 0.5 and len(syncs) == 1  # read again: nothing left to wait for
    assert probe.by_tracker == {id(trk): 0.5}
    probe.begin()
    assert probe.seconds == 0.0


def _turning_subspace():
    """Six calls of a rank-4 subspace turning by a column each: every decision refines."""
    g = torch.Generator().manual_seed(0)
    v = torch.linalg.qr(torch.randn(64, 64, generator=g)).Q
    for i in range(6):
        yield torch.randn(256, 4, generator=g) @ v[:, i:i + 4].T


@pytest.mark.parametrize("defer", [False, True])
def test_probe_counts_bases_built_at_once_not_queued_refinements(defer):
    # at once: the first basis and every refinement read values back; on the accelerator's
    # path (forced) the refinements queue their power iteration and take their Ritz step
    # later, the forward's last one included (`end_forward`, then `settle`): only the first
    # basis is built at once
    tracker = SubspaceTracker(64, LaserConfig(energy=0.99, min_numel=0))
    probe = _tracker_probe.TrackerProbe()
    with probe, deferred_refinements() if defer else contextlib.nullcontext():
        for x in _turning_subspace():
            tracker.compress(x)
        tracker.end_forward()
        tracker.settle()
    assert tracker.revisions == tracker.power_updates == 5 and tracker.resets == 1
    assert probe.at_once == (1 if defer else 1 + tracker.revisions)
    assert probe.calls["end_forward"] == 1  # timed as the other tracker methods
    assert "_refine" not in SubspaceTracker.__dict__  # the mixin's method is back in place
