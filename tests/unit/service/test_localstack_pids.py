"""A pid file outlives its process, and its pid comes round again (``pid_max`` is 32768
on the CI machine, and every thread takes a pid): the local stack must never take
another stack's (or a test's) server for its own, nor signal it on ``down``.

The strangers are real processes whose command lines look like the real ones but name
another stack's files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.localstack.seaweed import SeaweedServer
from service.localstack.seaweed_cluster import SeaweedCluster
from service.localstack.service_proc import ServiceProcess

SLEEP = "import time; time.sleep(60)"


@pytest.fixture
def strangers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def _stranger(strangers: list[subprocess.Popen[bytes]], argv0: str, *args: str) -> int:
    process = subprocess.Popen([argv0, "-c", SLEEP, *args], executable=sys.executable)
    strangers.append(process)
    # Until it has exec'd, its command line is still this process's.
    cmdline = Path(f"/proc/{process.pid}/cmdline")
    deadline = time.monotonic() + 30
    while cmdline.read_bytes().split(b"\0")[0] != argv0.encode():
        assert time.monotonic() < deadline, "the stranger did not start"
        time.sleep(0.01)
    return process.pid


def test_a_recycled_pid_of_another_stacks_service_is_not_ours(
    tmp_path: Path, strangers: list[subprocess.Popen[bytes]]
) -> None:
    mine, theirs = tmp_path / "mine" / "config.toml", tmp_path / "theirs" / "config.toml"
    pid = _stranger(strangers, sys.executable, "service", "serve", "--config", str(theirs))
    pid_file = tmp_path / "mine" / "service.pid"
    pid_file.parent.mkdir()
    pid_file.write_text(f"{pid}\n")

    own = ServiceProcess(mine, pid_file, tmp_path / "mine.log")
    assert own.pid is None
    assert own.stop() is False
    assert strangers[0].poll() is None, "down signalled another stack's server"
    assert not pid_file.exists(), "the stale pid file is kept"
    # The check is not blind: the same process, for the config it names, is found.
    theirs_file = tmp_path / "theirs.pid"
    theirs_file.write_text(f"{pid}\n")
    assert ServiceProcess(theirs, theirs_file, tmp_path / "theirs.log").pid == pid


def test_a_recycled_pid_of_another_weed_is_not_ours(
    tmp_path: Path, strangers: list[subprocess.Popen[bytes]]
) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    pid = _stranger(strangers, "weed", "server", f"-dir={theirs / 'data'}")
    own = SeaweedServer(mine, 1, "key", "secret")
    (mine / "weed.pid").write_text(f"{pid}\n")
    assert own.pid is None
    own.stop(timeout=1)
    assert strangers[0].poll() is None, "down signalled another stack's weed"
    # A cluster component's pid file too.
    (mine / "master.pid").write_text(f"{pid}\n")
    assert SeaweedCluster(mine, tmp_path, 1, "key", "secret").pid("master") is None
    # Not blind: the weed of ``theirs`` is found by a server kept there.
    theirs.mkdir()
    (theirs / "weed.pid").write_text(f"{pid}\n")
    assert SeaweedServer(theirs, 1, "key", "secret").pid == pid


def test_another_users_process_at_the_pid_is_not_our_weed(
    tmp_path: Path, strangers: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pid came round to another user's process: the kernel refuses to signal it
    (EPERM, stood in for here: this test may run as root, whom it never refuses). It is
    not the stack's weed: ``up`` must start one, ``down`` must not fail on it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    pid = _stranger(strangers, "weed", "server", f"-dir={mine / 'data'}")
    kill = os.kill

    def refusing(target: int, sig: int) -> None:
        if target == pid:
            raise PermissionError(1, "Operation not permitted")
        kill(target, sig)

    monkeypatch.setattr(os, "kill", refusing)
    (mine / "weed.pid").write_text(f"{pid}\n")
    own = SeaweedServer(mine, 1, "key", "secret")
    assert own.pid is None
    own.stop(timeout=1)  # no PermissionError out of `down`
    assert not (mine / "weed.pid").exists(), "the stale pid file is kept"
    (mine / "master.pid").write_text(f"{pid}\n")
    assert SeaweedCluster(mine, tmp_path, 1, "key", "secret").pid("master") is None


def test_a_symbolic_link_loop_in_a_strangers_arguments_is_not_an_error(
    tmp_path: Path, strangers: list[subprocess.Popen[bytes]]
) -> None:
    """Paths in a stranger's command line are resolved; a loop (RuntimeError on Python
    3.11) must leave status, up and down working, the stranger not ours."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    mine = tmp_path / "mine"
    mine.mkdir()
    weed = _stranger(strangers, "weed", "server", f"-dir={loop / 'data'}")
    (mine / "weed.pid").write_text(f"{weed}\n")
    assert SeaweedServer(mine, 1, "key", "secret").pid is None
    serve = _stranger(strangers, sys.executable, "service", "serve", "--config", str(loop))
    pid_file = mine / "service.pid"
    pid_file.write_text(f"{serve}\n")
    assert ServiceProcess(mine / "config.toml", pid_file, mine / "service.log").pid is None
    assert all(process.poll() is None for process in strangers)
