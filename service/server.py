"""The gRPC server: RecordService, health and reflection, over mutual TLS by default."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import sqlalchemy as sa
from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, start_http_server

from service import allocator
from service._gen.medvault.v1 import (
    access_pb2,
    access_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    backup_pb2,
    backup_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    records_pb2,
    records_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
    stats_pb2,
    stats_pb2_grpc,
)
from service.access_servicer import AccessServicer
from service.audit_servicer import AuditServicer
from service.authz.policy import install_sighup
from service.backup_servicer import BackupServicer
from service.bootstrap import Components, build
from service.call_scope import ContextExecutor
from service.config import Config, ConfigError, ServerConfig
from service.edge import Deadlines, EdgeInterceptor, refusal_reporter
from service.health import Probe, probe_forever
from service.keys_servicer import KeyServicer
from service.limits import CallLimiter, UploadGate
from service.metrics import MetricsInterceptor, ScheduledRunsCollector
from service.mllp import listener as mllp_listener
from service.records_servicer import RecordServicer
from service.signing_servicer import SigningServicer
from service.stats_servicer import StatsServicer
from service.worker import WorkerRole
from storage import sweep_if_due

if TYPE_CHECKING:
    from service.dicom import DicomListener

log = logging.getLogger(__name__)
# Room for one content chunk plus the message framing around it.
_FRAME_OVERHEAD = 64 << 10


def _credentials(config: Config) -> grpc.ServerCredentials:
    tls = config.tls
    try:
        key, cert = Path(tls.key).read_bytes(), Path(tls.cert).read_bytes()
        client_ca = Path(tls.client_ca).read_bytes()
    except OSError as e:
        raise ConfigError(f"[tls] cannot read {e.filename}: {e.strerror}") from e
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=True
    )


def server_options(config: Config, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """Transport limits: message sizes, keepalive, streams per connection (README).

    ``reuse_port`` only for a supervisor's workers, which share the port on purpose.
    """
    server = config.server
    limit = server.chunk_size + _FRAME_OVERHEAD
    keepalive_ms = int(server.keepalive_seconds * 1000)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Room for a delegation token (authn refuses one over 16 KiB) and the usual headers.
        ("grpc.max_metadata_size", 32 << 10),
        ("grpc.max_concurrent_streams", server.max_streams_per_connection),
        # Ping idle connections so dead peers are noticed; close connections with no call.
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", int(server.keepalive_timeout_seconds * 1000)),
        ("grpc.max_connection_idle_ms", int(server.max_connection_idle_seconds * 1000)),
        # Clients may ping at most every keepalive/2 s; a client pinging faster is cut off.
        ("grpc.http2.min_ping_interval_without_data_ms", max(1000, keepalive_ms // 2)),
        ("grpc.http2.max_ping_strikes", 2),
        # gRPC sets SO_REUSEPORT by default: a second server on the same port would then
        # start too and share its connections. A taken port must fail the start instead.
        # A supervisor's workers share it on purpose; the supervisor checked it was free
        # and holds it (service.supervisor).
        ("grpc.so_reuseport", int(reuse_port)),
    ]


def edge_interceptor(config: Config, components: Components) -> EdgeInterceptor:
    """The interceptor that enters, limits and times every call (``service.edge``)."""
    server = config.server
    limiter = CallLimiter(
        server.principal_share, server.application_share, server.refusal_summary_seconds,
        refusal_reporter(components.guard),
    )  # fmt: skip
    deadlines = Deadlines(
        server.first_message_seconds, server.idle_seconds, server.min_upload_bytes_per_second
    )
    return EdgeInterceptor(components.guard, limiter, deadlines)


async def create_server(
    config: Config,
    components: Components,
    edge: EdgeInterceptor | None = None,
    *,
    reuse_port: bool = False,
) -> tuple[aio.Server, int]:
    """A started asyncio server with every service registered; returns it and its port."""
    server = aio.server(
        # Metrics outermost: a call refused at the edge is still counted, with its code.
        interceptors=[
            MetricsInterceptor(_registered_methods()),
            edge or edge_interceptor(config, components),
        ],
        options=server_options(config, reuse_port=reuse_port),
        # Fairness comes from the per-principal shares (service.limits); this global cap
        # is only a backstop far above them, since whoever fills it locks everyone out.
        maximum_concurrent_rpcs=config.server.max_concurrent_rpcs,
    )
    app = components.app  # the use cases; the servicers get nothing else
    records_pb2_grpc.add_RecordServiceServicer_to_server(
        RecordServicer(
            app.records, app.access, config.server.chunk_size,
            UploadGate(config.server.upload_cap),
        ),
        server,
    )
    access_pb2_grpc.add_AccessServiceServicer_to_server(
        AccessServicer(app.records, app.access), server
    )
    audit_pb2_grpc.add_AuditServiceServicer_to_server(
        AuditServicer(app.records, app.access, app.audit), server
    )
    signing_pb2_grpc.add_SigningServiceServicer_to_server(
        SigningServicer(app.signing, app.access), server
    )
    keys_pb2_grpc.add_KeyServiceServicer_to_server(
        # The KekManager itself until KeyServicer takes the KekRegistry role (issue #9).
        KeyServicer(components.kek, app.access, components.pool), server
    )
    backup_pb2_grpc.add_BackupServiceServicer_to_server(
        BackupServicer(app.backups, app.access), server
    )
    stats_pb2_grpc.add_StatsServiceServicer_to_server(StatsServicer(app.stats, app.access), server)
    health_servicer = health.aio.HealthServicer()  # the package's public alias
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [service.full_name for service in _medvault_services()]
    names = (*services, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    try:
        if config.tls.enabled:
            port = server.add_secure_port(config.server.listen, _credentials(config))
        else:
            log.warning("TLS is disabled: clients are not authenticated")
            port = server.add_insecure_port(config.server.listen)
    except RuntimeError:  # grpc's "Failed to bind": taken, or not an address of this host
        port = 0
    if port == 0:
        raise ConfigError(
            f"[server] cannot listen on {config.server.listen} (port taken or address invalid)"
        )
    await server.start()
    for name in ("", *services):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    prober = asyncio.create_task(probe_forever(
        health_servicer, dependency_probes(components), config.server.health_probe_seconds
    ))  # fmt: skip
    _BACKGROUND.add(prober)  # a reference, so the task is not collected while it runs
    prober.add_done_callback(_BACKGROUND.discard)
    return server, port


_BACKGROUND: set[asyncio.Task[None]] = set()


def dependency_probes(components: Components) -> list[Probe]:
    """The cheapest real operation on each dependency (``service.health``)."""

    def database() -> None:
        with components.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))

    def object_store() -> None:
        next(iter(components.blobs.list("medvault-health-probe/")), None)

    def token() -> None:
        components.pool.run(lambda session: session.generate_random(64))

    return [Probe("database", database), Probe("object_store", object_store),
            Probe("token", token)]  # fmt: skip


def _medvault_services() -> list[ServiceDescriptor]:
    """The medvault services this server registers, from their generated descriptors."""
    return [
        module.DESCRIPTOR.services_by_name[name]
        for module, name in (
            (records_pb2, "RecordService"), (access_pb2, "AccessService"),
            (audit_pb2, "AuditService"), (signing_pb2, "SigningService"),
            (keys_pb2, "KeyService"), (backup_pb2, "BackupService"),
            (stats_pb2, "StatsService"),
        )
    ]  # fmt: skip


def _registered_methods() -> frozenset[str]:
    """Every ``/package.Service/Method`` this server registers (the metrics' labels)."""
    methods = {f"/{s.full_name}/{m.name}" for s in _medvault_services() for m in s.methods}
    methods |= {f"/{health.SERVICE_NAME}/Check", f"/{health.SERVICE_NAME}/Watch"}
    return frozenset(methods)


def sweep_interval(server: ServerConfig) -> float:
    """Seconds between sweeps: configured, or a quarter of the grace (at least a minute)."""
    return server.orphan_sweep_seconds or max(60.0, server.orphan_grace_seconds / 4)


# After a replica's first (full) sweep, later sweeps look for untagged referenced objects
# among those modified within this long: an object the write path failed to tag.
BACKFILL_LOOKBACK = timedelta(days=1)


def _sweep_forever(config: Config, components: Components, stop: threading.Event) -> None:
    """Sweep orphans once per interval across all replicas (DESIGN: scheduled work).

    This replica's first sweep checks the tag of every referenced object (records stored
    before tags existed, or whose tagging failed); later ones only recent objects.
    """
    interval = sweep_interval(config.server)
    grace = timedelta(seconds=config.server.orphan_grace_seconds)
    replica = f"{socket.gethostname()}:{os.getpid()}"
    backfill: timedelta | None = None
    while not stop.wait(interval):
        try:
            swept = sweep_if_due(
                components.work_ledger, components.blobs, components.metadata,
                grace=grace, interval=timedelta(seconds=interval), replica=replica,
                backfill=backfill, on_missing_row=components.missing_row,
                wait=stop.wait, on_lock_held=partial(_sweep_lock_held, components),
            )  # fmt: skip
            if swept is not None:
                backfill = BACKFILL_LOOKBACK
                if components.put_requests is not None:
                    components.put_requests.prune()  # expired PutRecord request ids
        except Exception:  # a failed sweep is retried next round; the service stays up
            log.exception("orphan sweep failed")


def _sweep_lock_held(components: Components, resource: str) -> None:
    """A sweep round run without the election lock: a ``run-missed`` incident."""
    components.guard.incidents.tampered(
        "run-missed", resource,
        "orphan sweep's election lock held for the whole grace by a session that claimed "
        "no round (a database writer's?); the round was swept without the lock",
    )  # fmt: skip


async def _serve(config: Config, components: Components, worker: WorkerRole | None) -> None:
    loop = asyncio.get_running_loop()
    # The store's blocking calls run here; the default pool (cores + 4) is far too small.
    loop.set_default_executor(
        ContextExecutor(2 * config.server.workers, thread_name_prefix="store")
    )
    edge = edge_interceptor(config, components)
    # HL7 v2 over MLLP (service.mllp) listens before gRPC reports SERVING.
    app = components.app
    hospital = worker is None or worker.listens_for_hospital_protocols
    mllp = None
    if config.mllp.listen and hospital:
        mllp = mllp_listener(config, app.records, app.access)
        await mllp.start()
    server, port = await create_server(config, components, edge, reuse_port=worker is not None)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info(
        "serving", extra={"listen": config.server.listen, "port": port, "tls": config.tls.enabled}
    )
    if worker is not None:
        worker.ready(port)
    await stopping.wait()
    log.info("stopping")
    if mllp is not None:
        await mllp.stop()
    await server.stop(grace=10)
    await edge.flush()  # the refusal windows still open become their audit events


def serve(config: Config, worker: WorkerRole | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and release resources.

    ``worker``: this process is one of a supervisor's (``service.supervisor``); it
    shares the port, leaves metrics to the supervisor, and only worker 0 runs the DICOM
    and MLLP listeners.
    """
    allocator.tune()
    if worker is not None:
        worker.enter()
    components = build(config)
    stop = threading.Event()
    dicom: DicomListener | None = None
    try:
        # `kill -HUP` re-reads the access policy and the client-certificate CRL.
        install_sighup(components.guard.policy, *components.reloadables())
        if worker is not None:
            worker.reload_if_missed()
        if config.server.metrics_listen and worker is None:  # a supervisor serves its own
            host, _, port = config.server.metrics_listen.rpartition(":")
            REGISTRY.register(ScheduledRunsCollector(components.backup.ledger))
            start_http_server(int(port), addr=host or "127.0.0.1")
        threading.Thread(
            target=_sweep_forever, args=(config, components, stop), daemon=True, name="sweeper"
        ).start()
        components.backup.scheduler.start()
        # The DICOM service, in threads of its own (service/dicom); one per supervisor.
        if config.dicom.listen and (worker is None or worker.listens_for_hospital_protocols):
            # Imported here: pynetdicom and pydicom are a fifth of a start-up's imports,
            # for a listener most deployments do not configure.
            from service.dicom import DicomListener  # noqa: PLC0415

            dicom = DicomListener(config, components.app.records, components.app.access)
            dicom.start()
        asyncio.run(_serve(config, components, worker))
    finally:
        if dicom is not None:
            dicom.stop()
        stop.set()
        components.close()
