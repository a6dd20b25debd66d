"""Profile the service during a stream of PutRecord or GetRecord calls with py-spy.

Run from the project root (py-spy must be installed: ``pip install py-spy``)::

    .venv/bin/python bench/profile_ops.py --size 512KiB --seconds 20 --out /tmp/prof

It brings up its own local stack in a temporary MEDVAULT_HOME (as ``bench/put_get.py``
does), starts ``py-spy record`` on the service's pid, drives puts (then, separately,
gets) from one client for ``--seconds`` each, and writes per phase: a flame graph
(``put.svg``, ``get.svg``), the collapsed stacks (``put.txt``) and a summary of the
functions with the most samples, by self time and by inclusive time, restricted to
medvault's own packages and the libraries they call. Idle threads (waiting on a queue,
a condition or epoll) are excluded with ``--idle`` off, py-spy's default.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from put_get import CHUNK, Medvault  # noqa: E402

from service.localstack.stack import LocalStack  # noqa: E402

KIB = 1 << 10
SIZES = {"4KiB": 4 * KIB, "64KiB": 64 * KIB, "512KiB": 512 * KIB, "1MiB": KIB * KIB}


def _drive(fn: Callable[[], object], seconds: float) -> int:
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        fn()
        n += 1
    return n


def _cpu(pid: str) -> float:
    """User + system CPU seconds of the service process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def summarise(collapsed: Path, top: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue  # the rest of a frame name py-spy wrote across lines
        count = int(count_s)
        total += count
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]  # fmt: skip
        if frames:
            self_counts[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
        threads[_thread_entry(frames)] += count
        parts[component(frames)] += count
    out = [f"total samples {total}", "", "by thread (its entry function):"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in threads.most_common(8)]
    out += ["", "by component (first rule of COMPONENTS that a frame of the sample matches):"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in parts.most_common()]
    out += ["", "self:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_counts.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top * 2)]
    return "\n".join(out)


# Where a sample's time belongs, by the first rule with a frame that starts with one of
# its prefixes (checked in order: a worker's S3 call is "S3 client", not "worker").
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("commit tagger thread (S3 tag after each put)", ("CommitTagger.",)),
    ("audit writer thread", ("AuditTrail._run",)),
    ("S3 client (minio, urllib3) in a worker", ("Minio.",)),
    ("token (PKCS#11) in a worker", ("Pkcs11",)),
    ("grant check (SQL + MAC)", ("SqlGrantStore.",)),
    ("record row read (SQL)", ("SqlMetadataStore.",)),
    ("row verification (MAC, seals)", ("RowVerifier.",)),
    ("crypto (AEAD, digests)", ("StreamingAead.", "_Meter.")),
    ("other worker work (store, guard)", ("RecordServicer._", "_WorkItem.run")),
    ("interceptors (edge, metrics) on the loop", ("EdgeInterceptor.", "MetricsInterceptor.")),
    ("gRPC event loop (grpcio callbacks, messages)", ("BaseEventLoop.", "Handle._run")),
)


def component(frames: list[str]) -> str:
    """The COMPONENTS name of a sample (its frames root first), or "other"."""
    for name, prefixes in COMPONENTS:
        if any(frame.startswith(prefixes) for frame in frames):
            return name
    return "other"


def _thread_entry(frames: list[str]) -> str:
    """What a sample's thread runs: the frame under ``Thread.run`` (the audit writer's
    ``AuditTrail._run``, a pool's ``_worker``), or the main thread."""
    for i, frame in enumerate(frames[:-1]):
        if frame.startswith("Thread.run ("):
            return frames[i + 1]
    return "main thread" if frames and not frames[0].startswith("Thread.") else "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="512KiB", choices=SIZES)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=Path("bench-profile"))
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--gil", action="store_true",
                   help="sample only the GIL holder (where Python CPU goes)")  # fmt: skip
    p.add_argument("--idle", action="store_true",
                   help="keep waiting threads' samples, one root per thread: where each "
                        "thread's wall time goes, waits included (a call's timeline)")  # fmt: skip
    p.add_argument("--native", action="store_true",
                   help="also sample C frames (grpc's core, OpenSSL, SQLite); py-spy then "
                        "pauses the service at each sample, which slows it")  # fmt: skip
    ns = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    ns.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="medvault-prof-"))
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    try:
        stack.prepare()
        # One service process: py-spy and the CPU figures follow the pid file's process.
        config, text = stack.layout.config, stack.layout.config.read_text()
        if "\nprocesses = " not in text:
            config.write_text(text.replace("[server]\n", "[server]\nprocesses = 1\n", 1))
        stack.up()
        pid = stack.layout.service_pid.read_text().strip()
        medvault = Medvault(stack)
        size = SIZES[ns.size]
        data = bytes(range(256)) * (size // 256)
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
        digest = hashlib.sha256(data).digest()
        ids = [medvault.put(chunks, digest) for _ in range(3)]  # warm up
        for phase in ("put", "get"):
            base = ns.out / phase
            fmt_runs = []
            for fmt, suffix in (("flamegraph", ".svg"), ("raw", ".txt")):
                fmt_runs.append(subprocess.Popen(
                    [spy, "record", "--pid", pid, "--rate", str(ns.rate), "--duration",
                     str(int(ns.seconds)), "--format", fmt, "--output", str(base) + suffix,
                     *(["--native"] if ns.native else ["--nonblocking"]),
                     *(["--gil"] if ns.gil else []),
                     *(["--idle", "--threads"] if ns.idle else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))  # fmt: skip
            time.sleep(1.0)
            cpu_before = _cpu(pid)
            if phase == "put":
                n = _drive(lambda: ids.append(medvault.put(chunks, digest)), ns.seconds)
            else:
                reads = iter(ids * 1000)
                n = _drive(lambda reads=reads: medvault.get(next(reads)), ns.seconds)
            cpu_ms = (_cpu(pid) - cpu_before) * 1000 / max(n, 1)
            for run in fmt_runs:
                run.wait(timeout=ns.seconds + 60)
            print(f"\n== {phase} {ns.size}: {n} ops in {ns.seconds:.0f} s "
                  f"({n / ns.seconds:.1f}/s), service CPU {cpu_ms:.1f} ms per op "
                  f"(py-spy's own sampling included)")  # fmt: skip
            summary = summarise(Path(str(base) + ".txt"))
            (ns.out / f"{phase}-summary.txt").write_text(summary)
            print(summary)
        medvault.close()
    finally:
        stack.down()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
