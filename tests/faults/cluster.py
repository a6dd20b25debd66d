"""The cluster topology for fault tests: ``medvault stack up --topology cluster``, once per module.

:func:`cluster_stack` runs exactly what an operator runs (``ClusterStack``: SeaweedFS
master, three volume servers with replication 001, filer, S3 gateway; two service
replicas) on a PostgreSQL database of the test's own, with the test settings an operator
would put in ``config.toml``: a sweep every second, dependency health probed every
second, checkpoints every 2 s, a scheduled backup every few seconds, a metrics listener
(to count each replica's calls) and MLLP and DICOM listeners (one port each per
replica). Everything is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from service.cli.client import channel as cli_channel
from service.localstack.ca import DevCA
from service.localstack.cluster import ClusterStack
from service.localstack.layout import find_pkcs11_module, rewrite_ports
from service.localstack.seaweed import find_free_port
from service.localstack.service_proc import TlsClient
from storage import make_minio_client
from tests.fixtures.service import ROOT, TEST_POLICY_EXTRA, free_port

REPLICAS = 2
SWEEP_SECONDS = 1.0
HEALTH_PROBE_SECONDS = 1.0
RECORDS_BUCKET = "medvault-records"  # the stack's config.toml
BACKUP_SECONDS = 4
TEST_CLIENT = "test-app"


@dataclass
class Cluster:
    """A running cluster stack, and how the tests reach it."""

    stack: ClusterStack
    database_url: str
    lines: list[str]

    @property
    def app(self) -> TlsClient:
        return self.stack.tls_client(TEST_CLIENT)

    def channel(self, endpoints: list[str] | None = None, as_: str = TEST_CLIENT) -> grpc.Channel:
        """The CLI's own channel: balanced over ``endpoints`` (default every replica)."""
        tls = self.stack.tls_client(as_)
        ns = argparse.Namespace(
            endpoint=",".join(endpoints or self.stack.endpoints()),
            ca=str(tls.ca), cert=str(tls.cert), key=str(tls.key), insecure=False,
        )  # fmt: skip
        return cli_channel(ns)

    def calls(self, index: int, method: str) -> int:
        """Calls of ``method`` (``Service/Method``) replica ``index`` has finished (Prometheus)."""
        port = self.stack.replica_ports(index)["metrics"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return int(sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "medvault_rpc_calls"
            for sample in family.samples
            if sample.name == "medvault_rpc_calls_total" and sample.labels["method"] == method
        ))  # fmt: skip

    def engine(self) -> sa.Engine:
        return sa.create_engine(self.database_url)

    def bucket_keys(self) -> set[str]:
        """Every object key in the records' bucket (through the S3 gateway)."""
        stack = self.stack
        client = make_minio_client(
            stack.seaweed_cluster().endpoint,
            stack.layout.s3_access_key_file.read_text().strip(),
            stack.layout.s3_secret_key_file.read_text().strip(),
            read_timeout=10,
            retry=False,
        )
        return {o.object_name for o in client.list_objects(RECORDS_BUCKET, recursive=True)}

    def sweep(self) -> str:
        """``medvault sweep --grace-seconds 0`` with replica 1's config; its stdout."""
        stack = self.stack
        done = subprocess.run(
            [sys.executable, "-m", "service", "sweep", "--config",
             str(stack.home / "replica-1.toml"), "--grace-seconds", "0"],
            cwd=stack.home, capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, **stack.service_env(), "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert done.returncode == 0, f"sweep exit {done.returncode}: {done.stderr[-500:]}"
        return done.stdout.strip()


def _configure(stack: ClusterStack, database_url: str) -> None:
    """The operator's edits to config.toml and policy.toml, before the first start."""
    # Ports of its own, not the stack's defaults (7443, 8333): test_localstack's stacks,
    # on another worker at the same time, take those when free, e.g. while this cluster's
    # S3 gateway is stopped on purpose, and then it could not come back.
    assert rewrite_ports(stack.layout, free_port(), find_free_port(), find_pkcs11_module(),
                         database_url), "config.toml edited before the first start"
    config = stack.layout.config
    text = config.read_text()
    text = text.replace("[server]\n", (
        "[server]\n"
        f"orphan_sweep_seconds = {SWEEP_SECONDS}\n"
        f"health_probe_seconds = {HEALTH_PROBE_SECONDS}\n"
        f'metrics_listen = "127.0.0.1:{free_port()}"\n'
    ), 1)  # fmt: skip
    text += (
        "\n[audit]\ncheckpoint_seconds = 2\n"
        '\n[backup]\nschedule = "* * * * *"\n'
        f"schedule_seconds = {BACKUP_SECONDS}\nprune_after_backup = false\n"
        f'\n[mllp]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'\n[dicom]\nlisten = "127.0.0.1:{free_port()}"\n'
    )
    config.write_text(text)
    policy = stack.home / "policy.toml"
    policy.write_text(policy.read_text() + TEST_POLICY_EXTRA)
    DevCA.load_or_create(stack.layout.ca_dir).issue_client(stack.layout.ca_dir, TEST_CLIENT)


def cluster_stack(home: Path, database_url: str) -> Iterator[Cluster]:
    """Up a cluster stack in ``home`` on ``database_url``; down (by pid) when the generator ends."""
    lines: list[str] = []
    stack = ClusterStack(home, lines.append, replicas=REPLICAS, database_url=database_url)
    stack.prepare()
    _configure(stack, database_url)
    try:
        stack.up(health_timeout=90)
        yield Cluster(stack, database_url, lines)
    finally:
        stack.down()


def orphan_sweeps(stack: ClusterStack) -> int:
    """ "orphan sweep" log lines across every replica's log."""
    count = 0
    for index in range(1, REPLICAS + 1):
        for line in stack.replica(index).log_file.read_text().splitlines():
            try:
                count += json.loads(line).get("msg") == "orphan sweep"
            except ValueError:
                continue
    return count
