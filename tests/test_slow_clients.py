"""Connections that send nothing, or half a request, do not hold up Gitea's deliveries.

Anyone who can reach the port can open connections without authenticating. Gitea gives
a delivery 5 s and never retries it, so a delivery answered later than that is lost.
`kugetsu serve` runs as a process, started with a soft limit of 512 open files (below
the 500 hostile connections plus what the receiver needs of its own), as a service
manager may start it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path

import pytest
import requests

from tests import payloads
from tests.conftest import SECRET, TOKEN, wait_for
from tests.service import Service, free_port, workers, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.both_modes]

#: what Gitea waits for an answer; a delivery answered later is lost
GITEA_DELIVERY_TIMEOUT_SECONDS = 5.0
HOSTILE_CONNECTIONS = 500
STARTING_FD_LIMIT = 512


def soft_fd_limit(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    return int(re.search(r"^Max open files\s+(\d+)", text, re.M).group(1))


def socket_count(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def hostile_connections(port: int, n: int) -> list[socket.socket]:
    """n connections: a third send nothing, a third stop inside the headers, a third
    send whole headers and stop inside the body."""
    partial = (
        b"",
        b"POST /webhook HTTP/1.1\r\nHost: kugetsu\r\nContent-Type: applica",
        b"POST /webhook HTTP/1.1\r\nHost: kugetsu\r\nContent-Type: application/json\r\n"
        b'Content-Length: 4000\r\nX-Gitea-Event: issues\r\n\r\n{"action": ',
    )
    out = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if partial[i % 3]:
            sock.sendall(partial[i % 3])
        out.append(sock)
    return out


def test_deliveries_are_answered_while_500_connections_hang(tmp_path, gitea):
    port = free_port()
    config = write_config(
        tmp_path / "kugetsu.toml",
        {
            "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}"},
            "gitea": {"url": gitea.url, "token": TOKEN, "webhook_secret": SECRET},
            "storage": {"data_dir": str(tmp_path / "data")},
            "queue": {"poll_interval_seconds": 30},
            "agents": {"default": "fake"},
            "agents.fake": {"command": ["true"]},
        },
    )
    svc = Service(config, port, tmp_path, fd_limit=STARTING_FD_LIMIT).start()
    hostile: list[socket.socket] = []
    try:
        receiver = svc.proc.pid
        [worker] = workers(receiver)
        # the receiver raised its own limit for the connections; the worker (and the agents
        # it starts) keeps the one it was started with
        assert soft_fd_limit(receiver) > STARTING_FD_LIMIT + HOSTILE_CONNECTIONS // 2
        wait_for(
            lambda: soft_fd_limit(worker) == STARTING_FD_LIMIT,
            timeout=30,
            what="the worker to restore its limit",
        )

        before = socket_count(receiver)
        hostile = hostile_connections(port, HOSTILE_CONNECTIONS)
        session = requests.Session()
        for number in (1, 2, 3):
            body, headers = payloads.comment_delivery("Looks fine to me.", number)
            r = session.post(
                svc.url + "/webhook",
                data=body,
                headers=headers,
                timeout=GITEA_DELIVERY_TIMEOUT_SECONDS,
            )
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "ignored"
        # the hostile connections were accepted and are still held, not merely queued
        # in the kernel behind a full server
        wait_for(
            lambda: socket_count(receiver) >= before + HOSTILE_CONNECTIONS,
            timeout=10,
            what="the receiver to hold the hostile connections",
        )
        assert all(s.fileno() != -1 for s in hostile)
    finally:
        for sock in hostile:
            sock.close()
        svc.stop()
