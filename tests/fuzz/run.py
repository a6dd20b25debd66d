"""Run one atheris fuzz target (``tests/fuzz/targets.py``) under libFuzzer.

    python -m tests.fuzz.run TARGET [libFuzzer flags ...]

e.g. ``-timeout=10 -max_len=8192``. The budget is ours: ``--inputs=N`` and/or
``--seconds=S`` end the process at once after N inputs or S seconds (see ``budgeted``).
The target's seeds (valid synthetic input, from ``tests.content``) are written to a
corpus directory that libFuzzer grows: ``$MEDVAULT_FUZZ_CORPUS/TARGET`` if that variable
is set (kept between runs), else a temporary one. ``MEDVAULT_FUZZ_DEEP=1`` also
instruments the libraries under the target (slower start, better guidance: for long
runs). Exit status 0: no finding; otherwise libFuzzer's report, and the input it wrote
(``-artifact_prefix``), name the finding.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris

from tests.fuzz.targets import TARGETS


def _load(spec: str) -> Callable[..., Any]:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def corpus_for(name: str, seeds: Callable[[], list[bytes]]) -> Path:
    """The corpus directory of ``name``, seeded when empty."""
    root = os.environ.get("MEDVAULT_FUZZ_CORPUS")
    folder = Path(root) / name if root else Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.iterdir()):
        for n, seed in enumerate(seeds()):
            (folder / f"seed-{n}").write_bytes(seed)
    return folder


def main(argv: list[str]) -> None:
    """Fuzz ``argv[1]`` with the libFuzzer flags after it (never returns)."""
    if len(argv) < 2 or argv[1] not in TARGETS:
        raise SystemExit("usage: python -m tests.fuzz.run TARGET [libFuzzer flags]; "
                         f"targets: {', '.join(TARGETS)}")  # fmt: skip
    name, flags = argv[1], argv[2:]
    ours = {f.split("=", 1)[0]: float(f.split("=", 1)[1]) for f in flags if f.startswith("--")}
    flags = [f for f in flags if not f.startswith("--")]
    spec = TARGETS[name]
    deep = os.environ.get("MEDVAULT_FUZZ_DEEP") == "1"
    with atheris.instrument_imports(include=spec.instrumented(deep=deep)):
        target = _load(spec.target)
    corpus = [] if any(not f.startswith("-") for f in flags) else [
        str(corpus_for(name, _load(spec.seeds)))]  # fmt: skip
    if ours:
        target = budgeted(target, int(ours.get("--inputs", 0)), ours.get("--seconds", 0.0))
    atheris.Setup([argv[0], *flags, *corpus], target)
    atheris.Fuzz()


def budgeted(target: Callable[[bytes], None], inputs: int, seconds: float
             ) -> Callable[[bytes], None]:  # fmt: skip
    """``target``, ending the process after ``inputs`` inputs or ``seconds`` (0: no limit).

    The process ends with ``os._exit``: after libFuzzer's ``-atheris_runs``, ``-runs``
    or ``-max_total_time`` the interpreter finalizes normally, and on a loaded machine
    that can outlast libFuzzer's ``-timeout`` alarm interval; the alarm then kills the
    process (SIGALRM, exit -14) although every input passed.
    """
    done, end = 0, time.monotonic() + seconds

    def run_one(data: bytes) -> None:
        nonlocal done
        target(data)
        done += 1
        if (inputs and done >= inputs) or (seconds and time.monotonic() >= end):
            print(f"Done {done} inputs, no finding", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(0)

    return run_one


if __name__ == "__main__":
    main(sys.argv)
