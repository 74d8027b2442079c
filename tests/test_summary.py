"""RunSummary and the O(runs) table: summaries agree with the event files, or are not used.

Runs are written by real RunWriters (in child processes for the sweep, one of them
SIGKILLed mid-logging) and read back both ways: from summaries (falling back to the
events where a summary is missing or stale) and from the events alone, with
TensorBoard's EventAccumulator.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from tbx_lightning import _fs, cli
from tbx_lightning._summary import SUMMARY_FILE, RunSummary, TagStats, read_summary
from tbx_lightning.cli import _table
from tbx_lightning.hparams import RunHParams
from tests.scripts.summary_run import metrics, wired_writer

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "scripts" / "summary_run.py"


def _write_run(log_dir: Path, lr: float, steps: int, *, status: str = "success") -> RunSummary:
    run, summary = wired_writer(str(log_dir), flush_secs=3600)
    hp = RunHParams(run)
    hp.log({"model": {"lr": lr}, "seed": 0})
    for step in range(steps):
        run.log_scalars(metrics(step, lr), step)
        if step % 40 == 39:
            run.flush()
    hp.finish(status)
    run.close()
    return summary


def _tables(root: Path) -> tuple[list[_table.RunRecord], list[_table.RunRecord]]:
    return _table.read_runs(root), _table.read_runs(root, summaries=False)


def _assert_same_table(fast: list[_table.RunRecord], slow: list[_table.RunRecord]) -> None:
    for kwargs in ({}, {"all_keys": True, "metrics": ["*"]}, {"sort": "val/loss"}):
        a = _table.table_rows(fast, **kwargs)
        b = _table.table_rows(slow, **kwargs)
        for fmt in _table.FORMATS:
            assert _table.render(*a, fmt) == _table.render(*b, fmt)


# ------------------------------------------------------------------------ the summary itself
def test_summary_matches_the_events_tensorboard_reads(tmp_path: Path) -> None:
    summary = _write_run(tmp_path / "run", 0.5, 130)
    saved = read_summary(*_fs.resolve(tmp_path / "run"))
    assert saved is not None
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={SCALARS: 0})
    acc.Reload()
    assert (
        set(saved.tags)
        == set(acc.Tags()["scalars"])
        == {"train/loss", "val/acc", "val/loss", "big"}
    )
    for tag, stats in saved.tags.items():
        values = [e.value for e in acc.Scalars(tag)]
        expected = TagStats.of(values)
        assert stats.count == expected.count == 130
        assert stats.min == expected.min and stats.max == expected.max
        assert stats.last == expected.last or (math.isnan(stats.last) and math.isnan(expected.last))
    # float32 like the event file: 1e39 is +inf there, so not finite and not the max.
    assert saved.tags["big"].max == 129.0
    assert saved.tags["val/loss"].count == 130  # NaNs counted, not taken for min/max
    event_file = next(p for p in (tmp_path / "run").iterdir() if p.name.startswith("events.out"))
    assert saved.files == ((event_file.name, event_file.stat().st_size),)
    assert saved.first_time is not None and saved.last_time is not None
    assert saved.first_time <= saved.last_time
    # Standard JSON: no NaN/Infinity literals.
    text = (tmp_path / "run" / SUMMARY_FILE).read_text(encoding="utf-8")
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert summary.save() is True  # nothing changed: no rewrite, still fine


def test_save_failure_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x", encoding="utf-8")
    fs, path = _fs.resolve(not_a_dir)
    summary = RunSummary(fs, path)
    summary.add(0, 1.0, ("a",), [1.0])
    with caplog.at_level(logging.WARNING, logger="tbx_lightning._summary"):
        assert summary.save() is False
        assert summary.save() is False
    warnings = [r for r in caplog.records if "Could not write" in r.getMessage()]
    assert len(warnings) == 1 and "reads this run's event files instead" in warnings[0].getMessage()


def test_stale_missing_or_broken_summaries_fall_back_to_the_events(tmp_path: Path) -> None:
    _write_run(tmp_path / "fresh", 0.1, 60)
    _write_run(tmp_path / "grown", 0.2, 60)
    _write_run(tmp_path / "broken", 0.3, 60)
    _write_run(tmp_path / "gone", 0.4, 60)
    event_file = next(p for p in (tmp_path / "grown").iterdir() if p.name.startswith("events.out"))
    # Points appended after the summary was saved (a writer killed before its next save).
    with open(event_file, "ab") as handle:
        from tbx_lightning._events import ScalarEncoder

        handle.write(ScalarEncoder().encode(999, time.time(), ("val/acc",), [7.0]))
    (tmp_path / "broken" / SUMMARY_FILE).write_text("{not json", encoding="utf-8")
    (tmp_path / "gone" / SUMMARY_FILE).unlink()
    fast, slow = _tables(tmp_path)
    sources = {r.run: r.source for r in fast}
    assert sources == {"fresh": "summary", "grown": "events", "broken": "events", "gone": "events"}
    grown = next(r for r in fast if r.run == "grown")
    assert grown.stats["val/acc"].last == 7.0 and grown.stats["val/acc"].max == 7.0
    _assert_same_table(fast, slow)


def test_resumed_run_carries_its_summary_on_unless_purged(tmp_path: Path) -> None:
    _write_run(tmp_path / "run", 0.1, 50)
    time.sleep(1.1)  # the second event file's name (its timestamp) sorts after the first
    run, _ = wired_writer(str(tmp_path / "run"), flush_secs=3600)
    for step in range(50, 80):
        run.log_scalars({"val/acc": 0.5 + step / 1000}, step)
    run.close()
    fast, slow = _tables(tmp_path)
    assert fast[0].source == "summary"
    assert fast[0].stats["val/acc"].count == 80
    _assert_same_table(fast, slow)

    time.sleep(1.1)
    run, _ = wired_writer(str(tmp_path / "run"), flush_secs=3600, purge_step=60)
    run.log_scalars({"val/acc": 0.0}, 60)
    run.close()
    fast, slow = _tables(tmp_path)
    assert fast[0].source == "events"  # TensorBoard dropped steps >= 60 of the earlier files
    assert fast[0].stats["val/acc"].count == 61
    _assert_same_table(fast, slow)


# ------------------------------------------------------------------------ a sweep with a killed run
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_table_from_summaries_equals_table_from_events_with_a_killed_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, str(CHILD), str(tmp_path), str(lr), "300", mode, str(ready)],
            env=env,
            cwd=ROOT,
        )
        for lr, mode in ((0.1, "finish"), (0.01, "finish"), (0.001, "hang"))
    ]
    try:
        deadline = time.monotonic() + 200
        while not ready.exists():
            assert time.monotonic() < deadline, "the hanging run never got past its last save"
            assert children[2].poll() is None, "the hanging run exited"
            time.sleep(0.05)
        children[2].send_signal(signal.SIGKILL)
        for child in children:
            child.wait(timeout=200)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert [c.returncode for c in children] == [0, 0, -signal.SIGKILL]
    # A run of an older version, without a summary.
    _, plain_dir, _ = _fs.run_dir(tmp_path, "sweep", None)
    from tbx_lightning._writer import RunWriter

    with RunWriter(plain_dir) as plain:
        hp = RunHParams(plain)
        hp.log({"model": {"lr": 1.0}, "seed": 0})
        for step in range(20):
            plain.log_scalars(metrics(step, 1.0), step)
        hp.finish("failed")
    Path(plain_dir, SUMMARY_FILE).unlink()  # as a run written before summaries existed

    fast, slow = _tables(tmp_path / "sweep")
    by_lr = {r.hparams["model.lr"]: r for r in fast}
    assert {lr: r.source for lr, r in by_lr.items()} == {
        0.1: "summary",
        0.01: "summary",
        0.001: "events",  # killed after its last save: the summary is older than its events
        1.0: "events",
    }
    assert {lr: r.status for lr, r in by_lr.items()} == {
        0.1: "success",
        0.01: "success",
        0.001: "running",
        1.0: "failure",
    }
    killed = by_lr[0.001]
    assert killed.stats["train/loss"].count > 300
    assert killed.duration is not None and killed.duration > 0  # up to its last point
    _assert_same_table(fast, slow)

    # The command prints that table.
    capsys.readouterr()
    assert cli.main(["hparams", str(tmp_path / "sweep"), "--format", "json"]) == 0
    assert capsys.readouterr().out.strip() == _table.render(*_table.table_rows(slow), "json")
