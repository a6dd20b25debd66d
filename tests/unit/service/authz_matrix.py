"""The expected role x RPC outcomes of the default policy (deploy/policy.toml), by hand.

Written independently of the policy file so that a change to either shows up as a test
failure to be looked at. The unit tests check every cell against ``Policy.check``; the
integration matrix reuses ``EXPECTED`` against a running server.

Outcomes: ``ALLOW`` any patient / no patient involved; ``PATIENT`` allowed only for a
patient the caller holds an active care-team or break-the-glass grant for; ``DENY``.
"""

from __future__ import annotations

DENY = "deny"
ALLOW = "allow"
PATIENT = "patient"

ROLES = (
    "physician", "nurse", "radiologist", "records_clerk",
    "security_officer", "backup_operator", "key_admin", "admin",
)  # fmt: skip

# Columns follow ROLES. P = PATIENT, A = ALLOW, . = DENY.
_TABLE = """
/medvault.v1.RecordService/PutRecord        P P P A . . . .
/medvault.v1.RecordService/GetRecord        P P P . . . . .
/medvault.v1.RecordService/StatRecord       P P P . . . . .
/medvault.v1.RecordService/ListRecords      P P P . . . . .
/medvault.v1.RecordService/ListStudies      P P P . . . . .
/medvault.v1.RecordService/GetStudy         P P P . . . . .
/medvault.v1.AccessService/GrantAccess      . . . A . . . A
/medvault.v1.AccessService/RevokeAccess     . . . A . . . A
/medvault.v1.AccessService/ListGrants       . . . A A . . A
/medvault.v1.AccessService/BreakGlass       A . A . . . . .
/medvault.v1.AccessService/WhoAmI           A A A A A A A A
/medvault.v1.AuditService/QueryEvents       . . . . A . . .
/medvault.v1.AuditService/VerifyChain       . . . . A . . A
/medvault.v1.AuditService/ExportEvents      . . . . A . . .
/medvault.v1.AuditService/ListBreakGlass    . . . . A . . .
/medvault.v1.AuditService/ReviewBreakGlass  . . . . A . . .
/medvault.v1.SigningService/SignRecord      P . P . . . . .
/medvault.v1.SigningService/VerifyRecord    P P P . . . . .
/medvault.v1.SigningService/GetSignature    P P P . . . . .
/medvault.v1.KeyService/RotateKek           . . . . . . A .
/medvault.v1.KeyService/ListKeks            . . . . . . A .
/medvault.v1.KeyService/Rewrap              . . . . . . A .
/medvault.v1.KeyService/RetireKek           . . . . . . A .
/medvault.v1.KeyService/ListSigners         . . . . . . A .
/medvault.v1.KeyService/CreateSigner        . . . . . . A .
/medvault.v1.KeyService/ImportCertificate   . . . . . . A .
/medvault.v1.BackupService/RunBackup        . . . . . A . .
/medvault.v1.BackupService/ListBackups      . . . . . A . .
/medvault.v1.BackupService/VerifyBackup     . . . . . A . .
/medvault.v1.BackupService/RunRestoreDrill  . . . . . A . .
/medvault.v1.BackupService/PruneBackups     . . . . . A . .
/medvault.v1.BackupService/GetBackupPublicKey . . . . . A . .
/medvault.v1.StatsService/CountRecords      . . . A . . . .
"""

_CODES = {"P": PATIENT, "A": ALLOW, ".": DENY}


def _parse(table: str) -> dict[str, dict[str, str]]:
    expected: dict[str, dict[str, str]] = {role: {} for role in ROLES}
    for line in table.strip().splitlines():
        method, *cells = line.split()
        assert len(cells) == len(ROLES), line
        for role, cell in zip(ROLES, cells, strict=True):
            expected[role][method] = _CODES[cell]
    return expected


# EXPECTED[role][full method name] -> DENY | ALLOW | PATIENT
EXPECTED: dict[str, dict[str, str]] = _parse(_TABLE)

# Callers with no role (no certificate, an unknown OU, an application calling for
# itself with roles = []) are denied every RPC above; health and reflection stay open.
PUBLIC_METHODS = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)
