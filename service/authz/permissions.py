"""Permissions and the table saying which permission each RPC needs.

A permission is a plain string (``records.read``); roles in the policy file are sets of
them. The table below is the only place an RPC is tied to a permission: an RPC missing
from it is denied (deny by default), so adding an RPC to a proto without adding it here
fails closed rather than open.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

RECORDS_WRITE = "records.write"
RECORDS_READ = "records.read"
RECORDS_STAT = "records.stat"
RECORDS_LIST = "records.list"
ACCESS_GRANT = "access.grant"
ACCESS_LIST = "access.list"
ACCESS_BREAK_GLASS = "access.break_glass"
ACCESS_WHOAMI = "access.whoami"
AUDIT_QUERY = "audit.query"
AUDIT_VERIFY = "audit.verify"
AUDIT_EXPORT = "audit.export"
AUDIT_REVIEW = "audit.review"
KEYS_MANAGE = "keys.manage"
SIGNATURES_SIGN = "signatures.sign"
SIGNATURES_VERIFY = "signatures.verify"
BACKUP_RUN = "backup.run"
BACKUP_READ = "backup.read"
STATS_EXPORT = "stats.export"

_RECORDS = "/medvault.v1.RecordService/"
_ACCESS = "/medvault.v1.AccessService/"
_AUDIT = "/medvault.v1.AuditService/"
_SIGNING = "/medvault.v1.SigningService/"
_KEYS = "/medvault.v1.KeyService/"
_BACKUP = "/medvault.v1.BackupService/"
_STATS = "/medvault.v1.StatsService/"

RPC_PERMISSIONS: Mapping[str, str] = MappingProxyType({
    _RECORDS + "PutRecord": RECORDS_WRITE,
    _RECORDS + "GetRecord": RECORDS_READ,
    _RECORDS + "StatRecord": RECORDS_STAT,
    _RECORDS + "ListRecords": RECORDS_LIST,
    _RECORDS + "ListStudies": RECORDS_LIST,
    _RECORDS + "GetStudy": RECORDS_READ,
    _ACCESS + "GrantAccess": ACCESS_GRANT,
    _ACCESS + "RevokeAccess": ACCESS_GRANT,
    _ACCESS + "ListGrants": ACCESS_LIST,
    _ACCESS + "BreakGlass": ACCESS_BREAK_GLASS,
    _ACCESS + "WhoAmI": ACCESS_WHOAMI,
    _AUDIT + "QueryEvents": AUDIT_QUERY,
    _AUDIT + "VerifyChain": AUDIT_VERIFY,
    _AUDIT + "ExportEvents": AUDIT_EXPORT,
    _AUDIT + "ListBreakGlass": AUDIT_REVIEW,
    _AUDIT + "ReviewBreakGlass": AUDIT_REVIEW,
    _SIGNING + "SignRecord": SIGNATURES_SIGN,
    _SIGNING + "VerifyRecord": SIGNATURES_VERIFY,
    _SIGNING + "GetSignature": SIGNATURES_VERIFY,
    _KEYS + "RotateKek": KEYS_MANAGE,
    _KEYS + "ListKeks": KEYS_MANAGE,
    _KEYS + "Rewrap": KEYS_MANAGE,
    _KEYS + "RetireKek": KEYS_MANAGE,
    _KEYS + "ListSigners": KEYS_MANAGE,
    _KEYS + "CreateSigner": KEYS_MANAGE,
    _KEYS + "ImportCertificate": KEYS_MANAGE,
    _BACKUP + "RunBackup": BACKUP_RUN,
    _BACKUP + "ListBackups": BACKUP_READ,
    _BACKUP + "VerifyBackup": BACKUP_READ,
    _BACKUP + "RunRestoreDrill": BACKUP_RUN,
    _BACKUP + "PruneBackups": BACKUP_RUN,
    _BACKUP + "GetBackupPublicKey": BACKUP_READ,
    _STATS + "CountRecords": STATS_EXPORT,
})  # fmt: skip

KNOWN_PERMISSIONS: frozenset[str] = frozenset(RPC_PERMISSIONS.values())

# Permissions that touch one patient's records. Only these can be patient-scoped: a
# clinical role needs a care-team grant (or break-the-glass) for the patient. Asking
# for break-the-glass or for one's own identity is never scoped, or break-the-glass
# could not open the door it exists to open.
PATIENT_DATA_PERMISSIONS: frozenset[str] = frozenset(
    {RECORDS_WRITE, RECORDS_READ, RECORDS_STAT, RECORDS_LIST, SIGNATURES_SIGN, SIGNATURES_VERIFY}
)

# Services anyone who passed TLS may call: health checks for load balancers and
# reflection for tools. Matched by service name, so every method of them is public.
PUBLIC_SERVICES: frozenset[str] = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})  # fmt: skip


def service_of(method: str) -> str:
    """The service part of a full method name: ``/pkg.Service/Method`` -> ``pkg.Service``."""
    return method.lstrip("/").partition("/")[0]


def is_public(method: str) -> bool:
    """True if ``method`` (``/pkg.Service/Method``) needs no permission."""
    return service_of(method) in PUBLIC_SERVICES


def permission_for(method: str) -> str | None:
    """The permission ``method`` requires, or None when it is unknown (and so denied)."""
    return RPC_PERMISSIONS.get(method)
