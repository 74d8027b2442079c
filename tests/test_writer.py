from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX.proto.event_pb2 import Event

import tbx_lightning
from tbx_lightning import RunWriter, RunWriterError
from tbx_lightning._fs import claim_version, run_dir
from tbx_lightning._writer import RECORDS_FILE
from tests.rows import RUN_COLUMNS
from tests.tb import read


def values(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_public_surface_is_sorted_and_complete() -> None:
    import types

    assert tbx_lightning.__all__ == sorted(tbx_lightning.__all__)
    for name in tbx_lightning.__all__:
        assert getattr(tbx_lightning, name) is not None, name
    helpers = {"annotations", "importlib", "install_accelerate_hook", "TYPE_CHECKING", "Any"}
    public = {
        name
        for name in dir(tbx_lightning)
        if not name.startswith("_")
        and name not in helpers
        and not isinstance(getattr(tbx_lightning, name), types.ModuleType)
    }
    assert public == set(tbx_lightning.__all__) - {"__version__"}


def test_import_does_not_load_frameworks() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tbx_lightning; "
        "assert 'lightning' not in sys.modules and 'accelerate' not in sys.modules, "
        "[m for m in sys.modules if m.startswith(('lightning', 'accelerate'))]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "value,expected",
    [
        pytest.param(1.5, 1.5, id="float"),
        pytest.param(3, 3.0, id="int"),
        pytest.param(True, 1.0, id="bool"),
        pytest.param(np.float32(2.25), 2.25, id="numpy-float32"),
        pytest.param(np.int64(7), 7.0, id="numpy-int64"),
        pytest.param(np.array([4.5]), 4.5, id="numpy-1-element"),
        pytest.param(torch.tensor(0.75), 0.75, id="tensor-0d"),
        pytest.param(torch.tensor([1.25], dtype=torch.bfloat16), 1.25, id="tensor-bf16"),
        pytest.param(torch.tensor(5, dtype=torch.int32), 5.0, id="tensor-int"),
    ],
)
def test_scalar_types_round_trip(tmp_path: Path, value: object, expected: float) -> None:
    with RunWriter(tmp_path) as run:
        run.log_scalars({"metric": value}, step=3)
    assert values(read(tmp_path), "metric") == [(3, expected)]


def test_many_calls_one_event_stream(tmp_path: Path) -> None:
    with RunWriter(tmp_path, max_queue=64) as run:
        for step in range(2000):
            run.log_scalars({"a": step * 0.5, "b": torch.tensor(float(-step))}, step)
            if step == 1000:
                run.experiment.add_text("note", "half way", step)
                run.experiment.add_histogram("w", torch.arange(10.0), step)
    acc = read(tmp_path)
    assert values(acc, "a") == [(s, s * 0.5) for s in range(2000)]
    assert values(acc, "b") == [(s, float(-s)) for s in range(2000)]
    assert [e.step for e in acc.Histograms("w")] == [1000]
    assert acc.Tensors("note/text_summary")[0].step == 1000
    events = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    assert len(events) == 1


def test_bad_value_names_key_and_keeps_queued_data(tmp_path: Path) -> None:
    with RunWriter(tmp_path) as run:
        run.log_scalars({"ok": 1.0}, 0)
        with pytest.raises(TypeError, match=r"Value 'bad' has type str"):
            run.log_scalars({"fine": 2.0, "bad": "text"}, 1)
        with pytest.raises(TypeError, match=r"Value 'none' has type NoneType"):
            run.log_scalars({"none": None}, 1)
        with pytest.raises(TypeError, match=r"Value 'vec' is a tensor of shape \(3,\)"):
            run.log_scalars({"vec": torch.ones(3)}, 1)
        with pytest.raises(TypeError, match=r"`step` must be an int, got float"):
            run.log_scalars({"ok": 1.0}, 1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="must not be empty"):
            run.log_scalars({"": 1.0}, 1)
        run.log_scalars({"ok": 3.0}, 2)
    acc = read(tmp_path)
    assert values(acc, "ok") == [(0, 1.0), (2, 3.0)]
    assert "fine" not in acc.Tags()["scalars"]  # a failing call queues nothing


