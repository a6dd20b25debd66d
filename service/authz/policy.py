"""The policy file: TOML (and the JWKS file it names) parsed into a ``Policy``, kept live.

Unknown keys, roles and permissions are rejected with a ``PolicyError`` naming the key
and, where it can be found, the line: a typo must never silently grant or drop a
permission. The JWKS file is read with the policy, so a reload swaps keys and roles in
one step and a broken key file is caught like any other policy error.

``PolicyHolder`` keeps the live policy. Reads are a single attribute load (atomic in
CPython), so request threads never lock; ``reload()`` replaces the reference only when
the new file is valid, and otherwise logs why and keeps serving the old policy.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType, MappingProxyType
from typing import Any, Protocol

import jwt

from service.authz.model import (
    SUPPORTED_ALGORITHMS,
    Application,
    BreakGlassConfig,
    Caller,
    Decision,
    DelegationConfig,
    IncidentConfig,
    PermissionDeniedError,
    Policy,
    PolicyError,
    Role,
)
from service.authz.permissions import KNOWN_PERMISSIONS

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "Application",
    "BreakGlassConfig",
    "Caller",
    "Decision",
    "DelegationConfig",
    "IncidentConfig",
    "PermissionDeniedError",
    "Policy",
    "PolicyError",
    "PolicyHolder",
    "Reloadable",
    "Role",
    "install_sighup",
    "load",
    "parse",
]

log = logging.getLogger(__name__)
_ROLE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

# --- parsing -------------------------------------------------------------------------

_STR_LIST = "list of strings"
_TOML_TYPES = {dict: "table", str: "string", int: "integer", bool: "boolean"}
_TOP_LEVEL = ("roles", "applications", "principals", "delegation", "break_glass", "incidents")


def _quote(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _where(path: tuple[str, ...]) -> str:
    if not path:
        return "(top level)"
    return "[" + ".".join(_quote(p) for p in path) + "]"


def _ok(value: object, kind: type | str) -> bool:
    if kind == _STR_LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(kind, type) and isinstance(value, kind)


def _table(raw: object, path: tuple[str, ...], spec: Mapping[str, type | str]) -> dict[str, Any]:
    """``raw`` checked to be a table with only ``spec``'s keys, each of its type."""
    if not isinstance(raw, dict):
        raise PolicyError(f"{_where(path)} must be a table", path)
    for key, value in raw.items():
        kind = spec.get(key)
        if kind is None:
            known = ", ".join(spec) or "none"
            what = f"{_where(path)} unknown key {key!r}" if path else f"unknown section [{key}]"
            raise PolicyError(f"{what} (known: {known})", (*path, key))
        if not _ok(value, kind):
            name = kind if isinstance(kind, str) else _TOML_TYPES[kind]
            raise PolicyError(f"{_where(path)} {key} must be a {name}", (*path, key))
    return raw


def _role(name: str, raw: object) -> Role:
    path = ("roles", name)
    if not _ROLE_NAME.fullmatch(name):
        raise PolicyError(f"{_where(path)} role names are lower-case letters, digits, _", path)
    body = _table(raw, path, {"permissions": _STR_LIST, "patient_scoped": bool, "description": str})
    if "permissions" not in body:
        raise PolicyError(f"{_where(path)} permissions is required", path)
    for permission in body["permissions"]:
        if permission not in KNOWN_PERMISSIONS:
            raise PolicyError(
                f"{_where(path)} unknown permission {permission!r} "
                f"(known: {', '.join(sorted(KNOWN_PERMISSIONS))})",
                (*path, "permissions"),
            )
    return Role(
        name,
        frozenset(body["permissions"]),
        body.get("patient_scoped", False),
        body.get("description", ""),
    )


def _role_names(
    values: list[str], path: tuple[str, ...], roles: Mapping[str, Role]
) -> frozenset[str]:
    for value in values:
        if value not in roles:
            raise PolicyError(
                f"{_where(path[:-1])} unknown role {value!r} (defined: {', '.join(sorted(roles))})",
                path,
            )
    return frozenset(values)


def _names(raw: object, section: str) -> dict[str, Any]:
    """A table of named sub-tables (names are free-form: certificate CNs, user ids)."""
    if not isinstance(raw, dict):
        raise PolicyError(f"[{section}] must be a table of tables", (section,))
    return raw


def _applications(raw: object, roles: Mapping[str, Role]) -> dict[str, Application]:
    apps: dict[str, Application] = {}
    for name, entry in _names(raw, "applications").items():
        path = ("applications", name)
        body = _table(entry, path, {"delegate": bool, "roles": _STR_LIST, "client_id": str})
        apps[name] = Application(
            name,
            body.get("delegate", False),
            _role_names(body.get("roles", []), (*path, "roles"), roles),
            body.get("client_id", ""),
        )
    return apps


