"""A thread-safe pool of logged-in PKCS#11 sessions over python-pkcs11.

Two PKCS#11 rules shape this module:

* Login state belongs to the application, not to a session: once one session logs in,
  every session of the process on that token is logged in, a second ``C_Login`` fails
  with ``CKR_USER_ALREADY_LOGGED_IN``, and ``C_Logout`` on any session logs all of them
  out. So one "anchor" session per token and process holds the login
  (:class:`_TokenLogin`), shared by every pool on that token, and pooled sessions are
  opened without a PIN. python-pkcs11 only logs out sessions it logged in, so closing
  a pooled session never logs the others out.
* python-pkcs11 initialises modules with ``C_Initialize(NULL)``, which SoftHSM2 takes
  to mean "single-threaded" and so drops its own locks. Unless the configuration says
  the module locks anyway, a per-module lock is held while a session is lent out.

A session that fails with a "session or device is gone" error is dropped; the next
use opens a new one and logs in again if the login was lost, so the pool recovers after
a token restart.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import pkcs11
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11e
from prometheus_client import Histogram

from keystore.config import Pkcs11Config
from keystore.errors import (
    KeyNotFoundError,
    KeystoreError,
    PinError,
    TokenDeadlineError,
    TokenUnavailableError,
)

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib  # noqa: N812 - the vendor's class name

T = TypeVar("T")

# Errors after which a session (or the whole token connection) cannot be trusted again.
SESSION_LOST_ERRORS: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.UserNotLoggedIn,
    p11e.KeyHandleInvalid,
    p11e.ObjectHandleInvalid,
)


# Token operations are on every put and get (key wrap, unwrap, blind index, signing).
TOKEN_SECONDS = Histogram(
    "medvault_token_seconds", "Time of one PKCS#11 token operation (session wait included)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)  # fmt: skip

class SessionLostError(TokenUnavailableError):
    """The session broke during use (token restarted or removed); a retry may succeed."""


_registry_lock = threading.Lock()
_module_locks: dict[str, threading.RLock] = {}
_logins: dict[tuple[str, bytes], _TokenLogin] = {}
# How long a token that is not listed is looked for again (see ``find_token``).
TOKEN_LOOK_SECONDS = 1.5
# ... and at least this many times: on a busy host one look can take most of a second.
TOKEN_LOOKS = 8
# The threads finding a token or building a pool, per module: until a pool's login is
# made it holds no session ``_TokenLogin.in_use`` sees, yet re-reading the tokens
# (C_Finalize) under it would pull the module from under its calls.
_finding: dict[str, set[int]] = {}


class _TokenLogin:
    """The one logged-in anchor session of this process on one token, reference counted."""

    def __init__(self, token: pkcs11.Token) -> None:
        self._token = token
        self._anchor: pkcs11.Session | None = None
        self._users = 0
        self._lock = threading.Lock()

    def acquire(self, config: Pkcs11Config) -> None:
        """Register one more pool and make sure the token is logged in."""
        with self._lock:
            self._ensure_locked(config)
            self._users += 1

    def release(self) -> None:
        """Unregister a pool; the last one out logs the process out of the token."""
        with self._lock:
            self._users -= 1
            if self._users <= 0 and self._anchor is not None:
                _close_quietly(self._anchor)
                self._anchor = None

    @property
    def in_use(self) -> bool:
        """Whether a pool holds this login, or its anchor session is still open."""
        with self._lock:
            return self._users > 0 or self._anchor is not None

    def ensure(self, config: Pkcs11Config) -> bool:
        """Log in again if the login was lost; return True if a new login was made."""
        with self._lock:
            return self._ensure_locked(config)

    def _ensure_locked(self, config: Pkcs11Config) -> bool:
        if self._anchor is not None and _is_logged_in(self._anchor):
            return False
        if self._anchor is not None:
            _close_quietly(self._anchor)
            self._anchor = None
        self._anchor = _log_in(self._token, config)
        return True


def _is_logged_in(session: pkcs11.Session) -> bool:
    """Probe the login: only a logged-in session may create a private object."""
    try:
        probe = session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: False,
                Attribute.PRIVATE: True,
                Attribute.LABEL: "medvault-login-probe",
            }
        )
        probe.destroy()
    except p11e.PKCS11Error:
        return False
    return True


def _log_in(token: pkcs11.Token, config: Pkcs11Config) -> pkcs11.Session:
    """Open the anchor session and log it in, translating PIN errors."""
    label = config.token_label
    pin = config.read_pin()
    try:
        return token.open(rw=True, user_pin=pin)
    except p11e.UserAlreadyLoggedIn:
        # Someone else in this process logged in (the login is process-wide); a plain
        # session shares that login. The session C_Login refused is left to the module:
        # python-pkcs11 does not return its handle. This happens at most once per login.
        return _open_plain(token, label)
    except p11e.PinIncorrect as e:
        raise PinError(f"PIN rejected by token {label}; check {config.pin_source()}") from e
    except p11e.PinLocked as e:
        raise PinError(
            f"the user PIN of token {label} is locked; the security officer must reset it"
        ) from e
    except (p11e.PinInvalid, p11e.PinLenRange, p11e.PinExpired) as e:
        raise PinError(
            f"PIN not accepted by token {label} ({type(e).__name__}); check {config.pin_source()}"
        ) from e
    except p11e.UserPinNotInitialized as e:
        raise PinError(f"token {label} has no user PIN yet; initialise the token") from e
    except p11e.PKCS11Error as e:
        raise TokenUnavailableError(f"cannot log in to token {label}: {type(e).__name__}") from e


def _open_plain(token: pkcs11.Token, label: str) -> pkcs11.Session:
    """Open a read/write session without logging in (it shares the process login)."""
    try:
        return token.open(rw=True)
    except p11e.PKCS11Error as e:
        raise TokenUnavailableError(
            f"cannot open a session on token {label}: {type(e).__name__}"
        ) from e


def _close_quietly(session: pkcs11.Session) -> None:
    """Close a session that may already be gone; there is nothing useful to report."""
    with suppress(p11e.PKCS11Error):
        session.close()


def one_shot(result: bytes | object) -> bytes:
    """The bytes of a single-part operation's result.

    python-pkcs11 returns bytes for bytes input (an iterator only for streamed input).
    """
    if not isinstance(result, bytes):
        raise TypeError("expected a single-part PKCS#11 result")
    return result


def load_module(module_path: str) -> Pkcs11Lib:
    """Load (once per process) the PKCS#11 module at ``module_path``."""
    if not os.path.isfile(module_path):
        raise TokenUnavailableError(
            f"PKCS#11 module not found at {module_path}; install softhsm2 "
            "(apt-get install softhsm2) or set keystore.module"
        )
    try:
        return pkcs11.lib(module_path)
    except (OSError, RuntimeError) as e:
        raise TokenUnavailableError(
            f"PKCS#11 module at {module_path} cannot be loaded: {type(e).__name__}"
        ) from e


