"""A token another process is logging in to is still found by a process that starts.

SoftHSM2 rewrites a token's ``token.object`` on every login; a process loading the
module at that moment may read it half written, and the token is then not listed
(SoftHSMv2 issue 757). CI saw it: one of four scheduler replicas, started together,
failed with "no PKCS#11 token labelled ...". ``find_token`` now has the module re-read
its tokens and looks again, for a moment, while the process holds no session.

Two child processes on the session's token: one logs in and out as fast as it can;
the other starts afresh again and again (``C_Finalize``/``C_Initialize``, as a new
process's first load does) and looks for the token each time.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from keystore import Pkcs11Config, TokenUnavailableError
from tests.fixtures.softhsm import SoftHsmToken

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SECONDS = 2.0  # the least time the finder looks for
LOOKS = 300  # and the least number of looks (a busy host makes each look slower)
CAP_SECONDS = 60.0


def _log_in_and_out(config: Pkcs11Config, stop: Any, logins: Any) -> None:
    """Child: log in to the token and out again until ``stop`` is set."""
    import pkcs11  # noqa: PLC0415  (in the child, after SOFTHSM2_CONF is inherited)

    token = pkcs11.lib(config.module_path).get_token(token_label=config.token_label)
    pin = Path(str(config.pin_file)).read_text().strip()
    while not stop.is_set():
        with token.open(user_pin=pin):
            logins.value += 1


def _start_afresh_and_find(config: Pkcs11Config, looks: Any, missed: Any, why: Any) -> None:
    """Child: re-initialise the module and look for the token, at least ``SECONDS`` and
    ``LOOKS`` times (at most ``CAP_SECONDS``)."""
    from keystore.pkcs11_session import find_token, load_module  # noqa: PLC0415

    lib = load_module(config.module_path)
    began = time.monotonic()
    while True:
        spent = time.monotonic() - began
        if (spent >= SECONDS and looks.value >= LOOKS) or spent >= CAP_SECONDS:
            return
        lib.reinitialize()  # what a process starting now reads
        looks.value += 1
        try:
            find_token(lib, config)
        except TokenUnavailableError as e:
            missed.value += 1
            why.put(f"{e} ({type(e.__cause__).__name__})")  # labels and paths only


def test_a_starting_process_finds_a_token_while_another_logs_in(
    softhsm_token: SoftHsmToken,
) -> None:
    config = softhsm_token.config
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    logins, looks, missed = (spawn.Value("q", 0) for _ in range(3))
    hammer = spawn.Process(target=_log_in_and_out, args=(config, stop, logins))
    why = spawn.Queue()
    finder = spawn.Process(target=_start_afresh_and_find, args=(config, looks, missed, why))
    hammer.start()
    try:
        while logins.value == 0 and hammer.is_alive():  # logging in before looking
            time.sleep(0.01)
        finder.start()
        finder.join(CAP_SECONDS + 30)
    finally:
        stop.set()
        hammer.join(30)
        for child in (hammer, finder):
            if child.is_alive():
                child.kill()
    assert (hammer.exitcode, finder.exitcode) == (0, 0), (hammer.exitcode, finder.exitcode)
    assert logins.value > 20, f"only {logins.value} logins: the race was hardly tried"
    assert looks.value >= LOOKS, f"only {looks.value} looks: the race was hardly tried"
    reasons = set()
    while missed.value and not why.empty():
        reasons.add(why.get(timeout=5))
    assert missed.value == 0, f"{missed.value} of {looks.value} looks found no token: {reasons}"
