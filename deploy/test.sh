#!/usr/bin/env bash
# Run every check and test: stub staleness, ruff, mypy, import contracts, then pytest
# (arguments are passed to pytest). Integration tests start their own components;
# PostgreSQL must be reachable on 127.0.0.1:5432 because the CI run fails, never skips,
# without it.
set -euo pipefail
# shellcheck source=deploy/bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

if ! "$VENV/bin/python" - <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", 5432), timeout=3).close()
except OSError:
    sys.exit(1)
PY
then
    die "PostgreSQL is not reachable on 127.0.0.1:5432; start it (e.g. 'service postgresql start' or a postgres container publishing port 5432) and run again"
fi

log "checking generated stubs"
"$VENV/bin/python" -m service.protogen --check
log "ruff"
"$VENV/bin/ruff" check .
log "import contracts"
# Layers, CLI outside the runtime, no cycles: [tool.importlinter] in pyproject.toml.
"$VENV/bin/lint-imports" --no-cache
# mypy (~17 s of one core on a fresh clone) runs beside pytest, whose four workers leave
# about a fifth of two cores idle while tests wait on servers; its verdict and output
# come after pytest's, and either failing fails the run.
mypy_log="$(mktemp)"
log "mypy (beside pytest; its report follows pytest's)"
"$VENV/bin/mypy" > "$mypy_log" 2>&1 &
mypy_pid=$!
log "pytest"
# Let pytest keep its rewritten test modules (and Python the byte-code of anything
# compiled since the bootstrap) in this checkout's __pycache__ folders: the variable, set
# on the CI machine, made each of the four workers rewrite every test module again.
unset PYTHONDONTWRITEBYTECODE
# Whole modules go to one worker (--dist loadscope), so a module's servers and databases
# are set up once; each worker has its own SeaweedFS, SoftHSM2 directory and PostgreSQL
# databases (tests/fixtures). MEDVAULT_TEST_WORKERS=0 runs in this process, serially.
workers="${MEDVAULT_TEST_WORKERS:-4}"
status=0
# --no-loadscope-reorder: xdist would otherwise hand out modules by their number of tests,
# ignoring SLOW_FIRST (tests/conftest.py), and a long module could start last.
"$VENV/bin/pytest" -p no:cacheprovider -n "$workers" --dist loadscope --no-loadscope-reorder \
    "$@" || status=$?
mypy_status=0
wait "$mypy_pid" || mypy_status=$?
log "mypy"
cat "$mypy_log"
rm -f "$mypy_log"
if [ "$status" -eq 5 ]; then
    die "pytest collected no tests; that is a failure, not a pass"
fi
if [ "$mypy_status" -ne 0 ]; then
    die "mypy found type errors (above)"
fi
exit "$status"