def find_token(lib: Pkcs11Lib, config: Pkcs11Config) -> pkcs11.Token:
    """Return the token labelled ``config.token_label`` or say how to create it.

    SoftHSM2 rewrites a token's ``token.object`` on every login. A process that loads
    the module while another process logs in may find that file half written: the
    token fails its integrity check and is not listed (SoftHSMv2 issue 757; seen when
    replicas start together). So a token that is not listed is looked for again, for a
    moment, after the module re-reads its tokens; only while this process holds no
    session on the module and no other thread of it is finding a token or building a
    pool there, since re-reading (``C_Finalize``) would close the sessions and pull the
    module from under those calls.
    """
    with _finding_token(config.module_path):
        return _find_token(lib, config)


@contextmanager
def _finding_token(module_path: str) -> Iterator[None]:
    """Count this thread among those finding a token of the module (or building a pool
    on it) while the block runs: ``_reread_tokens`` does nothing while another is."""
    me = threading.get_ident()
    with _registry_lock:
        finders = _finding.setdefault(module_path, set())
        added = me not in finders
        finders.add(me)
    try:
        yield
    finally:
        if added:
            with _registry_lock:
                finders.discard(me)


def _find_token(lib: Pkcs11Lib, config: Pkcs11Config) -> pkcs11.Token:
    label = config.token_label
    deadline = time.monotonic() + TOKEN_LOOK_SECONDS
    pause = 0.02
    looks = 1
    while True:
        try:
            return lib.get_token(token_label=label)
        except p11e.MultipleTokensReturned as e:
            raise TokenUnavailableError(
                f"more than one PKCS#11 token is labelled {label!r}; labels must be unique"
            ) from e
        except p11e.PKCS11Error as e:
            # Not listed (NoSuchToken), listed but its details unreadable (GeneralError),
            # or a re-read that failed half way: each may be the moment of another
            # process's write, so each is looked at again; the last one is reported.
            spent = time.monotonic() + pause > deadline and looks >= TOKEN_LOOKS
            if spent or not _reread_tokens(lib, config, pause):
                raise _not_found(config, e) from e
            looks += 1
            pause = min(pause * 2, 0.5)


