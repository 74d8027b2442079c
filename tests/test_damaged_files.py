"""One damaged file in a run directory is skipped with one warning naming it, never a crash.

Runs are written by real writers; one of their files is then damaged (or a foreign
one planted) and the run is read again the ways users read it: the ``hparams`` table
(``tbx-lightning hparams``), a resumed writer that logs hyperparameters, and
TensorBoard's own reader.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX.proto.event_pb2 import Event

from tbx_lightning import cli
from tbx_lightning._events import frame, masked_crc
from tbx_lightning._summary import SUMMARY_FILE
from tbx_lightning._writer import RECORDS_FILE, RunWriter
from tbx_lightning.cli import _table
from tbx_lightning.hparams import SESSION_START_TAG, RunHParams
from tests.rows import session

pytestmark = pytest.mark.timeout(120)


# A config of 300 keys: a row of about 10 kB, kept in the records file by every version.
BLOCK = {f"key{i:03d}": f"value-{i:04d}" for i in range(300)}


def _run(run_dir: Path, lr: float = 0.1, *, block: bool = True) -> None:
    with RunWriter(run_dir, flush_secs=3600) as run:
        hp = RunHParams(run)
        hp.log({"lr": lr, "block": BLOCK} if block else {"lr": lr})
        for step in range(20):
            run.log_scalars({"loss": 1.0 / (step + 1)}, step)
        hp.finish("success")


def header() -> bytes:
    """The first record of every event file."""
    return frame(Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString())


def _garbage_length() -> bytes:
    """A record header whose length is 2**63 (its CRC does not match)."""
    return struct.pack("<QI", 1 << 63, 0)


def _crafted_length() -> bytes:
    """A record header whose length, 2**62, passes its CRC: only a cap stops it."""
    head = struct.pack("<Q", 1 << 62)
    return head + struct.pack("<I", masked_crc(head))


def test_a_summary_nested_200000_levels_deep_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(tmp_path / "runs" / "a", 0.1)
    _run(tmp_path / "runs" / "b", 0.2)
    deep = tmp_path / "runs" / "b" / SUMMARY_FILE
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with caplog.at_level(logging.WARNING, logger="tbx_lightning"):
        assert cli.main(["hparams", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "0.1" in table and "0.2" in table
    warned = [r.getMessage() for r in caplog.records if str(deep) in r.getMessage()]
    assert len(warned) == 1 and "RecursionError" in warned[0], warned
    sources = {r.run: r.source for r in _table.read_runs(tmp_path / "runs")}
    assert sources == {"a": "summary", "b": "events"}


@pytest.mark.parametrize("damage", [_garbage_length, _crafted_length])
def test_a_records_file_with_a_garbage_length_is_skipped_by_the_table(
    tmp_path: Path, damage: object, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "runs" / "a"
    _run(run_dir)
    records = run_dir / RECORDS_FILE
    content = records.read_bytes()
    first = len(header())
    # A damaged record right after the file's header: nothing after it can be trusted.
    records.write_bytes(content[:first] + damage() + content[first:])  # type: ignore[operator]
    with pytest.warns(UserWarning, match=rf"skipped '{records}' from byte {first} on: .*damaged"):
        (record,) = _table.read_runs(tmp_path / "runs")
    assert record.source == "summary" and record.stats["loss"].count == 20
    assert record.hparams == {}  # its row was behind the damage, as for TensorBoard
    with pytest.warns(UserWarning, match="damaged"):
        assert cli.main(["hparams", str(tmp_path / "runs")]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[:2] == ["a", "unknown"]


def test_a_damaged_records_file_of_a_resumed_run_is_replaced_with_a_warning(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    _run(run_dir)
    records = run_dir / RECORDS_FILE
    data = bytearray(records.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the last record: its CRC no longer matches
    records.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=rf"skipped '{records}' from byte"):
        run = RunWriter(run_dir)
    hp = RunHParams(run)
    hp.log({"lr": 0.2, "resumed": True})
    run.log_scalars({"loss": 0.01}, 20)
    hp.finish("success")
    run.close()
    config, status = session(run_dir)
    assert config["lr"] == 0.2 and config["resumed"] is True and status == "STATUS_SUCCESS"
    assert config["block.key299"] == "value-0299"  # kept from config.yaml


def test_a_records_file_holding_no_events_is_skipped_with_a_warning(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RECORDS_FILE).write_bytes(header() + frame(b"\xff\xff\xff not an event"))
    with pytest.warns(UserWarning, match=r"skipped 1 record\(s\) of .* no TensorBoard events"):
        run = RunWriter(run_dir)
    RunHParams(run).finish("success")
    run.close()
    assert session(run_dir)[1] == "STATUS_SUCCESS"


def test_a_foreign_event_file_with_a_non_event_hparams_record_breaks_nothing(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "runs" / "a"
    _run(run_dir, block=False)  # a small row (which earlier versions kept in the event file)
    # A record that carries the session tag's bytes but is no Event (a foreign writer's).
    foreign = run_dir / "events.out.tfevents.0000000001.foreign"
    foreign.write_bytes(header() + frame(b"\xff" + SESSION_START_TAG.encode() + b"\xff" * 40))
    run = RunWriter(run_dir)  # a resumed run logs its hyperparameters
    hp = RunHParams(run)
    hp.log({"lr": 0.3})
    hp.finish("success")
    run.close()
    # TensorBoard's own reader stops at such a file with a DecodeError: read without it.
    foreign.unlink()
    config, status = session(run_dir)
    assert config["lr"] == 0.3 and status == "STATUS_SUCCESS"


def test_the_reader_stops_at_the_first_damage_and_keeps_what_came_before() -> None:
    from tbx_lightning._events import read_records

    good = [b"first", b"second"]
    stream = b"".join(frame(r) for r in good)
    assert list(read_records(stream, "x")) == good
    assert list(read_records(stream + frame(b"third")[:-3], "cut")) == good  # cut short: quiet
    with pytest.warns(UserWarning, match=r"skipped 'bad' from byte 43 on: .*data fails its CRC"):
        assert list(read_records(stream + frame(b"third")[:-1] + b"\0", "bad")) == good
    with pytest.warns(UserWarning, match=r"'big' from byte 43 on: .*passes"):
        assert list(read_records(stream + _crafted_length(), "big")) == good


def test_tensorboard_reads_what_the_writer_wrote_after_a_damaged_records_file(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    _run(run_dir)
    (run_dir / RECORDS_FILE).write_bytes(_garbage_length())
    with pytest.warns(UserWarning, match="damaged"):
        run = RunWriter(run_dir)
    RunHParams(run).log({"lr": 0.5})
    run.close()
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert len(acc.Scalars("loss")) == 20
    assert session(acc)[0]["lr"] == 0.5
