"""The gRPC server: RecordService, health and reflection, over mutual TLS by default."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from concurrent import futures
from datetime import timedelta
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

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
)
from service.access_servicer import AccessServicer
from service.audit_servicer import AuditServicer
from service.authz.policy import install_sighup
from service.backup_servicer import BackupServicer
from service.bootstrap import Components, build
from service.config import Config, ConfigError
from service.keys_servicer import KeyServicer
from service.records_servicer import RecordServicer
from service.signing_servicer import SigningServicer
from storage.backup.runs import elected
from storage.sweeper import sweep_orphans

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


async def create_server(config: Config, components: Components) -> tuple[aio.Server, int]:
    """A started asyncio server with every service registered; returns it and its port."""
    limit = config.server.chunk_size + _FRAME_OVERHEAD
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
        # Each RPC holds at most one pool thread (uploads for their whole stream), and the
        # pool has twice as many, so guard and audit work never queue behind slow clients.
        maximum_concurrent_rpcs=config.server.workers,
    )
    records_pb2_grpc.add_RecordServiceServicer_to_server(
        RecordServicer(components.store, components.guard, config.server.chunk_size), server
    )
    access_pb2_grpc.add_AccessServiceServicer_to_server(
        AccessServicer(components.store, components.guard), server
    )
    audit_pb2_grpc.add_AuditServiceServicer_to_server(
        AuditServicer(components.store, components.guard, components.audit_log), server
    )
    signing_pb2_grpc.add_SigningServiceServicer_to_server(
        SigningServicer(components.signing, components.guard), server
    )
    keys_pb2_grpc.add_KeyServiceServicer_to_server(
        KeyServicer(components.kek, components.guard), server
    )
    backup_pb2_grpc.add_BackupServiceServicer_to_server(
        BackupServicer(components.backup.backups, components.guard), server
    )
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        records_pb2.DESCRIPTOR.services_by_name["RecordService"].full_name,
        access_pb2.DESCRIPTOR.services_by_name["AccessService"].full_name,
        audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
        signing_pb2.DESCRIPTOR.services_by_name["SigningService"].full_name,
        keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
        backup_pb2.DESCRIPTOR.services_by_name["BackupService"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    if config.tls.enabled:
        port = server.add_secure_port(config.server.listen, _credentials(config))
    else:
        log.warning("TLS is disabled: clients are not authenticated")
        port = server.add_insecure_port(config.server.listen)
    if port == 0:
        raise ConfigError(f"[server] cannot listen on {config.server.listen}")
    await server.start()
    for name in ("", *names[:6]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def _sweep_forever(components: Components, grace: timedelta, stop: threading.Event) -> None:
    """Sweep orphans periodically on one elected replica (DESIGN: scheduled work)."""
    interval = max(60.0, grace.total_seconds() / 4)
    while not stop.wait(interval):
        try:
            with elected(components.engine, "sweep") as won:
                if won:  # another replica holds the lock: it sweeps this round
                    sweep_orphans(components.blobs, components.metadata, grace)
        except Exception:  # a failed sweep is retried next round; the service stays up
            log.exception("orphan sweep failed")


async def _serve(config: Config, components: Components) -> None:
    loop = asyncio.get_running_loop()
    # The store's blocking calls run here; the default pool (cores + 4) is far too small.
    loop.set_default_executor(
        futures.ThreadPoolExecutor(2 * config.server.workers, thread_name_prefix="store")
    )
    server, port = await create_server(config, components)
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info(
        "serving", extra={"listen": config.server.listen, "port": port, "tls": config.tls.enabled}
    )
    await stopping.wait()
    log.info("stopping")
    await server.stop(grace=10)


def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and release resources."""
    components = build(config)
    stop = threading.Event()
    try:
        # `kill -HUP` re-reads the access policy and the client-certificate CRL.
        install_sighup(components.guard.policy, *components.reloadables())
        if config.server.metrics_listen:
            host, _, port = config.server.metrics_listen.rpartition(":")
            start_http_server(int(port), addr=host or "127.0.0.1")
        grace = timedelta(seconds=config.server.orphan_grace_seconds)
        threading.Thread(
            target=_sweep_forever, args=(components, grace, stop), daemon=True, name="sweeper"
        ).start()
        components.backup.scheduler.start()
        asyncio.run(_serve(config, components))
    finally:
        stop.set()
        components.close()
