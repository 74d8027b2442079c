"""A spool in a place other users share: nothing planted there is trusted.

The remote is ``memory://`` (the same spool and uploader as for ``s3://``, without a
server); what lands there is read back with TensorBoard's reader. "Another user" is a
real other uid where the tests run as root (files and folders are handed to
``nobody``), and otherwise what one user can plant in their own folder: a link, a
manifest, a lease.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbx_lightning import _fs
from tbx_lightning._lease import LEASE_FILE, _proc_start
from tbx_lightning._spool import MANIFEST, spool_dir, upload_spool
from tbx_lightning._writer import RunWriter
from tbx_lightning.errors import RunInUseError, RunWriterError
from tbx_lightning.hparams import RunHParams

pytestmark = pytest.mark.timeout(120)

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another user needs root")
NOBODY = 65534


@pytest.fixture
def url() -> Iterator[str]:
    name = f"trust-{uuid.uuid4().hex[:10]}"
    yield f"memory://{name}/runs/x"
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)


def _remote(url: str) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        names = fs.find(path)
    except FileNotFoundError:
        return {}
    return {name[len(path) + 1 :]: bytes(fs.cat_file(name)) for name in names}


def _steps(files: dict[str, bytes], dest: Path, tag: str) -> list[int]:
    dest.mkdir()
    for name, data in files.items():
        if "tfevents" in name and "/" not in name:
            (dest / name).write_bytes(data)
    acc = EventAccumulator(str(dest))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _spool_of(url: str) -> str:
    """The spool folder of the run at ``url``, as its writer names it (the URL normalised)."""
    return spool_dir(_fs.url(*_fs.resolve(url)))


def _private_folder(path: str) -> Path:
    folder = Path(path)
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700)
    return folder


def test_a_link_planted_in_the_spool_is_never_followed_or_uploaded(
    url: str, tmp_path: Path
) -> None:
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = hunter2\n")
    folder = _private_folder(_spool_of(url))  # the name is predictable: planted beforehand
    (folder / "notes.txt").symlink_to(secret)
    (folder / "sub").mkdir()
    (folder / "sub" / "key").symlink_to(secret)
    with (
        pytest.warns(UserWarning, match=r"not uploaded from the spool .*notes\.txt.*sub/key"),
        RunWriter(url, upload_timeout=20) as run,
    ):
        run.log_scalars({"loss": 0.5}, 1)
    files = _remote(url)
    assert not any(b"hunter2" in data for data in files.values())
    assert "notes.txt" not in files and "sub/key" not in files
    assert _steps(files, tmp_path / "copy", "loss") == [1]
    assert secret.read_text() == "aws_secret_access_key = hunter2\n"  # nothing written through


def test_every_file_and_folder_of_the_spool_is_owner_only(url: str) -> None:
    import torch

    from tbx_lightning.projector import log_embedding

    old = os.umask(0o022)  # the usual umask: the stock writers make 0755 folders, 0644 files
    try:
        run = RunWriter(url, flush_secs=0.1)
        hp = RunHParams(run)
        hp.log({"lr": 0.1, "db": {"password": "x"}})
        run.log_scalars({"loss": 0.5}, 1)
        run.experiment.add_scalars("pair", {"a": 1.0, "b": 2.0}, 1)  # tensorboardX's own files
        log_embedding(run, "words", torch.ones(4, 3), metadata=["a", "b", "c", "d"])
        hp.finish("success")
        run.flush()
        spool = Path(run.spool_dir or "")
        deadline = time.monotonic() + 20
        while True:  # what others wrote is made owner-only by the uploader's next pass
            modes = {
                str(p.relative_to(spool)): stat.S_IMODE(p.lstat().st_mode) for p in spool.rglob("*")
            }
            wrong = {
                name: oct(mode)
                for name, mode in modes.items()
                if mode != (0o700 if (spool / name).is_dir() else 0o600)
            }
            if not wrong or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700
        assert wrong == {}, modes
        assert {"config.yaml", "summary.json", MANIFEST, LEASE_FILE} <= set(modes)
        assert any(name.startswith("pair/") for name in modes)
        assert any(name.startswith("projector/") for name in modes)
        run.close()
    finally:
        os.umask(old)


def test_a_spool_folder_others_can_write_is_refused(url: str) -> None:
    folder = _private_folder(_spool_of(url))
    folder.chmod(0o777)  # pre-created open to everyone
    with pytest.raises(
        RunWriterError,
        match=rf"The spool folder '{folder}' is writable by group or others \(mode 777\).*"
        r"TBX_LIGHTNING_SPOOL",
    ):
        RunWriter(url)
    assert os.listdir(folder) == []  # nothing of the run was written there


@ROOT_ONLY
def test_a_spool_folder_of_another_user_is_refused(url: str) -> None:
    folder = _private_folder(_spool_of(url))
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(
        RunWriterError,
        match=rf"The spool folder '{folder}' belongs to another user \(uid {NOBODY}\)",
    ):
        RunWriter(url)
    assert os.listdir(folder) == []


def test_a_spool_root_others_can_write_is_refused_unless_sticky(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TBX_LIGHTNING_SPOOL", str(shared))
    with pytest.raises(RunWriterError, match=rf"The spool root '{shared}' .* can be changed"):
        RunWriter(url)
    shared.chmod(0o1777)  # as /tmp: nobody can rename or remove another user's folder
    with RunWriter(url) as run:
        run.log_scalars({"loss": 1.0}, 0)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    return victim


def test_upload_refuses_a_manifest_that_names_another_place(url: str, tmp_path: Path) -> None:
    from tbx_lightning import cli

    victim = _victim(tmp_path)
    folder = _private_folder(_spool_of(url))
    planted = {"url": f"file://{victim}", "files": {}, "deleted": [""], "lease_token": None}
    (folder / MANIFEST).write_text(json.dumps(planted))
    (folder / MANIFEST).chmod(0o600)
    assert cli.main(["upload", str(folder)]) == 1
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert folder.exists()  # the folder named was not removed either
    with pytest.raises(RunWriterError, match=r"names 'file://.*victim', which is not the run"):
        upload_spool(folder)


def test_upload_deletes_nothing_outside_the_run(url: str, tmp_path: Path) -> None:
    with RunWriter(url) as run:  # an earlier run, uploaded
        run.log_scalars({"loss": 1.0}, 0)
    sibling = url.rsplit("/", 1)[0] + "/other"
    with RunWriter(sibling) as run:
        run.log_scalars({"loss": 2.0}, 0)
    before = _remote(url)
    folder = _private_folder(_spool_of(url))
    (folder / "late.txt").write_text("left behind")
    own = _fs.url(*_fs.resolve(url))  # the URL as the run's writer records it
    planted = {"url": own, "files": {}, "deleted": ["", "..", "../other", "/", "a/../.."]}
    (folder / MANIFEST).write_text(json.dumps(planted))
    (folder / MANIFEST).chmod(0o600)
    assert upload_spool(folder) == 1  # late.txt only
    after = _remote(url)
    assert after == {**before, "late.txt": b"left behind"}
    assert _steps(_remote(sibling), tmp_path / "sibling", "loss") == [0]


@ROOT_ONLY
def test_upload_refuses_a_manifest_or_folder_of_another_user(url: str, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    folder = _private_folder(_spool_of(url))
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"url": _fs.url(*_fs.resolve(url)), "files": {}}))
    manifest.chmod(0o600)
    os.chown(manifest, NOBODY, NOBODY)
    with pytest.raises(RunWriterError, match=r"manifest .* is not to be trusted \(owned by uid"):
        upload_spool(folder)
    os.chown(manifest, 0, 0)
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(RunWriterError, match=r"belongs to another user"):
        upload_spool(folder)
    assert (victim / "thesis.tex").exists()


def test_a_planted_manifest_cannot_delete_a_resumed_runs_earlier_data(
    url: str, tmp_path: Path
) -> None:
    with RunWriter(url) as run:
        run.log_scalars({"loss": 1.0}, 0)
    earlier = _remote(url)
    assert any("tfevents" in name for name in earlier)
    folder = _private_folder(_spool_of(url))
    own = _fs.url(*_fs.resolve(url))
    planted = {"url": own, "files": {}, "deleted": ["", "."], "lease_token": None}
    (folder / MANIFEST).write_text(json.dumps(planted))
    (folder / MANIFEST).chmod(0o600)
    with RunWriter(url, upload_timeout=20) as run:  # resumed: fetches, then uploads
        run.log_scalars({"loss": 2.0}, 1)
    after = _remote(url)
    assert set(earlier) <= set(after)
    assert _steps(after, tmp_path / "copy", "loss") == [0, 1]


@ROOT_ONLY
def test_a_manifest_of_another_user_in_the_spool_is_ignored_with_a_warning(
    url: str, tmp_path: Path
) -> None:
    with RunWriter(url) as run:
        run.log_scalars({"loss": 1.0}, 0)
    folder = _private_folder(_spool_of(url))
    manifest = folder / MANIFEST
    own = _fs.url(*_fs.resolve(url))
    manifest.write_text(json.dumps({"url": own, "files": {}, "deleted": ["events"]}))
    os.chown(manifest, NOBODY, NOBODY)
    with (
        pytest.warns(UserWarning, match=rf"ignored the spool manifest {manifest} \(owned by uid"),
        RunWriter(url, upload_timeout=20) as run,
    ):
        run.log_scalars({"loss": 2.0}, 1)
    assert _steps(_remote(url), tmp_path / "copy", "loss") == [0, 1]


# --------------------------------------------------------------------------- leases
def _lease(pid: int, **extra: object) -> str:
    info = {
        "pid": pid,
        "host": socket.gethostname(),
        "proc_start": _proc_start(pid) if 0 < pid < 1 << 22 else None,
        "started": time.time(),
        "heartbeat": time.time(),
        "stale_after": 1e300,
        "token": "planted",
        **extra,
    }
    return json.dumps(info)


@pytest.fixture
def foreign_process() -> Iterator[int]:
    """A live process of another user (root only), or pid 1 where that is another user's."""
    if os.geteuid() == 0:
        proc = subprocess.Popen(["sleep", "60"], user=NOBODY)
        try:
            yield proc.pid
        finally:
            proc.kill()
            proc.wait()
        return
    if os.stat("/proc/1").st_uid == os.getuid():
        pytest.skip("no process of another user to name")
    yield 1


