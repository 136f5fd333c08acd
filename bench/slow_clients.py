"""Deliveries while a client holds hundreds of idle and half-sent connections.

    python -m bench.slow_clients [--connections 500] [--rate 10] [--seconds 30]

Starts two `kugetsu serve` processes side by side (a fake Gitea in a process of its own
behind both). A hostile client, which never authenticates, holds `--connections`
connections to the first: a quarter send nothing, a quarter stop inside the headers, a
quarter send whole headers and stop inside the body, and a quarter trickle one more
header byte every `--trickle-seconds`, so that they never look idle. Whenever the server
closes one, the client opens another of the same kind. The same signed deliveries go to
both services at `--rate` per second, each on a new connection, as a delivery from Gitea
arrives; the second service, which nobody attacks, is the baseline. A delivery is lost if
Gitea gets no answer within 5 s; the client here waits up to `--timeout` to see how late
the answer comes.

Prints, for each service, the latency of the deliveries and how many took over 1 s and
over 5 s; writes bench/results/slow_clients.json.
"""

from __future__ import annotations

import argparse
import collections
import random
import selectors
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from bench.common import (
    ROOT,
    Service,
    fake_agent_table,
    free_port,
    service_tables,
    summary,
    table,
    write_config,
    write_result,
)
from bench.gitea_process import GiteaProcess
from bench.webhook_latency import Connection, cpu_seconds, plain_deliveries
from bot.httpserver import raise_fd_limit

GITEA_TIMEOUT_SECONDS = 5.0

#: what each kind of hostile connection sends once connected
OPENINGS = {
    "idle": b"",
    "half headers": b"POST /webhook HTTP/1.1\r\nHost: kugetsu\r\nContent-Type: applica",
    "half body": (
        b"POST /webhook HTTP/1.1\r\nHost: kugetsu\r\nContent-Type: application/json\r\n"
        b'Content-Length: 4000\r\nX-Gitea-Event: issues\r\n\r\n{"action": '
    ),
    "trickle": b"POST /webhook HTTP/1.1\r\nHost: kugetsu\r\nX-Slow: ",
}


