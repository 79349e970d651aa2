"""CURVE authentication and encryption of rrstem's ZeroMQ sockets, and the warning for sockets open to a network.

``rrstem keys DIR`` (``make_keys``) writes one folder of certificates
(pyzmq's ``zmq.auth`` format) that every program is given as ``--keys DIR``:

==========================  ====================================================================
``server.key_secret``       the side that **binds**: ``rrstem serve`` (snapshots, control, frames
                            with ``--bind``) and a sender that binds. Secret.
``authorized/*.key``        public keys of the clients the binding side lets in (``client.key``
                            is there; drop another client's ``.key`` in to let it in too)
``server.key``              the side that **connects**: dashboards, control clients, a sender that
                            connects, ``serve`` without ``--bind``. Public.
``client.key_secret``       the side that connects. Secret.
``client.key``              the client's public key (the copy in ``authorized/`` is what counts)
==========================  ====================================================================

The rule is ZeroMQ's: the socket that binds is the CURVE server, the one
that connects the CURVE client, which must know the server's public key.
A ``Curve`` sets a socket up for its side (``secure``). Server sockets get a
ZAP domain of their own, served by one ``ThreadAuthenticator`` per ZeroMQ
context, which lets in only the public keys in ``authorized/``. A peer
without CURVE, without the server's public key, or with a client key that is
not authorized fails the handshake: it receives nothing and nothing it sends
is read. Refused client keys are logged (once per key) and counted
(``Curve.refused``).

``exposure_warning`` is the message for sockets bound beyond the loopback
interface without CURVE: anyone on that network can use them.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import threading
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("rrstem.auth")

SERVER, CLIENT, AUTHORIZED = "server", "client", "authorized"
#: file name -> who needs it, as ``rrstem keys`` prints it
ROLES = {
    f"{SERVER}.key_secret": "secret: the side that binds (rrstem serve; a sender that binds). Keep it there",
    f"{AUTHORIZED}/": "client public keys the binding side lets in (add another client's .key file to let it in)",
    f"{SERVER}.key": "public: every side that connects (dashboard, control clients, a sender with --connect, "
                     "serve without --bind)",
    f"{CLIENT}.key_secret": "secret: every side that connects",
    f"{CLIENT}.key": "public: the client's key (its copy in authorized/ is what lets it in)",
}


def make_keys(directory: str | Path, force: bool = False) -> list[Path]:
    """Write a server and a client certificate pair into ``directory`` (made if needed), and authorize the client.

    Secret files are mode 0600, the folder 0700 if made here. Existing keys are
    kept, with a ``ValueError`` that says so, unless ``force``. Returns the
    files written.
    """
    folder = Path(directory)
    names = [f"{n}{ext}" for n in (SERVER, CLIENT) for ext in (".key", ".key_secret")]
    existing = [n for n in [*names, f"{AUTHORIZED}/{CLIENT}.key"] if (folder / n).exists()]
    if existing and not force:
        raise ValueError(f"{folder} already holds keys ({', '.join(existing)}); programs using them would be locked "
                         "out by new ones. Keep them, or add --force to replace them (then copy the new server.key "
                         "and client files to every machine)")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder for keys")
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
    (folder / AUTHORIZED).mkdir(exist_ok=True)
    old = os.umask(0o077)  # secret files are never readable by others, not even for a moment
    try:
        written = []
        for name in (SERVER, CLIENT):
            for ext in (".key", ".key_secret"):
                (folder / f"{name}{ext}").unlink(missing_ok=True)
            public, secret = zmq.auth.create_certificates(folder, name)
            written += [Path(public), Path(secret)]
        authorized = folder / AUTHORIZED / f"{CLIENT}.key"
        authorized.write_bytes((folder / f"{CLIENT}.key").read_bytes())
        written.append(authorized)
    finally:
        os.umask(old)
    for path in written:
        path.chmod(0o600 if path.suffix == ".key_secret" else 0o644)
    return written


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ValueError(f"no {path.name} in {path.parent}: make the keys with `rrstem keys {path.parent}` (or copy "
                         f"{path.name} there from the folder it made)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a CURVE certificate ({exc}); make one with `rrstem keys`") from None
    if secret and secret_key is None:
        raise ValueError(f"{path} holds no secret key: give the .key_secret file that `rrstem keys` wrote")
    return public, secret_key


class _Authorized:
    """The ZAP check of one domain: is a client's public key in the ``authorized/`` folder?

    The folder is read again (at most once a second) when an unknown key
    knocks, so a client's key added while the service runs is let in.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.keys = self._read()
        self.refused = 0
        self._read_at = time.monotonic()
        self._logged: set[bytes] = set()
        self._lock = threading.Lock()

    def _read(self) -> set[bytes]:
        return set(zmq.auth.load_certificates(self.folder)) if self.folder.is_dir() else set()

    def callback(self, domain: str, key: bytes) -> bool:  # called on the authenticator's thread
        if key in self.keys:
            return True
        with self._lock:
            if time.monotonic() - self._read_at > 1.0:
                self.keys, self._read_at = self._read(), time.monotonic()
                if key in self.keys:
                    return True
            self.refused += 1
            if key not in self._logged and len(self._logged) < 20:
                self._logged.add(key)
                log.warning("refused a CURVE client whose public key %s is not in %s (it gets nothing, and nothing "
                            "it sends is read); to let it in, put its .key file there", key.decode(), self.folder)
        return False


