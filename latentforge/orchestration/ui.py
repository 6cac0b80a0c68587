"""`latentforge ui`: the `mlflow server` command for a workdir's store (or any backend store URI), bound to
loopback unless asked otherwise, optionally behind MLflow's basic-auth app."""
from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from latentforge.orchestration.tracking import artifact_root, default_tracking_uri

AUTH_CONFIG = "basic_auth.ini"
AUTH_DB = "basic_auth.db"
SECRET_FILE = ".mlflow_flask_secret"


class UiError(ValueError):
    """A `ui` invocation that cannot start; the message says what to do."""


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]
    env: dict[str, str]
    url: str


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to them (localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def auth_config(workdir: Path) -> Path:
    """MLflow's basic-auth config for this workdir: its user database beside the tracking store (MLflow's own
    default is `basic_auth.db` in whatever directory the server was started from). The admin password is
    never written here: it comes from MLFLOW_AUTH_ADMIN_PASSWORD the first time the server starts."""
    path = workdir / AUTH_CONFIG
    if not path.exists():
        path.write_text("[mlflow]\n"
                        "default_permission = READ\n"
                        f"database_uri = sqlite:///{(workdir / AUTH_DB).resolve()}\n"
                        "admin_username = admin\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


def csrf_secret(workdir: Path) -> str:
    """The auth app's CSRF key (MLflow requires a static one): made once per workdir, readable by its owner only."""
    path = workdir / SECRET_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def check_driver(uri: str) -> None:
    """The database driver SQLAlchemy would load for `uri` must be importable; otherwise `mlflow server` dies
    with a traceback. SQLAlchemy picks the driver (2.1 loads psycopg 3 for a bare postgresql://, 2.0 psycopg2),
    so ask it rather than restating its defaults."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect = make_url(uri).get_dialect()
    except (ArgumentError, NoSuchModuleError) as e:
        raise UiError(f"--backend-store-uri: not a database URI SQLAlchemy can use ({e})") from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        extra = " (pip install 'latentforge[postgres]')" if dialect.name == "postgresql" else ""
        raise UiError(f"--backend-store-uri: the {dialect.name} driver {dialect.driver!r} is not installed{extra}: "
                      f"{e}") from None


def server_command(workdir: Path, port: int, host: str = "127.0.0.1", backend_store_uri: str | None = None,
                   artifacts_destination: str | None = None, auth: bool = False,
                   environ: dict[str, str] | None = None) -> ServerCommand:
    """The `mlflow server` argv and environment; raises UiError for a store or auth setup that cannot work."""
    environ = dict(os.environ if environ is None else environ)
    workdir = workdir.resolve()
    if backend_store_uri is None:
        if not (workdir / "mlflow.db").exists():
            raise UiError(f"no MLflow store at {workdir / 'mlflow.db'}: run `latentforge run CONFIG` first, "
                          "or pass --backend-store-uri")
        backend_store_uri = default_tracking_uri(workdir)
    elif not backend_store_uri.startswith(("sqlite:", "postgresql:", "postgresql+", "mysql:", "mysql+")):
        raise UiError(f"--backend-store-uri {backend_store_uri!r}: expected sqlite:///... or postgresql://...")
    else:
        check_driver(backend_store_uri)
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    argv = [mlflow, "server", "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", artifacts_destination or artifact_root(workdir), "--host", host,
            "--port", str(port)]
    # MLflow's server-side job runner (GenAI evaluation jobs) starts eight worker processes: not needed to
    # browse training runs, and heavy on a small machine. An explicit setting in the environment wins.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **environ}
    if auth:
        argv += ["--app-name", "basic-auth"]
        if "MLFLOW_AUTH_CONFIG_PATH" not in env:
            workdir.mkdir(parents=True, exist_ok=True)
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(workdir))
            if not (workdir / AUTH_DB).exists() and not env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
                raise UiError("--auth: set MLFLOW_AUTH_ADMIN_PASSWORD for the first start; it becomes the "
                              f"password of user 'admin' (stored hashed in {workdir / AUTH_DB})")
        if not env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = csrf_secret(workdir)
    return ServerCommand(argv, env, server_url(host, port))


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on, naming a free one: MLflow would print its URL, start its
    workers and only then fail to bind. Bound as the server binds (SO_REUSEADDR), so a port in TIME_WAIT passes;
    any other error is left for the server to report."""
    def taken(candidate: int) -> bool:
        try:
            socket.create_server((host, candidate)).close()
        except OSError as e:
            return e.errno == errno.EADDRINUSE
        return False

    if not taken(port):
        return
    free = next((p for p in range(port + 1, min(port + 50, 65536)) if not taken(p)), None)
    hint = f"; --port {free} is free" if free is not None else ""
    raise UiError(f"port {port} on {host} is in use (another MLflow UI?){hint}")


def server_url(host: str, port: int) -> str:
    """The URL to open for a server bound to `host`: loopback for a wildcard bind, an IPv6 literal in brackets
    (RFC 3986; a zone id's '%' escaped as %25)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    try:
        if ipaddress.ip_address(shown.split("%")[0]).version == 6:
            shown = f"[{shown.replace('%', '%25')}]"
    except ValueError:  # a host name
        pass
    return f"http://{shown}:{port}"
