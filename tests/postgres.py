"""A real PostgreSQL server for the keeper's tests: initdb into a temporary
directory as the unprivileged ``postgres`` user (the server refuses to run as
root), listening on a Unix socket in that directory only, stopped at the end."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class Server:
    def __init__(self):
        self.bin = binaries()
        self.user = pwd.getpwnam("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="imafs-pg-"))
        os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = self.dir / "data"
        self.names = itertools.count()
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", self.data, "-l", self.dir / "log", "-w", "-t", "60", "-o",
                  f"-c listen_addresses='' -k {self.dir} -c fsync=on -c max_connections=200", "start")

    def _run(self, prog, *args):
        subprocess.run(["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--clear-groups",
                        str(self.bin / prog), *map(str, args)], check=True, capture_output=True, timeout=120,
                       cwd=self.dir)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@/{db}?host={self.dir}"

    def new_database(self) -> str:
        import psycopg
        name = f"keeper{next(self.names)}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def restart(self):
        """Stopped at once (connections cut, as a crash or a failover does), then started again."""
        self._run("pg_ctl", "-D", self.data, "-l", self.dir / "log", "-m", "immediate", "-w", "-t", "60", "restart")

    def stop(self):
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