def test_tags_are_kept_verbatim(tmp_path: Path) -> None:
    tags = ["with space", "a/b/c", "ünïcødé/损失", "x" * 500, "weird:chars[0]"]
    with RunWriter(tmp_path) as run:
        run.log_scalars(dict.fromkeys(tags, 1.0), 0)
    assert sorted(read(tmp_path).Tags()["scalars"]) == sorted(tags)


def test_flush_makes_data_readable_while_open(tmp_path: Path) -> None:
    run = RunWriter(tmp_path, flush_secs=3600)
    run.log_scalars({"m": 1.0}, 0)
    run.flush()
    assert values(read(tmp_path), "m") == [(0, 1.0)]
    run.close()


def test_periodic_flush(tmp_path: Path) -> None:
    import time

    run = RunWriter(tmp_path, flush_secs=0.2)
    run.log_scalars({"m": 1.0}, 0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not read(tmp_path).Tags()["scalars"]:
        time.sleep(0.1)
    assert values(read(tmp_path), "m") == [(0, 1.0)]
    run.close()


def test_bounded_queue_blocks_instead_of_dropping(tmp_path: Path) -> None:
    with RunWriter(tmp_path, max_queue=4) as run:
        for step in range(500):
            run.log_scalars({"m": float(step)}, step)
            assert len(run._queue) <= 4 + 1
    assert len(read(tmp_path).Scalars("m")) == 500


def test_purge_step_hides_stale_events_on_resume(tmp_path: Path) -> None:
    with RunWriter(tmp_path) as run:
        for step in range(10):
            run.log_scalars({"loss": float(step)}, step)
    with RunWriter(tmp_path, purge_step=5) as run:
        for step in range(5, 8):
            run.log_scalars({"loss": 100.0 + step}, step)
    got = values(read(tmp_path), "loss")
    assert got == [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 8)]


def test_records_are_kept_one_per_tag_in_the_records_file(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboardX.proto.summary_pb2 import Summary

    def tagged(tag: str, value: float) -> Event:
        return Event(step=1, summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)]))

    def records(path: Path) -> list[tuple[str, float]]:
        events = [Event.FromString(r) for r in RawEventFileLoader(str(path)).Load()]
        assert events[0].file_version == "brain.Event:2"
        return [(v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]

    with RunWriter(tmp_path) as run:
        run.put_record(tagged("a", 1.0))
        run.log_scalars({"m": 1.0}, 1)
        run.put_record(tagged("b", 5.0))
        run.put_record(tagged("a", 2.0))
        run.flush()
        (event_file,) = [
            p for p in tmp_path.iterdir() if p.name.startswith("events.out.tfevents.1")
        ]
        assert records(tmp_path / RECORDS_FILE) == [("a", 2.0), ("b", 5.0)]  # one per tag
        run.put_record(tagged("a", 3.0))
    names = sorted(p.name for p in tmp_path.iterdir())
    # The records file sorts before the event file: TensorBoard reads its records first.
    assert names == [RECORDS_FILE, event_file.name, "summary.json"]
    assert not RECORDS_FILE.startswith("events.") and "tfevents" in RECORDS_FILE
    assert records(tmp_path / RECORDS_FILE) == [("a", 3.0), ("b", 5.0)]
    assert records(event_file) == [("m", 1.0)]  # the event stream holds none of them


def test_memory_filesystem(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    with RunWriter("memory://runs/exp/version_0") as run:
        run.log_scalars({"m": 2.0}, 4)
    (name,) = [p for p in fs.ls("/runs/exp/version_0", detail=False) if "tfevents" in p]
    (tmp_path / "events.out.tfevents.0.mem").write_bytes(fs.cat(name))
    assert values(read(tmp_path), "m") == [(4, 2.0)]


def test_error_from_storage_is_reported_once_and_data_retried(tmp_path: Path, monkeypatch) -> None:
    run = RunWriter(tmp_path, flush_secs=3600)
    run.log_scalars({"m": 1.0}, 0)
    run.flush()
    real_write = run._stream.file.write
    calls = {"n": 0}

    def failing_write(data: bytes) -> int:
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run._stream.file, "write", failing_write)
    run.log_scalars({"m": 2.0}, 1)
    with pytest.raises(RunWriterError, match=r"No space left on device.*flush\(\) to retry"):
        run.flush()
    monkeypatch.setattr(run._stream.file, "write", real_write)
    run.flush()  # the pending bytes are written now
    run.close()
    assert calls["n"] >= 1
    assert values(read(tmp_path), "m") == [(0, 1.0), (1, 2.0)]


def _claim(root: str, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    import fsspec

    queue.put(claim_version(fsspec.filesystem("file"), root))


def test_eight_processes_claim_eight_versions(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), queue)) for _ in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    got = sorted(queue.get(timeout=10) for _ in procs)
    assert got == list(range(8))
    # Next to the folders: one claim marker per number, so none is handed out again.
    assert sorted(n for n in os.listdir(tmp_path) if n != ".tbx_claims") == sorted(
        f"version_{i}" for i in range(8)
    )
    assert sorted(os.listdir(tmp_path / ".tbx_claims")) == sorted(f"version_{i}" for i in range(8))


