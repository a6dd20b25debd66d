"""One worker process of a supervised server (``service.supervisor``): what differs.

A worker serves exactly as a lone server does, with three differences: it shares the
port with its siblings (SO_REUSEPORT), it tells the supervisor when it serves (a line
on an inherited pipe), and it dies with the supervisor (Linux's parent-death signal),
so a supervisor killed by SIGKILL leaves no worker serving behind it. Only worker 0
runs the DICOM and MLLP listeners (docs/performance.md, "Several processes").
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from types import FrameType

from service import logs

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """This process is worker ``index`` of the supervisor ``supervisor_pid``."""

    index: int
    ready_fd: int
    supervisor_pid: int
    # A reload (SIGHUP) forwarded while this worker starts: it may have read the policy
    # and CRL before the new files were written, so it reloads once it can.
    _reload_missed: threading.Event = field(default_factory=threading.Event, compare=False)

    @property
    def listens_for_hospital_protocols(self) -> bool:
        """Whether this worker runs the DICOM and MLLP listeners (worker 0 only)."""
        return self.index == 0

    def enter(self) -> None:
        """Tag the log, and stop (SIGTERM) when the supervisor dies; call first thing."""
        logs.set_worker(self.index)
        # A reload forwarded while this worker starts must not kill it (SIGHUP's default),
        # nor be lost: it may come after the policy or the CRL was read (a revoked
        # certificate would stay served by this worker). Noted here, done by
        # ``reload_if_missed`` once serve() has installed the reload.
        signal.signal(signal.SIGHUP, self._note_reload)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != self.supervisor_pid:  # it died before the signal was set
            raise SystemExit("medvault worker: the supervisor is gone; not starting")

    def _note_reload(self, _signum: int, _frame: FrameType | None) -> None:
        self._reload_missed.set()

    def reload_if_missed(self) -> None:
        """Send this process the SIGHUP it received during start-up again; call after the
        reload handler is installed (a second reload of unchanged files is harmless)."""
        if self._reload_missed.is_set():
            log.info("reload requested during start-up; reloading now")
            os.kill(os.getpid(), signal.SIGHUP)

    def ready(self, port: int) -> None:
        """Tell the supervisor this worker serves (it may have stopped listening)."""
        log.info("worker serving", extra={"port": port, "pid": os.getpid()})
        try:
            os.write(self.ready_fd, b"ready\n")
        except OSError:
            pass  # a restarted worker's supervisor does not wait for the line
        finally:
            os.close(self.ready_fd)