class _Authenticators:
    """One ZAP authenticator per ZeroMQ context (ZAP is per context), shared by every ``Curve`` domain on it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_context: dict[int, ThreadAuthenticator] = {}

    def add(self, ctx: zmq.Context, domain: str, check: _Authorized) -> None:
        with self._lock:
            auth = self._by_context.get(id(ctx))
            if auth is None:
                auth = ThreadAuthenticator(ctx, log=logging.getLogger("rrstem.auth.zap"))
                auth.start()
                self._by_context[id(ctx)] = auth
            auth.configure_curve_callback(domain, check)

    def remove(self, ctx: zmq.Context, domain: str) -> None:
        with self._lock:
            auth = self._by_context.get(id(ctx))
            if auth is None:
                return
            auth.credentials_providers.pop(domain, None)
            if not auth.credentials_providers:
                auth.stop()
                del self._by_context[id(ctx)]


_AUTHENTICATORS = _Authenticators()
_DOMAINS = itertools.count(1)


class Curve:
    """CURVE for the sockets of one program (one ZeroMQ context), from a ``rrstem keys`` folder.

    ``secure(sock, server=True)`` before a socket binds, ``server=False``
    before it connects. The files each side needs are read on first use, and
    a missing one is a ``ValueError`` that names it. ``close()`` ends this
    program's ZAP domain (the authenticator stops with the last one).
    """

    def __init__(self, directory: str | Path, context: zmq.Context | None = None):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"keys folder {self.directory} does not exist; make one with `rrstem keys "
                             f"{self.directory}`")
        if not zmq.has("curve"):
            raise ValueError("this libzmq was built without CURVE; install pyzmq's wheel (it has CURVE)")
        self.ctx = context or zmq.Context.instance()
        self._server: tuple[bytes, bytes] | None = None
        self._client: tuple[bytes, bytes, bytes] | None = None
        self._check: _Authorized | None = None
        self._domain: str | None = None

    def __repr__(self) -> str:
        return f"Curve({str(self.directory)!r})"

    @property
    def refused(self) -> int:
        """Client keys refused so far on this program's server sockets."""
        return self._check.refused if self._check is not None else 0

    def secure(self, sock: zmq.Socket, server: bool) -> None:
        """Set ``sock`` up as the CURVE server (it will bind) or client (it will connect). Before bind/connect."""
        if server:
            if sock.context is not self.ctx:  # ZAP is per context: elsewhere, no authenticator would check clients
                raise ValueError("a CURVE server socket must belong to the ZeroMQ context its Curve was made for")
            sock.curve_publickey, sock.curve_secretkey = self._server_keys()
            sock.zap_domain = self._domain.encode()
            sock.curve_server = True
        else:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self._client_keys()

    def ready(self, server: bool) -> "Curve":
        """Read the files of one side now, so that a missing one is said at start-up; returns self."""
        self._server_keys() if server else self._client_keys()
        return self

    def _server_keys(self) -> tuple[bytes, bytes]:
        if self._server is None:
            public, secret = _load(self.directory / f"{SERVER}.key_secret", secret=True)
            folder = self.directory / AUTHORIZED
            if not folder.is_dir():
                raise ValueError(f"no {AUTHORIZED}/ folder in {self.directory}: the binding side lets in the client "
                                 f"keys found there; make the keys with `rrstem keys {self.directory}`")
            self._check = _Authorized(folder)
            if not self._check.keys:
                log.warning("%s holds no client keys: no client can connect", folder)
            self._domain = f"rrstem-{os.getpid()}-{next(_DOMAINS)}"
            _AUTHENTICATORS.add(self.ctx, self._domain, self._check)
            self._server = (public, secret)
        return self._server

    def _client_keys(self) -> tuple[bytes, bytes, bytes]:
        if self._client is None:
            public, secret = _load(self.directory / f"{CLIENT}.key_secret", secret=True)
            server_public, _ = _load(self.directory / f"{SERVER}.key", secret=False)
            self._client = (public, secret, server_public)
        return self._client

    def close(self) -> None:
        if self._domain is not None:
            _AUTHENTICATORS.remove(self.ctx, self._domain)
            self._domain, self._server = None, None


