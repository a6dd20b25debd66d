"""A project-local SoftHSM2 token for the local stack and the tests; all idempotent.

SoftHSM2 finds its token directory through the file named by ``SOFTHSM2_CONF``, read
once when the module is loaded into a process. Everything here lives under
``<state_dir>/softhsm`` so the local stack never touches the system-wide tokens.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
from pathlib import Path

from service.localstack.ca import write_private

_SHARED_BITS = stat.S_IRWXG | stat.S_IRWXO
_LABEL_PREFIX = "Label:"


class SoftHsmError(RuntimeError):
    """softhsm2-util is missing or failed; the message never carries a PIN."""


def write_softhsm_conf(state_dir: Path) -> Path:
    """Write ``<state_dir>/softhsm/softhsm2.conf`` (and its token directory); return it."""
    base = state_dir / "softhsm"
    tokens = base / "tokens"
    # Token files hold the keys (encrypted under the PIN), so only the owner may list them.
    tokens.mkdir(mode=0o700, parents=True, exist_ok=True)
    conf = base / "softhsm2.conf"
    text = (
        "# Written by medvault; project-local SoftHSM2 tokens.\n"
        f"directories.tokendir = {tokens.resolve()}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    if not conf.exists() or conf.read_text(encoding="utf-8") != text:
        write_private(conf, text.encode("utf-8"))
    os.chmod(conf, 0o600)  # an older file may have wider permissions
    return conf


def _softhsm_util() -> str:
    path = shutil.which("softhsm2-util")
    if path is None:
        raise SoftHsmError("softhsm2-util not found; install softhsm2 (apt-get install softhsm2)")
    return path


def _run(conf_path: Path, args: list[str], what: str) -> str:
    """Run softhsm2-util with our conf; on failure report ``what``, never the arguments."""
    env = {**os.environ, "SOFTHSM2_CONF": str(conf_path)}
    result = subprocess.run(  # noqa: S603 - fixed binary, list arguments, no shell
        [_softhsm_util(), *args], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        # stderr of softhsm2-util names slots and labels, not PINs; stdout is dropped.
        raise SoftHsmError(f"softhsm2-util could not {what}: {result.stderr.strip()[:500]}")
    return result.stdout


def token_labels(conf_path: Path) -> list[str]:
    """Labels of the initialised tokens in the token directory of ``conf_path``."""
    out = _run(conf_path, ["--show-slots"], "list slots")
    labels = []
    for line in out.splitlines():
        text = line.strip()
        if text.startswith(_LABEL_PREFIX):
            label = text[len(_LABEL_PREFIX) :].strip()
            if label:
                labels.append(label)
    return labels


def init_token(conf_path: Path, label: str, pin: str, so_pin: str) -> bool:
    """Initialise a token ``label`` in the first free slot unless it exists; True if new."""
    if label in token_labels(conf_path):
        return False
    # softhsm2-util accepts the PINs only as arguments, so they are visible in the process
    # table for the moment it runs. That is the one exception to "no PIN on a command
    # line"; it happens on the local token only, and _run never echoes the arguments.
    args = ["--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin]
    _run(conf_path, args, f"initialise token {label!r}")
    return True


def ensure_pin_file(path: Path) -> str:
    """Return the PIN stored at ``path``, creating a random one (mode 0600) if absent."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: two processes racing to create the file cannot both write a PIN.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_existing_pin(path)
    pin = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(pin + "\n")
    return pin


def _read_existing_pin(path: Path) -> str:
    if path.stat().st_mode & _SHARED_BITS:
        raise SoftHsmError(
            f"PIN file {path} is readable by group or others; run `chmod 600 {path}`"
        )
    pin = path.read_text(encoding="utf-8").strip()
    if not pin:
        raise SoftHsmError(f"PIN file {path} is empty; delete it to have a new PIN made")
    return pin