def test_a_planted_lease_naming_another_users_process_is_taken_over(
    tmp_path: Path, foreign_process: int
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LEASE_FILE).write_text(_lease(foreign_process, uid=os.getuid()))
    with pytest.warns(UserWarning, match=rf"taking over the stale lease .*pid {foreign_process}"):
        run = RunWriter(run_dir)
    run.log_scalars({"loss": 1.0}, 0)
    run.close()
    assert not (run_dir / LEASE_FILE).exists()


def test_a_planted_lease_naming_pid_1_does_not_lock_a_user_out(tmp_path: Path) -> None:
    if os.stat("/proc/1").st_uid == os.getuid():
        pytest.skip("pid 1 runs as this user here (a container's root): it could be a writer")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LEASE_FILE).write_text(_lease(1, uid=os.getuid()))
    with pytest.warns(UserWarning, match=r"taking over the stale lease .*pid 1 "):
        RunWriter(run_dir).close()


@ROOT_ONLY
def test_a_lease_file_of_another_user_is_not_trusted(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lease = run_dir / LEASE_FILE
    lease.write_text(_lease(1))
    os.chown(lease, NOBODY, NOBODY)
    with pytest.warns(UserWarning, match=r"stale lease .* not to be trusted \(owned by uid 65534"):
        RunWriter(run_dir).close()


@pytest.mark.parametrize(
    "pid", [pytest.param(10**30, id="pid-10e30"), pytest.param(-5, id="negative"), "12x"]
)
def test_a_lease_with_an_impossible_pid_is_stale(tmp_path: Path, pid: object) -> None:
    lease = tmp_path / LEASE_FILE
    info = json.loads(_lease(1))
    info["pid"] = pid
    lease.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="taking over the stale lease"):
        RunWriter(tmp_path).close()