def test_run_dir_explicit_versions(tmp_path: Path) -> None:
    _, log_dir, version = run_dir(tmp_path, "exp", 7)
    assert version == 7 and log_dir.endswith(os.path.join("exp", "version_7"))
    _, log_dir, version = run_dir(tmp_path, "exp", "my-run", sub_dir="train")
    assert version == "my-run" and log_dir.endswith(os.path.join("exp", "my-run", "train"))
    _, _, version = run_dir(tmp_path, "exp", None)
    assert version == 8


@pytest.mark.parametrize(
    "blocked,name,extra",
    [
        pytest.param("lightning", "TBXLogger", "lightning", id="lightning"),
        pytest.param("lightning", "TrainingMonitor", "lightning", id="monitor-callback"),
        pytest.param("lightning", "EmbeddingProjector", "lightning", id="projector-callback"),
        pytest.param("accelerate", "TBXTracker", "accelerate", id="accelerate"),
    ],
)
def test_missing_extra_names_the_install_command(blocked: str, name: str, extra: str) -> None:
    import subprocess
    import sys

    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "import tbx_lightning\n"
        "try:\n"
        f"    tbx_lightning.{name}\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert f"pip install 'tbx-lightning[{extra}]'" in out.stdout


def test_cli_without_templates_extra_names_the_install_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['hydra'] = None\n"
        "from tbx_lightning.cli import main\n"
        "sys.exit(main(['fit']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 2, out.stderr
    assert "pip install 'tbx-lightning[templates]'" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_tensor_metrics_cost_one_host_transfer(tmp_path: Path, monkeypatch) -> None:
    calls = {"cpu": 0}
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls["cpu"] += 1
        return real_cpu(self, *args, **kwargs)

    def no_item(self: torch.Tensor) -> object:
        raise AssertionError("log_scalars must not call .item() per metric")

    with RunWriter(tmp_path) as run:
        metrics = {f"m{i}": torch.tensor(float(i)) for i in range(10)}
        monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
        monkeypatch.setattr(torch.Tensor, "item", no_item)
        run.log_scalars(metrics, 0)
        monkeypatch.undo()
    assert calls["cpu"] == 1
    assert values(read(tmp_path), "m7") == [(0, 7.0)]


def test_normal_exit_without_close_loses_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tbx_lightning import RunWriter\n"
        "run = RunWriter(sys.argv[1], flush_secs=3600)\n"
        "for step in range(5000):\n"
        "    run.log_scalars({'m': float(step)}, step)\n"
        "run.experiment.add_text('t', 'last words', 5000)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    acc = read(tmp_path)
    assert values(acc, "m") == [(s, float(s)) for s in range(5000)]
    assert acc.Tensors("t/text_summary")[0].step == 5000


