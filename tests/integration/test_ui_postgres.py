"""`latentforge ui --backend-store-uri postgresql://...` against a real PostgreSQL server: a throwaway cluster on
127.0.0.1 (initdb + pg_ctl from PATH, else from the `pgserver` package), runs logged over MLflow's HTTP API and
read back from PostgreSQL's own tables."""
from __future__ import annotations

import importlib.util
import ipaddress
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from lf_services import free_port, stop_group, wait_http
from test_ui_security import EXE, listening

pytestmark = pytest.mark.integration

DB_USER = "latentforge"
DB_NAME = "mlflow"
# PostgreSQL refuses to run as root; as root the cluster runs as the first of these that exists
UNPRIVILEGED = ("postgres", "nobody")
SOCKET_PATH_MAX = 100  # sun_path holds 107 bytes, and the socket's name ".s.PGSQL.NNNNN" comes on top


def postgres_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: from PATH, else from the `pgserver` wheel."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    if importlib.util.find_spec("pgserver") is not None:
        from pgserver._commands import POSTGRES_BIN_PATH

        candidates.append(Path(POSTGRES_BIN_PATH))
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def unprivileged_user() -> pwd.struct_passwd | None:
    for name in UNPRIVILEGED:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


@dataclass(frozen=True)
class Postgres:
    port: int
    datadir: Path

    @property
    def uri(self) -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def connect(self, dbname: str = DB_NAME):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=DB_USER, dbname=dbname, connect_timeout=10)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def stop_postgres(pg_ctl: list[str], pg: Postgres, as_user: dict) -> None:
    """pg_ctl stop -m fast; -m immediate if that hangs; SIGKILL to the postmaster as a last resort (its children
    exit when it dies), so no server outlives the test."""
    pid = pg.postmaster_pid()
    if pid is None:
        return
    for mode in ("fast", "immediate"):
        done = subprocess.run([*pg_ctl, "stop", "-D", str(pg.datadir), "-m", mode, "-w", "-t", "60"],
                              capture_output=True, text=True, **as_user)
        if done.returncode == 0 or not psutil.pid_exists(pid):
            return
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL cluster listening on 127.0.0.1:PORT (and a unix socket in its own directory) with
    trust auth for DB_USER and a database DB_NAME; always stopped at the end."""
    pytest.importorskip("psycopg2", reason="the postgres extra: pip install 'latentforge[postgres]'")
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or from the pgserver package")
    as_user: dict = {}
    owned_root = None
    if os.geteuid() == 0:
        user = unprivileged_user()
        if user is None:
            pytest.skip(f"running as root, which PostgreSQL refuses, and none of the users {UNPRIVILEGED} exists "
                        "to run it as")
        # tmp_path's parents are root's, mode 0700: the cluster's user could not reach a directory in there
        owned_root = root = Path(tempfile.mkdtemp(prefix="lf-pg-"))
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd=root,
                       env={"PATH": os.environ.get("PATH", ""), "HOME": str(root), "LC_ALL": "C"})
    else:
        root = tmp_path / "pg"
        root.mkdir()
    socket_dir = root if len(str(root)) < SOCKET_PATH_MAX - 20 else Path(tempfile.mkdtemp(prefix="lf-pgs-"))
    if socket_dir != root and as_user:
        os.chown(socket_dir, as_user["user"], as_user["group"])
    pg = Postgres(port=free_port(), datadir=root / "data")
    pg_ctl = [str(bindir / "pg_ctl")]
    try:
        done = subprocess.run([str(bindir / "initdb"), "-D", str(pg.datadir), "-U", DB_USER, "--auth=trust",
                               "-E", "UTF8", "--locale=C", "--no-sync"], capture_output=True, text=True, **as_user)
        assert done.returncode == 0, f"initdb failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        # fsync off: a throwaway cluster, and disk syncs are slow on a shared machine
        options = f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {socket_dir} -c fsync=off"
        done = subprocess.run([*pg_ctl, "start", "-D", str(pg.datadir), "-l", str(root / "postgres.log"), "-w",
                               "-t", "120", "-o", options], capture_output=True, text=True, **as_user)
        log = root / "postgres.log"
        assert done.returncode == 0, f"pg_ctl start failed: {done.stderr}\n{log.read_text()[-3000:] if log.exists() else ''}"
        conn = pg.connect("postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            conn.cursor().execute(f"CREATE DATABASE {DB_NAME}")
        finally:
            conn.close()
        yield pg
    finally:
        stop_postgres(pg_ctl, pg, as_user)
        for path in {owned_root, socket_dir if socket_dir != root else None} - {None}:
            shutil.rmtree(path, ignore_errors=True)


def start_ui(workdir: Path, uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`latentforge ui` (the CLI path a user runs) on 127.0.0.1 at a free port, once it answers /health. One
    server worker (`mlflow server` reads MLFLOW_WORKERS): its default four each import MLflow, minutes on 2 cores."""
    port = free_port()
    with open(log, "ab") as out:
        ui = subprocess.Popen([str(EXE), "ui", "--workdir", str(workdir), "--port", str(port),
                               "--backend-store-uri", uri], stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True, env={**os.environ, "MLFLOW_WORKERS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", ui, timeout=300)  # the first start creates MLflow's schema in PostgreSQL
    except BaseException as e:
        stop_group(ui)
        raise AssertionError(f"{e}\n{log.read_text()[-4000:]}") from None
    return ui, base


def all_loopback(sockets: list[tuple[str, str]]) -> bool:
    return bool(sockets) and all(ipaddress.ip_address(ip).is_loopback for _, ip in sockets)


def test_ui_on_a_real_postgresql_store(tmp_path, postgres):
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    workdir = tmp_path / "work"
    workdir.mkdir()
    log = tmp_path / "ui.log"
    ui, base = start_ui(workdir, postgres.uri, log)
    try:
        assert all_loopback(listening(ui.pid)), listening(ui.pid)
        assert all_loopback(listening(postgres.postmaster_pid())), listening(postgres.postmaster_pid())
        client = MlflowClient(base)
        experiment_id = client.create_experiment("pg-store")
        run = client.create_run(experiment_id, run_name="on-postgres")
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param("lr", "0.0003"), Param("stage", "256px")],
                         metrics=[Metric("loss", 1.0 / (step + 1), 1_700_000_000_000 + step, step)
                                  for step in range(3)])
        client.set_terminated(run_id)
    finally:
        stop_group(ui)
    assert ui.poll() is not None

    with postgres.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT r.name, r.status, e.name FROM runs r JOIN experiments e "
                    "ON r.experiment_id = e.experiment_id WHERE r.run_uuid = %s", (run_id,))
        assert cur.fetchall() == [("on-postgres", "FINISHED", "pg-store")]
        cur.execute("SELECT key, value FROM params WHERE run_uuid = %s ORDER BY key", (run_id,))
        assert cur.fetchall() == [("lr", "0.0003"), ("stage", "256px")]
        cur.execute("SELECT key, step, value FROM metrics WHERE run_uuid = %s ORDER BY step", (run_id,))
        assert cur.fetchall() == [("loss", 0, 1.0), ("loss", 1, 0.5), ("loss", 2, pytest.approx(1 / 3))]
    conn.close()

    # a second server on the same database (schema already there) still serves the run
    ui, base = start_ui(workdir, postgres.uri, log)
    try:
        client = MlflowClient(base)
        got = client.get_run(run_id)
        assert got.info.status == "FINISHED" and got.info.run_name == "on-postgres"
        assert got.data.params == {"lr": "0.0003", "stage": "256px"}
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == \
            [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
        assert [r.info.run_id for r in client.search_runs([got.info.experiment_id])] == [run_id]
    finally:
        stop_group(ui)


def test_ui_names_a_missing_database_driver(tmp_path):
    """Without the driver SQLAlchemy would load, `ui` says what to install instead of `mlflow server` dying in a
    traceback."""
    if importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed here; the test needs a PostgreSQL driver that is missing")
    done = subprocess.run([str(EXE), "ui", "--workdir", str(tmp_path), "--backend-store-uri",
                           "postgresql+pg8000://u@127.0.0.1:5432/db"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "300"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "driver 'pg8000' is not installed" in done.stdout and "latentforge[postgres]" in done.stdout