def _not_found(config: Pkcs11Config, error: p11e.PKCS11Error) -> TokenUnavailableError:
    label = config.token_label
    if isinstance(error, p11e.NoSuchToken):
        return TokenUnavailableError(
            f"no PKCS#11 token labelled {label!r} in {config.module_path}; create it "
            f"with `softhsm2-util --init-token --free --label {label}` or `medvault stack up`"
        )
    return TokenUnavailableError(
        f"cannot list tokens of {config.module_path}: {type(error).__name__}"
    )


def _reread_tokens(lib: Pkcs11Lib, config: Pkcs11Config, pause: float) -> bool:
    """After ``pause``, have the module re-read its tokens; False (nothing done) while a
    pool of this process has the module in use, or another thread is finding a token on
    it or building a pool (cold review 12: a C_Finalize there, SoftHSM2 running without
    its locks, pulled the module from under its calls)."""
    time.sleep(pause)
    with _registry_lock:
        logins = _logins.items()
        if any(module == config.module_path and login.in_use for (module, _), login in logins):
            return False
        if _finding.get(config.module_path, set()) - {threading.get_ident()}:
            return False
        with suppress(p11e.PKCS11Error):  # a look that failed: the next one says
            lib.reinitialize()
    return True


def _shared(config: Pkcs11Config, token: pkcs11.Token) -> tuple[_TokenLogin, threading.RLock]:
    """Return the process-wide login and module lock for this module and token."""
    with _registry_lock:
        key = (config.module_path, token.serial)
        login = _logins.setdefault(key, _TokenLogin(token))
        lock = _module_locks.setdefault(config.module_path, threading.RLock())
    return login, lock


@dataclass(eq=False)
class _Pooled:
    """A pooled session and the key handles found on it (handles are per session)."""

    session: pkcs11.Session
    keys: dict[str, pkcs11.Key] = field(default_factory=dict)
    suspect: bool = False  # closed on return instead of being lent again


