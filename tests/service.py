"""Runs `kugetsu serve` as a real process for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import requests

from tests.conftest import SANDBOX, SERVICE_UID, depends_on_mode, first_uid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    """A config file, private as one holding the token should be. In sandbox runs it gets
    `sandbox.mode = "user"` (unless it says otherwise) and belongs to the service user,
    who reads it after `serve` drops to it."""
    if "sandbox" not in tables:
        depends_on_mode()
        if SANDBOX == "user":
            tables = {"sandbox": {"mode": "user", "user": str(SERVICE_UID)}, **tables}
    sandbox = tables.get("sandbox", {})
    if sandbox.get("mode") in ("user", "auto") and "first_uid" not in sandbox:
        # the test's own slot uids (tests/conftest.py: first_uid)
        tables = {**tables, "sandbox": {**sandbox, "first_uid": first_uid()}}
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    if sandbox.get("mode") in ("user", "auto"):
        user = str(sandbox.get("user", SERVICE_UID))
        if user.isdigit():
            os.chown(path, int(user), int(user))
    return path


def json_lines(svc: Service) -> list[dict[str, Any]]:
    """The service's log lines, each a JSON object (the one line it prints is not a log)."""
    lines = [line for line in svc.logs().splitlines() if not line.startswith("kugetsu ")]
    return [json.loads(line) for line in lines if line.strip()]


def problems(body: dict[str, Any]) -> list[str]:
    """/healthz's problems but the sandbox's: a suite run as root without the sandbox is
    warned of that at every start (tests/test_sandbox.py checks the warning)."""
    return [p for p in body["problems"] if not p.startswith("sandbox:")]


def workers(pid: int) -> list[int]:
    """The live worker processes `serve` (pid) started (beside it: the sandbox's launcher)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z" and b"worker" in argv:
                found.append(int(entry))
    return found


#: runs `python -m bot ARGS...` with the soft limit of open files set to argv[1]
_WITH_FD_LIMIT = (
    "import os, resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE,\n"
    "                   (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'bot', *sys.argv[2:]])\n"
)


class Service:
    """`kugetsu serve --config PATH` in its own process; logs go to a file. `fd_limit`:
    start it with that soft limit of open files, as a service manager might. `args`: more
    arguments to `serve` (`--role worker`)."""

    def __init__(
        self,
        config_path: Path,
        port: int,
        workdir: Path,
        env: dict[str, str] | None = None,
        fd_limit: int | None = None,
        args: tuple[str, ...] = (),
    ):
        self.args = args
        self.config_path, self.port, self.workdir = config_path, port, workdir
        self.args = args
        self.fd_limit = fd_limit
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / f"service-{port}.log"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(workdir),
            "LANG": "C.UTF-8",
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    #: every Service started and not yet stopped: a test that fails half-way stops
    #: them at its end (tests/conftest.py), so none lives on to run agents as slot
    #: uids beside the next test's
    started: ClassVar[set[Service]] = set()

    @classmethod
    def stop_all(cls, but: Iterable[Service] = ()) -> None:
        for svc in cls.started - set(but):
            with contextlib.suppress(Exception):
                svc.stop()
            cls.started.discard(svc)

    def start(self, timeout: float = 30.0) -> Service:
        self.starts += 1
        launch = (
            [sys.executable, "-m", "bot"]
            if self.fd_limit is None
            else [sys.executable, "-c", _WITH_FD_LIMIT, str(self.fd_limit)]
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*launch, "serve", "--config", str(self.config_path), *self.args],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        Service.started.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kugetsu exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"kugetsu did not become healthy:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def post(self, body: bytes, headers: dict[str, str]) -> requests.Response:
        return requests.post(self.url + "/webhook", data=body, headers=headers, timeout=10)

    def kill9(self) -> None:
        """SIGKILL to the whole service (receiver and worker), as `docker kill` does.
        Agents run in sessions of their own and survive as orphans."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int:
        Service.started.discard(self)
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bot", *args, "--config", str(self.config_path)],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