def curve_for(keys: "str | Path | Curve | None", context: zmq.Context | None = None) -> Curve | None:
    """``keys`` as a ``Curve``: a folder made by ``rrstem keys`` (read for ``context``), a ``Curve``, or None."""
    if keys is None or isinstance(keys, Curve):
        return keys
    return Curve(keys, context)


# --- sockets open to a network --------------------------------------------------------------------

#: what anyone who reaches a socket bound without CURVE can do, by its role
EXPOSURE = {
    "frames": "send frames into the scans",
    "snapshots": "read the maps as they are made",
    "control": "control the service (stop it, reset its model, write its results elsewhere)",
    "sender": "take the frames this sender sends",
}


def is_local(endpoint: str) -> bool:
    """Whether a bound endpoint is reachable from this machine only: loopback TCP, ``ipc://``, ``inproc://``."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # *, an interface name, a host name: not loopback
        return False


def exposure_warning(bound: list[tuple[str, str]]) -> str | None:
    """The warning for sockets bound without CURVE, given as (endpoint, role in ``EXPOSURE``); None if all are local."""
    open_ = [(ep, role) for ep, role in bound if ep and not is_local(ep)]
    if not open_:
        return None
    names = ", ".join(f"{ep} ({role})" for ep, role in open_)
    can = list(dict.fromkeys(EXPOSURE[role] for _, role in open_))
    can = ", ".join(can[:-1]) + " and " + can[-1] if len(can) > 1 else can[0]
    return (f"{names} {'is' if len(open_) == 1 else 'are'} bound beyond this machine without authentication: "
            f"anyone on that network can {can}. Turn CURVE authentication and encryption on: `rrstem keys DIR` once, "
            "then --keys DIR here and on every program that connects (docs/protocol.md, Authentication); or bind "
            "127.0.0.1")


def warn_if_exposed(bound: list[tuple[str, str]]) -> str | None:
    """Log ``exposure_warning(bound)`` at WARNING if there is one; returns it."""
    message = exposure_warning(bound)
    if message:
        log.warning("%s", message)
    return message
