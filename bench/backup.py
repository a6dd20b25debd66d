"""Backup, ``verify --read-data`` and restore-drill time beside restic and raw S3.

Run from the project root::

    .venv/bin/python bench/backup.py                 # 200 x 512 KiB records
    .venv/bin/python bench/backup.py --quick         # 40 x 512 KiB
    .venv/bin/python bench/backup.py --profile DIR   # + py-spy profiles of each phase

It brings up its own local stack (``LocalStack(home).up()``) in a temporary
MEDVAULT_HOME, writes the records through PutRecord (gRPC, mutual TLS, as the records
clerk), keeps the same plaintext as files in a scratch directory, then measures:

* **backup**: ``run_backup`` (what ``medvault backup run`` and the scheduler run) into a
  fresh, empty bucket on the same SeaweedFS, so every object is copied.
* **verify**: ``verify_backup(read_data=True)`` of that backup: signature, listing,
  every object re-read and hashed.
* **drill**: the full restore drill (``run_drill``, what ``medvault restore-drill`` and
  the scheduler run, with the service's own checks): restore into a scratch bucket and
  SQLite database, every record unwrapped, decrypted and digest-checked, the audit
  chain, the counts, the signed report.
* **restic** (Debian's ``restic``, ``apt-get install restic``): ``backup`` of the same
  plaintext files into a fresh local repository, ``check --read-data``, ``restore``.
* **raw copy / raw GET**: the ciphertext objects streamed GET -> PUT into a fresh bucket,
  and read whole, with the same number of parallel workers as medvault (``--workers``).

Medvault and the yardsticks alternate for ``--rounds`` rounds; the best round of each
phase counts (a noisy neighbour slows one round, not the method). Beside wall time, each
phase's CPU seconds are shown: for medvault this process (every thread) plus the
SeaweedFS server, for restic its own (``RUSAGE_CHILDREN``); on a machine shared with
other work the CPU figures move much less than the wall times. With ``--profile`` round 1
runs under py-spy (flame graph ``<phase>.svg`` and raw stacks ``<phase>.txt``) and does
not count unless it is the only round. Targets: medvault's
backup + verify + drill <= 2x restic's backup + check --read-data + restore; backup
>= 0.5x raw copy; verify >= 0.7x raw GET. The exit status is always 0: a benchmark
informs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keystore import Pkcs11SessionPool  # noqa: E402  (after the path fix)
from keystore.signing import Pkcs11Signer  # noqa: E402
from service import config as service_config  # noqa: E402
from service._gen.medvault.v1 import records_pb2 as pb  # noqa: E402
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc  # noqa: E402
from service.backup.drill import drill_checks  # noqa: E402
from service.bootstrap import blob_store, keystore_config  # noqa: E402
from service.localstack.stack import LocalStack  # noqa: E402
from service.signing.validation import SignatureValidator, load_pem_certificates  # noqa: E402
from storage.backup.drill import DrillRequest, run_drill  # noqa: E402
from storage.backup.runner import run_backup, source_identity  # noqa: E402
from storage.backup.scratch import s3_scratch  # noqa: E402
from storage.backup.targets import S3Target  # noqa: E402
from storage.backup.verify import verify_backup  # noqa: E402
from storage.s3_blobs import make_minio_client  # noqa: E402
from storage.sql_metadata import make_engine  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20
CHUNK = MIB
PATIENT = pb.PatientId(id="BENCH-BACKUP", assigning_authority="BENCH")
BACKUP_TARGET, VERIFY_TARGET, RESTIC_TARGET = 0.5, 0.7, 2.0
BACKUP_KEY = "medvault-backup-v1"
AUDIT_KEY = "medvault-audit-v1"


def _channel(stack: LocalStack, role: str) -> grpc.Channel:
    tls = stack.tls_client(role)
    creds = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )
    options = [("grpc.max_send_message_length", 4 * MIB)]
    return grpc.secure_channel(stack.endpoint(), creds, options=options)


def write_records(stack: LocalStack, sizes: list[int], files: Path) -> int:
    """PutRecord each size (random, incompressible content), and the same bytes as a file
    in ``files`` for restic; the plaintext bytes written."""
    with _channel(stack, "records_clerk") as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        for n, size in enumerate(sizes):
            data = os.urandom(size)
            (files / f"record-{n:06d}.bin").write_bytes(data)

            def requests(data: bytes = data) -> Iterator[pb.PutRecordRequest]:
                yield pb.PutRecordRequest(header=pb.RecordHeader(
                    patient=PATIENT, kind=pb.RECORD_KIND_OTHER,
                    content_type="application/octet-stream",
                    expected_sha256=hashlib.sha256(data).digest(),
                ))  # fmt: skip
                for i in range(0, len(data), CHUNK):
                    yield pb.PutRecordRequest(chunk=data[i : i + CHUNK])

            stub.PutRecord(requests(), timeout=600)
    return sum(sizes)


@contextmanager
def profiled(out: Path | None, name: str) -> Iterator[None]:
    """py-spy (from the venv) records this process while the block runs, when ``out``."""
    if out is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    runs = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(os.getpid()),
                "--rate",
                "250",
                "--format",
                fmt,
                "--output",
                str(out / f"{name}{suffix}"),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fmt, suffix in (("flamegraph", ".svg"), ("raw", ".txt"))
    ]
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        for run in runs:
            run.send_signal(signal.SIGINT)
        for run in runs:
            run.wait(timeout=60)


class Bench:
    """The stack's database, record bucket, token and a raw client, opened once."""

    def __init__(self, stack: LocalStack, workers: int, files: Path) -> None:
        self.config = service_config.load(stack.layout.config)
        s3 = self.config.s3
        self.client = make_minio_client(
            s3.endpoint,
            service_config.read_secret(s3.access_key_env, s3.access_key_file),
            service_config.read_secret(s3.secret_key_env, s3.secret_key_file),
            secure=s3.secure, ca_file=s3.ca_file or None,
        )  # fmt: skip
        self.engine = make_engine(self.config.database.url)
        self.blobs = blob_store(self.config)
        self.pool = Pkcs11SessionPool(keystore_config(self.config))
        self.signer = Pkcs11Signer(self.pool, BACKUP_KEY)
        anchors = self.config.signing.trust_anchors
        self.checks = drill_checks(
            self.pool, SignatureValidator(load_pem_certificates(anchors) if anchors else []),
            audit_key_label=AUDIT_KEY, backup_key_label=BACKUP_KEY,
        )  # fmt: skip
        self.workers = workers
        self.files = files
        self.part_size = s3.part_size
        self.objects = [
            (o.object_name, int(o.size or 0))
            for o in self.client.list_objects(self.blobs.bucket, recursive=True)
        ]
        self.bytes = sum(size for _, size in self.objects)
        self.buckets: list[str] = []
        self.last_target = ""

    def close(self) -> None:
        for bucket in self.buckets:  # throw-away buckets of this run
            self.empty(bucket)
        self.pool.close()
        self.engine.dispose()

    def empty(self, bucket: str) -> None:
        for o in self.client.list_objects(bucket, recursive=True):
            self.client.remove_object(bucket, o.object_name)
        self.client.remove_bucket(bucket)

    def fresh_bucket(self, prefix: str) -> str:
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.client.make_bucket(name)
        self.buckets.append(name)
        return name

    def _parallel(self, fn: Callable[[tuple[str, int]], int]) -> int:
        with ThreadPoolExecutor(self.workers) as pool:
            return sum(pool.map(fn, self.objects))

    def raw_copy(self) -> float:
        """Every record object: GET streamed into PUT, into a fresh bucket."""
        bucket = self.fresh_bucket("bench-rawcopy")

        def copy(item: tuple[str, int]) -> int:
            key, size = item
            response = self.client.get_object(self.blobs.bucket, key)
            try:
                self.client.put_object(bucket, key, response, size, part_size=self.part_size)
            finally:
                response.close()
                response.release_conn()
            return size

        start = time.perf_counter()
        self._parallel(copy)
        return time.perf_counter() - start

    def raw_get(self) -> float:
        """Every record object read whole."""

        def get(item: tuple[str, int]) -> int:
            response = self.client.get_object(self.blobs.bucket, item[0])
            try:
                return sum(len(c) for c in response.stream(MIB))
            finally:
                response.close()
                response.release_conn()

        start = time.perf_counter()
        self._parallel(get)
        return time.perf_counter() - start

    def backup(self) -> tuple[float, S3Target, str]:
        """``run_backup`` into a fresh bucket (everything copied)."""
        target = S3Target(self.client, self.fresh_bucket("bench-backup"))
        self.last_target = self.buckets[-1]
        source = source_identity(self.engine, self.blobs.bucket, self.config.s3.endpoint)
        start = time.perf_counter()
        result = run_backup(
            self.engine, self.blobs, target, self.signer, source, workers=self.workers
        )
        return time.perf_counter() - start, target, result.backup_id

    def verify(self, target: S3Target, backup_id: str) -> float:
        start = time.perf_counter()
        report = verify_backup(
            target, backup_id, trusted_public_key=self.signer.public_key_der(),
            read_data=True, workers=self.workers,
        )  # fmt: skip
        if not report.ok:
            raise SystemExit(f"verify failed: {report.failures[:3]}")
        return time.perf_counter() - start

    def drill(self, target: S3Target, backup_id: str, **how: object) -> float:
        """The restore drill (full unless ``sample``), with the checks the service builds.

        ``workers`` and ``sample`` are passed only to a tree that has them, so the same
        bench measures the serial drill of an older commit for a before/after figure.
        """
        if "workers" in DrillRequest.__dataclass_fields__:
            how["workers"] = self.workers
        start = time.perf_counter()
        request = DrillRequest(target, backup_id, s3_scratch(self.client), **how)  # type: ignore[arg-type]
        report = run_drill(request, self.checks)
        if not report.ok:
            raise SystemExit(f"drill failed: {report.failures[:3]}")
        return time.perf_counter() - start

    def sampled_drill(self, target: S3Target, backup_id: str) -> float | None:
        """A sampled drill (confidence 0.95, defect rate 0.05: 59 records); None on a
        tree without sampled drills."""
        if "sample" not in DrillRequest.__dataclass_fields__:
            return None
        from storage.backup.sampling import SamplePlan  # noqa: PLC0415  (newer trees only)

        return self.drill(target, backup_id, sample=SamplePlan(0.95, 0.05, os.urandom(16)))


