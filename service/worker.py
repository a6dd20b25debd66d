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
from dataclasses import dataclass

from service import logs

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """This process is worker ``index`` of the supervisor ``supervisor_pid``."""

    index: int
    ready_fd: int
    supervisor_pid: int

    @property
    def listens_for_hospital_protocols(self) -> bool:
        """Whether this worker runs the DICOM and MLLP listeners (worker 0 only)."""
        return self.index == 0

    def enter(self) -> None:
        """Tag the log, and stop (SIGTERM) when the supervisor dies; call first thing."""
        logs.set_worker(self.index)
        # A reload forwarded while this worker starts must not kill it (SIGHUP's default);
        # it reads the policy and CRL as it starts, then serve() installs the reload.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != self.supervisor_pid:  # it died before the signal was set
            raise SystemExit("medvault worker: the supervisor is gone; not starting")

    def ready(self, port: int) -> None:
        """Tell the supervisor this worker serves (it may have stopped listening)."""
        log.info("worker serving", extra={"port": port, "pid": os.getpid()})
        try:
            os.write(self.ready_fd, b"ready\n")
        except OSError:
            pass  # a restarted worker's supervisor does not wait for the line
        finally:
            os.close(self.ready_fd)