def _principals(raw: object, roles: Mapping[str, Role]) -> dict[str, frozenset[str]]:
    found: dict[str, frozenset[str]] = {}
    for name, entry in _names(raw, "principals").items():
        path = ("principals", name)
        body = _table(entry, path, {"roles": _STR_LIST})
        if "roles" not in body:
            raise PolicyError(f"{_where(path)} roles is required", path)
        found[name] = _role_names(body["roles"], (*path, "roles"), roles)
    return found


def _jwks(file: Path, algorithms: tuple[str, ...]) -> dict[str, jwt.PyJWK]:
    """The verification keys of a JWKS file, by key id."""
    path = ("delegation", "jwks_file")
    try:
        document = json.loads(file.read_text())
        entries = document["keys"]
    except OSError as e:
        raise PolicyError(f"[delegation] cannot read jwks_file {file}: {e.strerror}", path) from e
    except (ValueError, KeyError, TypeError) as e:
        raise PolicyError(f"[delegation] jwks_file {file} is not a JWKS document", path) from e
    keys: dict[str, jwt.PyJWK] = {}
    for entry in entries if isinstance(entries, list) else []:
        kid = entry.get("kid") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or not kid:
            raise PolicyError(f"[delegation] every key in {file} needs a kid", path)
        if "d" in entry:  # a private key published by mistake: refuse rather than spread it
            raise PolicyError(
                f"[delegation] key {kid!r} in {file} holds private key material", path
            )
        if entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError as e:
            raise PolicyError(f"[delegation] key {kid!r} in {file} is not usable: {e}", path) from e
        if key.algorithm_name in algorithms:  # other algorithms (HS*, RS512...) never verify
            keys[kid] = key
    if not keys:
        raise PolicyError(
            f"[delegation] {file} has no signature key for {', '.join(algorithms)}", path
        )
    return keys


_DELEGATION_KEYS: dict[str, type | str] = {
    "jwks_file": str,
    "issuer": str,
    "audience": str,
    "algorithms": _STR_LIST,
    "leeway_seconds": int,
    "replay_cache": bool,
    "replay_cache_size": int,
}


def _algorithms(body: Mapping[str, Any]) -> tuple[str, ...]:
    algorithms = tuple(body.get("algorithms", SUPPORTED_ALGORITHMS))
    bad = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
    if bad or not algorithms:
        raise PolicyError(
            f"[delegation] algorithms must be among {', '.join(SUPPORTED_ALGORITHMS)}"
            f" (got {', '.join(bad) or 'none'})",
            ("delegation", "algorithms"),
        )
    return algorithms


