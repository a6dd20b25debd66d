#!/usr/bin/env bash
# Stop the local stack's service and SeaweedFS (idempotent; data is kept).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/medvault stack down "$@"