def test_remote_event_files_roll_over_and_read_back_as_one_run(tmp_path: Path) -> None:
    import fsspec

    from tbx_lightning.hparams import RunHParams

    fs = fsspec.filesystem("memory")
    with RunWriter("memory://roll/version_0", segment_bytes=2_000) as run:
        hp = RunHParams(run)
        hp.log({"lr": 0.1})
        for step in range(300):
            run.log_scalars({"loss": float(step)}, step)
            if step % 50 == 49:
                run.flush()
        hp.finish("success")
    names = sorted(p for p in fs.ls("/roll/version_0", detail=False) if "tfevents" in p)
    assert len(names) >= 3, names
    # Each file ends at the first flush past the limit. The first also holds the HParams
    # row and status, each in a page of its own (the spool is written as a local run is).
    assert len(fs.cat(names[0])) < 2_000 + 4 * 4_096 + 3_000
    assert all(len(fs.cat(n)) < 2_000 + 3_000 for n in names[1:])
    for name in names:
        (tmp_path / name.rsplit("/", 1)[-1]).write_bytes(fs.cat(name))
    acc = read(tmp_path)
    assert values(acc, "loss") == [(s, float(s)) for s in range(300)]
    from tensorboard.plugins.hparams import api_pb2, metadata

    content = acc.PluginTagToContent("hparams")["_hparams_/session_end_info"]
    assert metadata.parse_session_end_info_plugin_data(content).status == api_pb2.STATUS_SUCCESS


def test_sustained_logging_is_flushed_on_time(tmp_path: Path) -> None:
    """A producer as fast as the encoder must not hold back the periodic flush."""
    import threading
    import time

    run = RunWriter(tmp_path, flush_secs=0.2)
    stop = threading.Event()
    sizes: list[int] = []

    def produce() -> None:
        step = 0
        payload = {f"m{i}": 0.5 for i in range(10)}
        while not stop.is_set():
            run.log_scalars(payload, step)
            step += 1

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        for _ in range(15):
            time.sleep(0.2)
            sizes.append(os.path.getsize(run.event_file))
    finally:
        stop.set()
        producer.join()
        run.close()
    # The file grows while the producer runs (from the first second on, even on a busy machine).
    assert sizes[-1] > sizes[4] > 1_000, sizes


def test_queue_is_bounded_in_bytes_too(tmp_path: Path, monkeypatch) -> None:
    import time

    from tbx_lightning import _stream

    slow = _stream.EventFile.write

    def stalled(self: object, data: bytes) -> int:
        time.sleep(0.002)  # storage slower than the producer
        return slow(self, data)  # type: ignore[arg-type]

    monkeypatch.setattr(_stream.EventFile, "write", stalled)
    keys = {f"layer{i}/grad_norm": 0.5 for i in range(500)}
    item = 200 + 56 * len(keys)
    budget = 10 * item
    peak = 0
    with RunWriter(tmp_path, max_queue_bytes=budget) as run:
        for step in range(100):
            run.log_scalars(keys, step)
            peak = max(peak, run._bytes_in - run._bytes_out + len(run._stream.pending))
    assert peak <= budget + item
    assert len(read(tmp_path).Scalars("layer7/grad_norm")) == 100


def test_add_scalars_writers_are_closed_with_the_run(tmp_path: Path) -> None:
    run = RunWriter(tmp_path)
    run.experiment.add_scalars("loss", {"train": 1.0, "val": 2.0}, 3)
    run.close()
    for sub, expected in (("train", 1.0), ("val", 2.0)):
        # tensorboardX writes one folder per sub-tag; close() leaves them complete on disk.
        assert values(read(tmp_path / "loss" / sub), "loss") == [(3, expected)]