class Pkcs11SessionPool:
    """Bounded pool of logged-in sessions on one token; use ``with pool.session() as s``.

    Constructing the pool loads the module, finds the token and logs in, so a wrong
    module path, token label or PIN fails at start-up rather than on the first request.
    Do not nest ``session()`` calls in one thread: the pool is bounded.
    """

    def __init__(
        self, config: Pkcs11Config, time_left: Callable[[], float | None] = lambda: None
    ) -> None:
        self.config = config
        # How long the current caller may still wait (None: no bound; 0: start nothing).
        # The service passes its call deadlines' (storage.deadlines) here.
        self._time_left = time_left
        lib = load_module(config.module_path)
        with _finding_token(config.module_path):  # until its login holds a session
            self._token = find_token(lib, config)
            self._login, module_lock = _shared(config, self._token)
            self._login.acquire(config)
        self._module_lock: threading.RLock | None = module_lock if config.serialize_calls else None
        self._slots = threading.BoundedSemaphore(config.pool_size)
        self._idle: list[_Pooled] = []
        self._lent: dict[int, _Pooled] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Pkcs11SessionPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[pkcs11.Session]:
        """Lend a logged-in session; a session lost during use is dropped, not reused.

        A caller with a deadline (``time_left``) waits for a free session only as long
        as it has left, and starts nothing once it has none: ``TokenDeadlineError``.
        """
        with self._slot(), self._serialized():
            pooled = self._checkout()
            try:
                yield pooled.session
            except SESSION_LOST_ERRORS as e:
                # One lost session usually means the token restarted: its siblings are
                # gone too, so drop them all rather than fail once per idle session.
                self._discard(pooled)
                self._drain_idle()
                raise SessionLostError(
                    f"lost the session to token {self.config.token_label} "
                    f"({type(e).__name__}); the next use opens a new one"
                ) from e
            except p11e.PKCS11Error as e:
                # Vendor errors stop at this edge; the session itself is still sound.
                self._checkin(pooled)
                raise KeystoreError(
                    f"PKCS#11 operation failed on token {self.config.token_label}: "
                    f"{type(e).__name__}"
                ) from e
            except BaseException:
                self._checkin(pooled)
                raise
            self._checkin(pooled)

    def run(self, operation: Callable[[pkcs11.Session], T]) -> T:
        """Run ``operation`` on a lent session, retrying once on a fresh session if lost.

        Only for idempotent operations (encrypt, decrypt, sign, lookups).
        """
        with TOKEN_SECONDS.time():
            try:
                with self.session() as session:
                    return operation(session)
            except SessionLostError:
                with self.session() as session:
                    return operation(session)

    def find_key(
        self, session: pkcs11.Session, label: str, object_class: ObjectClass
    ) -> pkcs11.Key:
        """Return the key ``label`` on a lent session, from its cache when possible."""
        pooled = self._lent.get(id(session))
        cache = pooled.keys if pooled is not None else {}
        key = cache.get(label)
        if key is None:
            key = self._search_key(session, label, object_class)
            cache[label] = key
        return key

    def discard_after_use(self, session: pkcs11.Session) -> None:
        """Close a lent ``session`` when it is returned instead of lending it again.

        For an operation that failed in a way the session may be to blame for: a retry
        then runs on another (or a new) session.
        """
        pooled = self._lent.get(id(session))
        if pooled is not None:
            pooled.suspect = True

    def forget_keys(self) -> None:
        """Drop the cached key handles of idle sessions (after keys were added or removed)."""
        with self._lock:
            for pooled in self._idle:
                pooled.keys.clear()

    def close(self) -> None:
        """Close idle sessions now and lent ones on return; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._drain_idle()
        self._login.release()

    @contextmanager
    def _slot(self) -> Iterator[None]:
        """Hold one of the pool's places, waiting no longer than the caller has left."""
        left = self._time_left()
        if left is None:
            self._slots.acquire()
        elif left <= 0 or not self._slots.acquire(timeout=min(left, threading.TIMEOUT_MAX)):
            raise TokenDeadlineError(
                f"no session of token {self.config.token_label} was free within the call's "
                "deadline; the token operation was not started"
            )
        try:
            yield
        finally:
            self._slots.release()

    @contextmanager
    def _serialized(self) -> Iterator[None]:
        if self._module_lock is None:
            yield
            return
        with self._module_lock:
            yield

    def _search_key(
        self, session: pkcs11.Session, label: str, object_class: ObjectClass
    ) -> pkcs11.Key:
        """Find a key; when absent, rule out a lost login before saying it is missing."""
        for attempt in range(2):
            try:
                return session.get_key(object_class=object_class, label=label)
            except p11e.NoSuchKey as e:
                # Private keys are invisible when logged out; log in again and look once more.
                if attempt == 0 and self._login.ensure(self.config):
                    continue
                raise KeyNotFoundError(
                    f"key {label!r} not found on token {self.config.token_label}"
                ) from e
            except p11e.MultipleObjectsReturned as e:
                raise KeyNotFoundError(
                    f"more than one key is labelled {label!r} on token "
                    f"{self.config.token_label}; labels must be unique"
                ) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _checkout(self) -> _Pooled:
        with self._lock:
            if self._closed:
                raise KeystoreError("the PKCS#11 session pool is closed")
            pooled = self._idle.pop() if self._idle else None
        if pooled is None:
            self._login.ensure(self.config)
            pooled = _Pooled(_open_plain(self._token, self.config.token_label))
        self._lent[id(pooled.session)] = pooled
        return pooled

    def _checkin(self, pooled: _Pooled) -> None:
        if pooled.suspect:
            self._discard(pooled)
            return
        self._lent.pop(id(pooled.session), None)
        with self._lock:
            if not self._closed:
                self._idle.append(pooled)
                return
        _close_quietly(pooled.session)

    def _drain_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for pooled in idle:
            _close_quietly(pooled.session)

    def _discard(self, pooled: _Pooled) -> None:
        self._lent.pop(id(pooled.session), None)
        _close_quietly(pooled.session)