def _bounded(body: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value: int = body.get(key, default)
    if not low <= value <= high:
        raise PolicyError(f"[delegation] {key} must be {low}..{high}", ("delegation", key))
    return value


def _delegation(raw: object, base_dir: Path) -> DelegationConfig:
    path = ("delegation",)
    body = _table(raw, path, _DELEGATION_KEYS)
    algorithms = _algorithms(body)
    leeway = _bounded(body, "leeway_seconds", 30, 0, 300)
    replay = (
        body.get("replay_cache", False),
        _bounded(body, "replay_cache_size", 100_000, 1, 10_000_000),
    )
    if not body.get("jwks_file"):
        return DelegationConfig(
            None,
            body.get("issuer", ""),
            body.get("audience", ""),
            algorithms,
            leeway,
            replay_cache=replay[0],
            replay_cache_size=replay[1],
        )
    for key in ("issuer", "audience"):
        if not body.get(key):
            raise PolicyError(f"[delegation] {key} is required with jwks_file", (*path, key))
    file = base_dir / body["jwks_file"]
    return DelegationConfig(
        file,
        body["issuer"],
        body["audience"],
        algorithms,
        leeway,
        MappingProxyType(_jwks(file, algorithms)),
        replay_cache=replay[0],
        replay_cache_size=replay[1],
    )


def _limits(cls: type[Any], section: str, raw: object) -> Any:
    """A section of positive integers (``[break_glass]``, ``[incidents]``)."""
    names = cls.__dataclass_fields__
    body = _table(raw, (section,), dict.fromkeys(names, int))
    for key, value in body.items():
        if value <= 0:
            raise PolicyError(f"[{section}] {key} must be positive", (section, key))
    return cls(**body)


def parse(raw: Mapping[str, Any], base_dir: Path, source: Path | None = None) -> Policy:
    """Build a ``Policy`` from parsed TOML; paths are relative to ``base_dir``."""
    _table(dict(raw), (), dict.fromkeys(_TOP_LEVEL, dict))
    raw_roles = _names(raw.get("roles", {}), "roles")
    roles = {name: _role(name, entry) for name, entry in raw_roles.items()}
    if not roles:
        # Fail closed but loudly: an empty file would otherwise deny everyone silently.
        raise PolicyError("the policy defines no roles", ("roles",))
    return Policy(
        roles=MappingProxyType(roles),
        applications=MappingProxyType(_applications(raw.get("applications", {}), roles)),
        principals=MappingProxyType(_principals(raw.get("principals", {}), roles)),
        delegation=_delegation(raw.get("delegation", {}), base_dir),
        break_glass=_limits(BreakGlassConfig, "break_glass", raw.get("break_glass", {})),
        incidents=_limits(IncidentConfig, "incidents", raw.get("incidents", {})),
        source=source,
    )


def _line_of(text: str, path: tuple[str, ...]) -> int | None:
    """Best effort: the line of the key at ``path``, or of its table header."""
    header = re.compile(r"\s*\[([^\[\]]+)\]\s*(#.*)?")
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        match = header.fullmatch(line)
        if match:
            table = tuple(p.strip().strip("\"'") for p in match.group(1).split("."))
            if table == path or (len(path) == 1 and table[:1] == path):
                return number
        elif (
            path
            and table == path[:-1]
            and re.match(rf"\s*[\"']?{re.escape(path[-1])}[\"']?\s*=", line)
        ):
            return number
    return None


def load(path: str | Path) -> Policy:
    """Read and validate the policy file at ``path``."""
    file = Path(path)
    try:
        text = file.read_text()
        raw = tomllib.loads(text)
    except OSError as e:
        raise PolicyError(f"policy file {file}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"policy file {file} is not valid TOML: {e}") from e
    try:
        return parse(raw, file.resolve().parent, file)
    except PolicyError as e:
        line = _line_of(text, e.path)
        where = f"{file}:{line}" if line else str(file)
        raise PolicyError(f"policy file {where}: {e}", e.path) from None


# --- the live policy -----------------------------------------------------------------


def _one_cache_per_service(policy: Policy, processes: int) -> Policy:
    """``policy``, refused when it asks for one-time tokens that several processes would
    each accept once: the replay cache is per process (service/replay.py)."""
    if policy.delegation.replay_cache and processes > 1:
        raise PolicyError(
            f"delegation.replay_cache is true but the service runs {processes} processes "
            "(server.processes; 0 means one per core): each keeps its own cache, so a "
            "one-time token would be accepted once per process; set server.processes = 1",
            ("delegation", "replay_cache"),
        )
    return policy


class PolicyHolder:
    """The live policy; ``current`` is lock-free, ``reload`` swaps it only when valid."""

    def __init__(self, policy: Policy, path: Path | None = None, processes: int = 1) -> None:
        self._policy = policy
        self._path = path if path is not None else policy.source
        self._processes = processes
        self._reload_lock = threading.Lock()  # two SIGHUPs in a row must not interleave

    @classmethod
    def load(cls, path: str | Path, processes: int = 1) -> PolicyHolder:
        """Load the policy at start-up; an invalid file raises ``PolicyError``, as does
        a replay cache with ``processes`` > 1 (the service's process count)."""
        return cls(_one_cache_per_service(load(path), processes), Path(path), processes)

    @property
    def current(self) -> Policy:
        """The policy in force; take it once per request for a consistent view."""
        return self._policy

    @property
    def path(self) -> Path | None:
        """The file ``reload`` reads."""
        return self._path

    def reload(self) -> bool:
        """Re-read the file: True if swapped in; False (old policy kept) if invalid."""
        if self._path is None:
            log.error("policy reload requested but the policy has no file")
            return False
        with self._reload_lock:
            try:
                policy = _one_cache_per_service(load(self._path), self._processes)
            except PolicyError as e:
                # The message names the key and line; a traceback would add nothing.
                log.error(  # noqa: TRY400
                    "policy reload failed, keeping the previous policy: %s",
                    e,
                    extra={"policy_file": str(self._path)},
                )
                return False
            self._policy = policy
        log.info(
            "policy reloaded", extra={"policy_file": str(self._path), "roles": len(policy.roles)}
        )
        return True


SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Reloadable(Protocol):
    """Something re-read from its file on SIGHUP (the policy, the CRL)."""

    def reload(self) -> bool:
        """Re-read; True if the new content is in force, False if the old one is kept."""
        ...


def install_sighup(holder: Reloadable, *others: Reloadable) -> SignalHandler:
    """Reload ``holder`` (and ``others``) on SIGHUP (main thread only); returns the
    previous handler.

    The handler only starts a thread: file reads and logging inside a signal handler can
    deadlock with the interrupted main thread, and a slow disk must not stall it.
    """
    targets = (holder, *others)

    def reload_all() -> None:
        for target in targets:
            target.reload()

    def on_sighup(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=reload_all, name="policy-reload", daemon=True).start()

    return signal.signal(signal.SIGHUP, on_sighup)
