"""Where the PKCS#11 token is and how to log in to it, parsed once at start-up.

The PIN is never a field of the configuration: the configuration only names where the
PIN lives (an environment variable, or a file readable by its owner alone), so that
printing or logging a config object can never leak it.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from keystore.errors import PinError


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """Module path, token label, PIN source and key labels of one PKCS#11 token.

    ``serialize_calls`` holds one lock per module while a session is lent out.
    python-pkcs11 calls ``C_Initialize(NULL)``, which tells SoftHSM2 (and other
    modules) that the application is single-threaded, so they skip their internal
    locking; set it to ``False`` only for a module documented to lock regardless.
    """

    module_path: str
    token_label: str
    pin_env: str | None = "MEDVAULT_PIN"
    pin_file: str | None = None
    pool_size: int = 8
    kek_label_prefix: str = "medvault-kek-v"
    index_key_label: str = "medvault-index-v1"
    serialize_calls: bool = True

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ValueError(f"keystore.pool_size must be at least 1, got {self.pool_size}")
        if not self.kek_label_prefix:
            raise ValueError("keystore.kek_label_prefix must not be empty")

    def pin_source(self) -> str:
        """Name where the PIN is read from, for error messages (never the PIN itself)."""
        sources = []
        if self.pin_env:
            sources.append(f"environment variable {self.pin_env}")
        if self.pin_file:
            sources.append(f"PIN file {self.pin_file}")
        return " or ".join(sources) or "the keystore PIN settings"

    def read_pin(self) -> str:
        """Return the user PIN: the environment variable if set, else the PIN file."""
        if self.pin_env:
            value = os.environ.get(self.pin_env)
            if value:
                return value
        if self.pin_file:
            return _read_pin_file(Path(self.pin_file))
        raise PinError(
            f"no PIN available: set {self.pin_source()} "
            "(a PIN is never taken from the command line)"
        )


# POSIX ACL xattr (Linux's binary form): a 4-byte version, then 8-byte entries of
# tag (u16), permissions (u16), id (u32), little-endian.
_ACL_XATTR = "system.posix_acl_access"
_ACL_USER = 0x02
_ACL_SHARED_TAGS = {0x04: "its group", 0x08: "a named group", 0x20: "others"}


def _acl_grants_others(path: Path) -> str | None:
    """Whom a POSIX ACL on ``path`` lets read it besides this process's user, or None.

    systemd hands a credential (``LoadCredential=``) to a unit's user by an ACL entry
    where the file system has them: the mode then shows the ACL's mask in its group
    bits, though no group can read the file. Only the ACL itself says who can.
    """
    try:
        raw = os.getxattr(path, _ACL_XATTR)
    except OSError:
        return "its group"  # no ACL: the group bits are the group's
    for offset in range(4, len(raw) - 7, 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, offset)
        if tag in _ACL_SHARED_TAGS and perm:
            return _ACL_SHARED_TAGS[tag]
        if tag == _ACL_USER and perm and ident != os.getuid():
            return f"user {ident}"
    return None


def _read_pin_file(path: Path) -> str:
    """Read a PIN file after checking that only its owner (or this user) can read it.

    The owner must be this user or root (systemd's credentials are root's, readable by
    the unit's user through an ACL): another account owning the file could read and
    replace the PIN whatever its mode, and a service running as root would still read it.
    """
    try:
        info = path.stat()
    except OSError as e:
        raise PinError(f"PIN file {path} cannot be read: {e.strerror}") from e
    mode = info.st_mode
    if info.st_uid not in (os.geteuid(), 0):
        raise PinError(
            f"PIN file {path} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}) or root; run `chown {os.geteuid()} {path}`"
        )
    if mode & stat.S_IRWXO or (mode & stat.S_IRWXG and _acl_grants_others(path)):
        raise PinError(f"PIN file {path} is readable by group or others; run `chmod 600 {path}`")
    try:
        pin = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise PinError(f"PIN file {path} cannot be read: {e.strerror}") from e
    if not pin:
        raise PinError(f"PIN file {path} is empty")
    return pin