def test_a_lease_on_another_host_counts_for_an_hour_at_most(tmp_path: Path) -> None:
    lease = tmp_path / LEASE_FILE
    info = json.loads(_lease(4242, host="elsewhere.example"))
    info["heartbeat"] = time.time() - 3601  # its stale_after says 1e300 seconds
    lease.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="taking over the stale lease"):
        RunWriter(tmp_path).close()
    info["heartbeat"] = time.time() + 10**6  # from the future
    lease.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="taking over the stale lease"):
        RunWriter(tmp_path).close()
    info["heartbeat"] = time.time()
    lease.write_text(json.dumps(info))
    with pytest.raises(RunInUseError, match=r"pid 4242 on host 'elsewhere.example'"):
        RunWriter(tmp_path)


def test_a_planted_remote_lease_naming_another_users_process_is_taken_over(
    url: str, foreign_process: int, tmp_path: Path
) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{path}/{LEASE_FILE}", _lease(foreign_process, uid=os.getuid()).encode())
    with (
        pytest.warns(UserWarning, match=rf"taking over the stale lease .*pid {foreign_process}"),
        RunWriter(url, upload_timeout=20) as run,
    ):
        run.log_scalars({"loss": 1.0}, 0)
    assert _steps(_remote(url), tmp_path / "copy", "loss") == [0]
    assert LEASE_FILE not in _remote(url)


def test_no_spool_file_is_opened_through_a_link_by_the_runs_file_system(url: str) -> None:
    run = RunWriter(url)
    try:
        with pytest.raises(RunWriterError, match=r"leads outside the run"):
            run.fs.pipe_file(run.path + "/../escape.txt", b"x")
        assert not os.path.exists(os.path.join(os.path.dirname(run.spool_dir or ""), "escape.txt"))
    finally:
        run.close()


def test_the_spool_helpers_reject_paths_that_leave_the_folder() -> None:
    assert _fs.safe_parts("a/b.txt") == ["a", "b.txt"]
    for bad in ("", "/etc/passwd", "..", "a/../../b", "a//b", "./a", "a\\b", "a\x00b"):
        assert _fs.safe_parts(bad) is None, bad


def test_upload_of_a_folder_that_is_a_link_is_refused(url: str, tmp_path: Path) -> None:
    real = _private_folder(str(tmp_path / "real"))
    (real / MANIFEST).write_text(json.dumps({"url": url, "files": {}, "deleted": []}))
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(RunWriterError, match=r"is a symbolic link"):
        upload_spool(link)


def test_a_group_writable_lease_of_a_live_writer_of_this_user_still_holds(tmp_path: Path) -> None:
    """Shared clusters often set umask 002: the owner, not the mode, makes a lease trusted."""
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lease = tmp_path / LEASE_FILE
        lease.write_text(_lease(holder.pid, uid=os.getuid()))
        lease.chmod(0o664)
        with pytest.raises(RunInUseError, match=rf"in use by another writer: pid {holder.pid}"):
            RunWriter(tmp_path)
    finally:
        holder.kill()
        holder.wait()