class Restic:
    """Debian's restic on the same plaintext files, into a fresh local repository."""

    def __init__(self, files: Path, scratch: Path) -> None:
        binary = shutil.which("restic")
        if binary is None:
            raise SystemExit("restic not found: apt-get install -y restic")
        self.binary, self.files, self.scratch = binary, files, scratch
        self.env = {**os.environ, "RESTIC_PASSWORD": secrets.token_hex(16),
                    "RESTIC_CACHE_DIR": str(scratch / "cache")}  # fmt: skip

    def version(self) -> str:
        return self._run("version").split(" compiled")[0]

    def _run(self, *args: str) -> str:
        done = subprocess.run([self.binary, *args], env=self.env, capture_output=True,
                              text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"restic {args[0]} failed: {done.stderr.strip()[:500]}")
        return done.stdout

    def _timed(self, *args: str) -> tuple[float, float]:
        """Wall seconds and CPU seconds (user + system) of one restic command."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        self._run(*args)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return wall, cpu

    def round(self) -> dict[str, tuple[float, float]]:
        """init (untimed), backup, check --read-data, restore; then remove it all."""
        repo, into = self.scratch / "repo", self.scratch / "restored"
        for path in (repo, into, self.scratch / "cache"):
            shutil.rmtree(path, ignore_errors=True)
        self._run("init", "--repo", str(repo))
        times = {
            "backup": self._timed("--repo", str(repo), "backup", "--quiet", str(self.files)),
            "check": self._timed("--repo", str(repo), "check", "--read-data"),
            "restore": self._timed("--repo", str(repo), "restore", "latest", "--target", str(into)),
        }
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(into, ignore_errors=True)
        return times


class Meter:
    """Wall and CPU seconds of a medvault phase: this process (every thread) plus the
    SeaweedFS server it talks to, so work moved to the server is counted too."""

    def __init__(self, weed_pid: int) -> None:
        self._stat = Path(f"/proc/{weed_pid}/stat")

    def _weed_cpu(self) -> float:
        fields = self._stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @contextmanager
    def phase(self, into: dict[str, tuple[float, float]], name: str) -> Iterator[None]:
        wall, cpu, weed = time.perf_counter(), time.process_time(), self._weed_cpu()
        yield
        server = self._weed_cpu() - weed
        into[name] = (time.perf_counter() - wall, time.process_time() - cpu + server)
        into[f"{name} S3"] = (0.0, server)


Best = dict[str, tuple[float, float]]  # phase -> (best wall seconds, best CPU seconds)


def measure(bench: Bench, restic: Restic, rounds: int, profile: Path | None,
            meter: Meter) -> Best:  # fmt: skip
    """Best wall and CPU seconds of each phase over ``rounds`` alternating rounds."""
    best: Best = {}

    def keep(name: str, seconds: float, cpu: float = 0.0) -> None:
        wall0, cpu0 = best.get(name, (seconds, cpu))
        best[name] = (min(wall0, seconds), min(cpu0, cpu))

    for n in range(1, rounds + 1):
        keep("raw copy", bench.raw_copy())
        keep("raw GET", bench.raw_get())
        first = profile if n == 1 else None
        got: dict[str, tuple[float, float]] = {}
        with profiled(first, "backup"), meter.phase(got, "backup"):
            _, target, backup_id = bench.backup()
        with profiled(first, "verify"), meter.phase(got, "verify"):
            bench.verify(target, backup_id)
        with profiled(first, "drill"), meter.phase(got, "drill"):
            bench.drill(target, backup_id)
        with meter.phase(got, "sampled drill"):
            sampled = bench.sampled_drill(target, backup_id)
        if sampled is None:
            del got["sampled drill"], got["sampled drill S3"]
        if first is None or rounds == 1:  # py-spy's attach and sampling would count
            for name, (seconds, cpu) in got.items():
                keep(name, seconds, cpu)
        bench.empty(bench.last_target)
        bench.buckets.remove(bench.last_target)
        for name, (seconds, cpu) in restic.round().items():
            keep(f"restic {name}", seconds, cpu)
        print(f"  round {n}/{rounds} done", flush=True)
    return best


def report(best: Best, bench: Bench, restic: Restic, plaintext: int) -> None:
    records = len(bench.objects)
    print(f"\n{records} records, {plaintext / MIB:.0f} MiB of plaintext, "
          f"{bench.bytes / MIB:.0f} MiB of ciphertext; {bench.workers} workers; "
          f"{restic.version()}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores\n")  # fmt: skip
    print(f"{'phase':<16} {'wall s':>7} {'MiB/s':>7} {'rec/s':>7} {'CPU s':>7} {'of it S3':>8}")
    pairs = (("backup", "restic backup"), ("verify", "restic check"),
             ("drill", "restic restore"))  # fmt: skip
    for ours, theirs in pairs:
        for name in (ours, theirs):
            s, cpu = best[name]
            server = f"{best[name + ' S3'][1]:8.2f}" if name == ours else ""
            print(f"{name:<16} {s:7.2f} {plaintext / MIB / s:7.1f} {records / s:7.1f} {cpu:7.2f} "
                  f"{server}")  # fmt: skip
        ratio, cpu_ratio = best[ours][0] / best[theirs][0], best[ours][1] / best[theirs][1]
        print(f"{'  ratio':<16} {ratio:6.2f}x {'':>15} {cpu_ratio:6.2f}x")
    if "sampled drill" in best:
        s, cpu = best["sampled drill"]
        s3_cpu = best["sampled drill S3"][1]
        print(
            f"{'sampled drill':<16} {s:7.2f} {'':>7} {'':>7} {cpu:7.2f} {s3_cpu:8.2f}   "
            "(59 records decrypted: confidence 0.95, defect rate 0.05; informative)"
        )
    total = sum(best[p][0] for p, _ in pairs)
    restic_total = sum(best[p][0] for _, p in pairs)
    total_cpu = sum(best[p][1] for p, _ in pairs)
    theirs_cpu = sum(best[p][1] for _, p in pairs)
    ratio = total / restic_total
    verdict = "PASS" if ratio <= RESTIC_TARGET else "MISS"
    print(f"\nmedvault backup + verify --read-data + drill: {total:.2f} s wall, {total_cpu:.2f} "
          f"s CPU; restic backup + check --read-data + restore: {restic_total:.2f} s wall, "
          f"{theirs_cpu:.2f} s CPU")  # fmt: skip
    print(f"medvault / restic: {ratio:.2f}x wall (target <= {RESTIC_TARGET}x) {verdict}; "
          f"{total_cpu / theirs_cpu:.2f}x CPU")  # fmt: skip
    for what, base, target in (("backup", "raw copy", BACKUP_TARGET),
                               ("verify", "raw GET", VERIFY_TARGET)):  # fmt: skip
        speed = best[base][0] / best[what][0]
        verdict = "PASS" if speed >= target else "MISS"
        print(f"{what} speed / {base}: {speed:.2f}x (target >= {target}x) {verdict}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 records instead of 200")
    parser.add_argument("--records", type=int, help="number of records (default 200)")
    parser.add_argument("--size-kib", type=int, default=512, help="record size (default 512)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--workers", type=int, default=4, help="parallel transfers (default 4)")
    parser.add_argument("--profile", type=Path, help="write py-spy profiles of round 1 here")
    parser.add_argument("--home", type=Path, help="stack home (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    count = ns.records if ns.records is not None else (40 if ns.quick else 200)
    home = ns.home or Path(tempfile.mkdtemp(prefix="medvault-bench-"))
    scratch = Path(tempfile.mkdtemp(prefix="medvault-bench-restic-"))
    files = scratch / "files"
    files.mkdir()
    if ns.profile:
        ns.profile.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(home, report=lambda line: print(f"  [stack] {line}", flush=True))
    try:
        restic = Restic(files, scratch)
        stack.up()
        start = time.perf_counter()
        written = write_records(stack, [ns.size_kib * KIB] * count, files)
        print(f"  wrote {count} records ({written / MIB:.0f} MiB) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        bench = Bench(stack, ns.workers, files)
        try:
            meter = Meter(int((stack.layout.s3_dir / "weed.pid").read_text().strip()))
            best = measure(bench, restic, ns.rounds, ns.profile, meter)
            report(best, bench, restic, written)
        finally:
            bench.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not ns.keep:
            stack.down()
            if ns.home is None:
                shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
