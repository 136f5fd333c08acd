"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary directory, on a free
loopback port, as the `postgres` user when the tests run as root (initdb and pg_ctl
refuse root). Each test gets a schema of its own (`PgCluster.url_for`), so tests share
one cluster, started once per session. CI starts the cluster itself (.ci/run) and names
it in $KUGETSU_TEST_DATABASE_URL (`Running`)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

from tests.service import free_port


def bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: $KUGETSU_PG_BIN, Debian's newest
    /usr/lib/postgresql/N/bin, or PATH."""
    if os.environ.get("KUGETSU_PG_BIN"):
        return Path(os.environ["KUGETSU_PG_BIN"])
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Running:
    """A cluster that runs already, at `url` (a superuser's, to its `postgres` database)."""

    def __init__(self, url: str):
        self.url = url

    def url_for(self, schema: str | None = None) -> str:
        """A URL whose connections work in a schema of their own, made now."""
        import psycopg

        schema = schema or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in self.url else "?"
        return f"{self.url}{sep}options={quote(f'-csearch_path={schema}')}"

    def stop(self) -> None:
        """Left running: whoever started it stops it."""


class PgCluster(Running):
    def __init__(self, binaries: Path):
        self.bin = binaries
        self.port = free_port()
        super().__init__(f"postgresql://postgres@127.0.0.1:{self.port}/postgres")
        self.root = Path(tempfile.mkdtemp(prefix="kugetsu-pg-"))
        self.data = self.root / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, *argv: str) -> None:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(
            command, check=True, capture_output=True, cwd=self.root, stdin=subprocess.DEVNULL
        )

    def start(self) -> PgCluster:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=400"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