class Attacker:
    """Holds `n` connections of the kinds in OPENINGS, reopening each one the server closes."""

    def __init__(self, port: int, n: int, trickle_seconds: float):
        self.port, self.n, self.trickle_seconds = port, n, trickle_seconds
        self.selector = selectors.DefaultSelector()
        self.kinds = [list(OPENINGS)[i % len(OPENINGS)] for i in range(n)]
        self.reopened = 0
        self.failed_connects = 0
        self.held: list[int] = []  # connections open, sampled once a second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attacker", daemon=True)

    def _open(self, kind: str) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            if OPENINGS[kind]:
                sock.sendall(OPENINGS[kind])
            sock.setblocking(False)
        except OSError:
            self.failed_connects += 1
            return
        self.selector.register(sock, selectors.EVENT_READ, kind)

    def start(self) -> Attacker:
        for kind in self.kinds:
            self._open(kind)
        self._thread.start()
        return self

    def _run(self) -> None:
        next_trickle = next_sample = time.monotonic()
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # closed by the server (or answered 4xx and closed)
                    self.selector.unregister(sock)
                    sock.close()
                    self.reopened += 1
                    self._open(key.data)
            now = time.monotonic()
            if now >= next_trickle:
                next_trickle = now + self.trickle_seconds
                for key in list(self.selector.get_map().values()):
                    if key.data == "trickle":
                        with contextlib.suppress(OSError):
                            key.fileobj.send(b"x")
            if now >= next_sample:
                next_sample = now + 1.0
                self.held.append(len(self.selector.get_map()))
            # keep the count: connections that could not be opened are tried again
            missing = self.n - len(self.selector.get_map())
            for kind in self.kinds[:missing]:
                self._open(kind)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def send(urls: list[str], work: list, rate: float, timeout: float) -> list[list[tuple]]:
    """Each delivery at its slot, to every url at once, each on a new connection and from
    a thread of its own, so that a late answer delays no other delivery. Returns per url
    (sent, answered, status or "error:...") per delivery."""
    records: list[list[tuple | None]] = [[None] * len(work) for _ in urls]

    def deliver(u: int, i: int) -> None:
        conn = Connection(urls[u], timeout)
        request = conn.prepare(work[i][1], work[i][2])
        sent = time.perf_counter()
        try:
            status = conn.send(request)[0]
        except OSError as exc:
            status = f"error:{exc.__class__.__name__}"
        finally:
            conn.close()
        records[u][i] = (sent, time.perf_counter(), status)

    threads = []
    start = time.perf_counter() + 0.05
    for i in range(len(work)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        for u in range(len(urls)):
            thread = threading.Thread(target=deliver, args=(u, i), daemon=True)
            thread.start()
            threads.append(thread)
    for thread in threads:
        thread.join()
    return records


def result(records: list[tuple], cpu: float) -> dict:
    """Latency of the answered deliveries; a delivery not answered within Gitea's 5 s
    (or not at all) is lost."""
    answered = [r for r in records if isinstance(r[2], int)]
    return {
        "deliveries": len(records),
        "answered": len(answered),
        "errors": dict(collections.Counter(r[2] for r in records if not isinstance(r[2], int))),
        "over_1s": sum(1 for r in records if r[1] - r[0] > 1.0),
        "over_5s_lost_by_gitea": sum(
            1 for r in records if not isinstance(r[2], int) or r[1] - r[0] > GITEA_TIMEOUT_SECONDS
        ),
        "latency_ms": summary([r[1] - r[0] for r in answered], 1000.0),
        "receiver_cpu_s": round(cpu, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--connections", type=int, default=500, help="connections the hostile client holds"
    )
    parser.add_argument("--rate", type=float, default=10.0, help="deliveries per second")
    parser.add_argument(
        "--seconds",
        type=float,
        default=30.0,
        help="length of the measured run (longer than the 10 s idle timeout, "
        "so that closed connections are reopened during it)",
    )
    parser.add_argument(
        "--trickle-seconds",
        type=float,
        default=2.0,
        help="how often each trickling connection sends one more byte",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="how long the sender waits for an answer (Gitea waits 5 s)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not (1 <= args.rate * args.seconds <= 5000):
        parser.error("rate x seconds must be between 1 and 5000 deliveries")
    raise_fd_limit(args.connections + 512)  # this process holds the hostile connections

    rng = random.Random(args.seed)
    work = plain_deliveries(round(args.rate * args.seconds), 50, rng)
    # each delivery on a new connection, as Gitea's may come: a new connection is what
    # waits while the server accepts no more
    work = [(kind, body, {**headers, "Connection": "close"}) for kind, body, headers in work]
    print(
        f"{len(work)} deliveries at {args.rate:g}/s to each of two services, one of them "
        f"under {args.connections} hostile connections",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="kugetsu-bench-", ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        with GiteaProcess(tmp / "gitea", issues=50) as gitea:
            services = []
            try:
                for name in ("attacked", "quiet"):
                    port = free_port()
                    config = write_config(
                        tmp / f"{name}.toml",
                        service_tables(
                            port=port,
                            gitea_url=gitea.url,
                            data_dir=tmp / name,
                            agents={"fake": fake_agent_table(FAKE_MODE="nochange")},
                        ),
                    )
                    services.append(Service(config, port, tmp).start())
                attacked, quiet = services
                attacker = Attacker(attacked.port, args.connections, args.trickle_seconds).start()
                try:
                    time.sleep(2.0)  # the server accepts them all
                    cpu0 = [cpu_seconds(s.proc.pid) for s in services]
                    records = send(
                        [attacked.url + "/webhook", quiet.url + "/webhook"],
                        work,
                        args.rate,
                        args.timeout,
                    )
                    cpu1 = [cpu_seconds(s.proc.pid) for s in services]
                finally:
                    attacker.stop()
            finally:
                for svc in services:
                    svc.stop()

    runs = {
        name: result(recs, c1 - c0)
        for name, recs, c0, c1 in zip(("attacked", "quiet"), records, cpu0, cpu1, strict=False)
    }
    held = attacker.held
    runs["attacker"] = {
        "connections": args.connections,
        "held_min": min(held) if held else None,
        "held_max": max(held) if held else None,
        "reopened_after_server_closed": attacker.reopened,
        "failed_connects": attacker.failed_connects,
    }
    rows = []
    for name in ("attacked", "quiet"):
        r = runs[name]
        lat = r["latency_ms"]
        rows.append(
            [
                f"kugetsu, {name}",
                lat.get("p50"),
                lat.get("p99"),
                lat.get("max"),
                r["over_1s"],
                r["over_5s_lost_by_gitea"],
                " ".join(f"{k}:{v}" for k, v in r["errors"].items()) or 0,
                r["receiver_cpu_s"],
            ]
        )
    print()
    print(
        table(
            [
                "service",
                "p50 ms",
                "p99 ms",
                "max ms",
                "> 1 s",
                "> 5 s (lost)",
                "errors",
                "receiver cpu s",
            ],
            rows,
        )
    )
    a = runs["attacker"]
    print(
        f"\nhostile connections held: {a['held_min']} to {a['held_max']} of "
        f"{args.connections}; reopened after the server closed them: "
        f"{a['reopened_after_server_closed']}"
    )
    ok = runs["attacked"]["over_1s"] == 0 and not runs["attacked"]["errors"]
    print(f"target: no delivery to the attacked service over 1 s: {'met' if ok else 'MISSED'}")
    path = write_result("slow_clients", {"options": vars(args), "runs": runs, "target_met": ok})
    print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
