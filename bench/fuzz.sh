#!/usr/bin/env bash
# Long fuzzing runs; CI runs the same properties and targets with a small budget.
#
#   bench/fuzz.sh [EXAMPLES]
#       the hypothesis properties of the content validators
#       (tests/unit/storage/formats/test_fuzz.py), random inputs rather than CI's
#       reproducible seed; default 5000 examples per property and kind.
#   bench/fuzz.sh --atheris [SECONDS] [TARGET ...]
#       coverage-guided fuzzing (atheris, tests/fuzz/targets.py) of each target (default:
#       all) for SECONDS each (default 600), with the libraries under each target
#       instrumented too (MEDVAULT_FUZZ_DEEP=1). The corpus is kept in
#       $MEDVAULT_FUZZ_CORPUS (default .medvault/fuzz-corpus), so runs build on each
#       other; a finding's input is written to fuzz-findings/ and the script exits 1.
#
# A failure prints the failing input (hypothesis's minimal one, or libFuzzer's); the
# content is synthetic.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

if [[ "${1:-}" != "--atheris" ]]; then
    MEDVAULT_FUZZ_EXAMPLES="${1:-5000}" MEDVAULT_FUZZ_RANDOM=1 \
        exec "$PYTHON" -m pytest -p no:cacheprovider -q -p no:xdist \
        tests/unit/storage/formats/test_fuzz.py
fi
shift
seconds="${1:-600}"
[[ $# -gt 0 ]] && shift
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(PYTHONPATH=. "$PYTHON" -c \
        'from tests.fuzz.targets import TARGETS; print("\n".join(TARGETS))')
fi
export MEDVAULT_FUZZ_CORPUS="${MEDVAULT_FUZZ_CORPUS:-$PWD/.medvault/fuzz-corpus}"
export MEDVAULT_FUZZ_DEEP=1 PYTHONPATH=.
mkdir -p fuzz-findings "$MEDVAULT_FUZZ_CORPUS"
failed=()
for target in "${targets[@]}"; do
    echo "== $target: ${seconds} s"
    if ! "$PYTHON" -m tests.fuzz.run "$target" --seconds="$seconds" -timeout=10 \
            -rss_limit_mb=2048 -max_len=65536 -artifact_prefix="fuzz-findings/$target-" \
            2>&1 | grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)'; then
        failed+=("$target")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "findings in: ${failed[*]} (inputs in fuzz-findings/)"
    exit 1
fi
echo "no findings"
