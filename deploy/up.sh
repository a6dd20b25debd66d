#!/usr/bin/env bash
# Bring up the local stack (CA, SoftHSM2 token, SeaweedFS, SQLite, the service).
# Idempotent: run it again any time; what exists is kept, what runs keeps running.
# The stack lives in $MEDVAULT_HOME (default: .medvault in the repository root).
set -euo pipefail
# shellcheck source=deploy/bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

"$VENV/bin/medvault" stack up

cat <<'USAGE'

The local stack is up. To act as the sample records clerk from this shell:

    eval "$(.venv/bin/medvault stack env --as records_clerk)"
    .venv/bin/medvault put some-document.pdf --patient HN-0417-TRAN --authority urn:oid:1.2.3 --kind PDF

Other roles: physician, nurse, radiologist, security_officer, backup_operator,
key_admin, admin (see README.md, "A five-minute tour").

Status:  .venv/bin/medvault stack status
Stop:    deploy/down.sh
USAGE
