#!/usr/bin/env bash
# A long fuzzing run of the content validators (the same properties CI runs with a small
# budget): random inputs, not the reproducible CI seed. Usage:
#   bench/fuzz.sh [EXAMPLES]      (default 5000 per property and kind)
# A failure prints hypothesis's minimal failing input; the content is synthetic.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MEDVAULT_FUZZ_EXAMPLES="${1:-5000}" MEDVAULT_FUZZ_RANDOM=1 \
    exec .venv/bin/pytest -p no:cacheprovider -q -p no:xdist tests/unit/storage/formats/test_fuzz.py
