"""One job per output directory: the lock file, its refusal naming the holder, stale take-over."""
import json
import os
import socket
import subprocess
import sys

import pytest

from maws_fast.cli.train import train_main
from maws_fast.errors import UserError
from maws_fast.storage import LOCK_NAME, acquire_run_lock, release_run_lock

from conftest import needs_fmnist  # noqa: E402
from tests.test_cli import DEMO, FAST


def _hold(tmp_path, **holder):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "started": "2026-12-03T00:00:00", "job": None, **holder}))
    return lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    lock = acquire_run_lock(tmp_path, warn=pytest.fail)
    held = json.loads(lock.read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
    release_run_lock(lock)
    assert not lock.exists()


@pytest.mark.parametrize("holder", [{"pid": 1}, {"pid": 12345, "host": "another-node"}])
def test_a_live_holder_is_refused_in_one_line_naming_it(tmp_path, holder):
    lock = _hold(tmp_path, **holder)
    before = lock.read_text()
    with pytest.raises(UserError, match=rf"is in use by another job: pid {holder['pid']} on "
                                        rf"{holder.get('host', socket.gethostname())} since .*delete .*{LOCK_NAME}"):
        acquire_run_lock(tmp_path, warn=pytest.fail)
    assert lock.read_text() == before  # the holder's lock is untouched


@pytest.mark.parametrize("case", ["dead pid", "same torchrun job", "unreadable"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, monkeypatch, case):
    if case == "dead pid":
        _hold(tmp_path, pid=_dead_pid())
    elif case == "same torchrun job":  # an elastic restart: the old rank 0 may be on another node
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
        _hold(tmp_path, pid=1, host="another-node", job="job-42")
    else:
        (tmp_path / LOCK_NAME).write_text('{"host": "x", "pi')
    warnings = []
    lock = acquire_run_lock(tmp_path, warn=warnings.append)
    assert len(warnings) == 1 and "taking over the lock" in warnings[0]
    assert json.loads(lock.read_text())["pid"] == os.getpid()


@needs_fmnist
def test_a_second_job_on_the_same_out_dir_refuses_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    _hold(out, pid=1)
    rc = train_main(["--config", DEMO, "--out", str(out), "--run.stages=[mae]", *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "is in use by another job: pid 1" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    (out / LOCK_NAME).unlink()
    assert train_main(["--config", DEMO, "--out", str(out), "--run.stages=[mae]", *FAST]) == 0
    assert not (out / LOCK_NAME).exists()  # released at the end of the run