def test_huge_python_int_is_written_as_inf(tmp_path: Path) -> None:
    with RunWriter(tmp_path) as run:
        run.log_scalars({"loss": 0.5, "count": 10**400, "neg": -(10**400)}, 0)
    acc = read(tmp_path)
    assert values(acc, "loss") == [(0, 0.5)]
    assert values(acc, "count") == [(0, math.inf)] and values(acc, "neg") == [(0, -math.inf)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_writes_its_own_file_in_the_same_run(tmp_path: Path) -> None:
    from tbx_lightning.hparams import RunHParams

    run = RunWriter(tmp_path, flush_secs=3600)
    hp = RunHParams(run)
    hp.log({"lr": 0.1})
    run.log_scalars({"parent": 1.0}, 0)
    pid = os.fork()
    if pid == 0:  # the child: log, update the row, finish, and leave without atexit
        code = 0
        try:
            for step in range(100):
                run.log_scalars({"child": float(step)}, step)
            hp.log({"width": 8})
            hp.finish("success")
            run.close()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    run.log_scalars({"parent": 2.0}, 1)
    run.close()
    acc = read(tmp_path)
    assert values(acc, "parent") == [(0, 1.0), (1, 2.0)]
    assert values(acc, "child") == [(s, float(s)) for s in range(100)]
    from tensorboard.plugins.hparams import api_pb2, metadata

    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content["_hparams_/session_start_info"])
    end = metadata.parse_session_end_info_plugin_data(content["_hparams_/session_end_info"])
    assert set(start.hparams) - set(RUN_COLUMNS) == {"lr", "width"}
    assert end.status == api_pb2.STATUS_SUCCESS
    # The parent's event file, the child's, and the records file both replaced.
    names = sorted(p for p in os.listdir(tmp_path) if "tfevents" in p)
    assert names[0] == RECORDS_FILE and len(names) == 3


def test_flush_that_writes_everything_is_not_failed_by_an_older_retry(tmp_path: Path) -> None:
    """A retry that failed just before space was freed must not fail the flush that succeeds."""
    run = RunWriter(tmp_path, flush_secs=3600)
    run.log_scalars({"m": 1.0}, 0)
    real_save = run._summary.save
    stale = {"set": False}

    def save_after_a_failed_retry() -> bool:
        if not stale["set"]:
            stale["set"] = True
            run._stream.error = OSError(28, "No space left on device")  # the older retry's error
        return real_save()

    run._summary.save = save_after_a_failed_retry  # type: ignore[method-assign]
    run.flush()  # does not raise: everything pending is on storage
    run.close()
    assert stale["set"] and values(read(tmp_path), "m") == [(0, 1.0)]


@pytest.mark.parametrize("trial", range(5))
def test_log_calls_racing_close_land_or_raise(tmp_path: Path, trial: int) -> None:
    import threading

    run = RunWriter(tmp_path / "run", flush_secs=60)
    landed: list[list[int]] = [[] for _ in range(4)]
    refused: list[int] = [0] * 4
    errors: list[BaseException] = []
    go = threading.Barrier(5)

    def log(worker: int) -> None:
        value = torch.tensor(1.0)
        go.wait()
        for i in range(200_000):
            step = worker * 1_000_000 + i
            try:
                # A tensor value: its host copy widens the gap between the check for
                # a closed run and the queueing, where a close used to slip in.
                run.log_scalars({f"w{worker}": value}, step)
            except RunWriterError as error:
                if "is closed" not in str(error):
                    errors.append(error)
                refused[worker] += 1
                return
            landed[worker].append(step)

    threads = [threading.Thread(target=log, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    go.wait()
    time.sleep(0.05 * (trial + 1))
    run.close()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert refused == [1] * 4  # every thread ran into the close
    acc = read(tmp_path / "run")
    for worker in range(4):
        # Exactly what returned normally was written: nothing returned and was lost.
        assert [s for s, _ in values(acc, f"w{worker}")] == landed[worker]
