"""Acknowledgement latency of POST /webhook: kugetsu against a bare HMAC-checking endpoint.

    python -m bench.webhook_latency [--rate 200] [--seconds 10] [--threads 8]
                                    [--mix realistic|quiet] [--agent-seconds 120]
                                    [--compare both|paired|sequential]

Starts `kugetsu serve` as a process (fake Gitea in a process of its own; a fake agent that
changes nothing and works for `--agent-seconds`, as a real one works for minutes), then sends
signed Gitea-shaped deliveries from several threads at a fixed open-loop rate over persistent
connections (a lean client, so that the load generator takes little of the machine it shares
with the service): label changes on many issues, comments with commands, comments without,
and re-sent (duplicate) deliveries. Latency is
measured per request from just before it is sent to its response. The baseline is a minimal
Flask app served by the same waitress wrapper, which only checks the HMAC and answers 202.

Two ways to compare, both run by default:

- paired: kugetsu and the baseline get the same deliveries side by side in one run, each at
  the full rate, half a slot apart. Both meet the same machine at the same moments: the
  same drift, the same load generator, the same work of kugetsu's worker beside them.
- sequential: kugetsu's run, then the baseline's, each alone. kugetsu at exactly the
  target rate with nothing else sending; the baseline on a machine kugetsu's worker does
  not share.

Prints both and their ratios; writes bench/results/webhook_latency[-quiet][-agents0s].json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    SECRET,
    Service,
    fake_agent_table,
    free_port,
    read_task_rows,
    service_tables,
    summary,
    table,
    write_config,
    write_result,
)
from bench.gitea_process import GiteaProcess
from tests import payloads

Delivery = tuple[str, bytes, dict[str, str]]  # (kind, body, headers)

COMMANDS = (
    "/kugetsu start please fix this",
    "/kugetsu status",
    "/kugetsu help",
    "/kugetsu continue also add a test for it",
    "/kugetsu stop",
    "/kugetsu start --agent fake make it faster",
)
PLAIN = (
    "Thanks, this looks good to me.",
    "Can someone look at this? The widget still breaks on Mondays.\n\nSteps:\n1. open it\n"
    "2. wait\n3. watch it fail",
    "> /kugetsu stop\n\nNo, let it run, the last attempt was close.",
    "I tried this locally:\n\n```\n/kugetsu start\n```\n\nand it did not reproduce.",
    "LGTM once CI passes.",
)
MIXES = {
    # label changes (mostly adding the trigger label), comments with and without commands,
    # deliveries sent twice
    "realistic": (("label", 0.35), ("command", 0.20), ("comment", 0.35), ("duplicate", 0.10)),
    # the same shapes, but nothing that queues work: other labels, no commands. The tick is
    # never woken, so this times the request path alone.
    "quiet": (("other-label", 0.35), ("comment", 0.55), ("duplicate", 0.10)),
}


def build_deliveries(
    n: int, issues: int, rng: random.Random, mix: str = "realistic"
) -> list[Delivery]:
    kinds = [k for k, _ in MIXES[mix]]
    weights = [w for _, w in MIXES[mix]]
    out: list[Delivery] = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "duplicate" and i < 50:
            kind = "comment"
        number = rng.randint(1, issues)
        if kind == "label":
            labels = rng.choices([["kugetsu"], ["kugetsu", "bug"], ["bug"]], [8, 1, 1])[0]
            body, headers = payloads.label_delivery(labels, number)
        elif kind == "other-label":
            labels = rng.choice([["bug"], ["bug", "help wanted"], []])
            body, headers = payloads.label_delivery(labels, number)
        elif kind == "command":
            body, headers = payloads.comment_delivery(rng.choice(COMMANDS), number)
        elif kind == "comment":
            body, headers = payloads.comment_delivery(rng.choice(PLAIN), number)
        else:
            # an earlier delivery sent again, same delivery id and all
            _, body, headers = out[i - rng.randint(30, min(i, 300))]
        out.append((kind, body, headers))
    return out


def plain_deliveries(n: int, issues: int, rng: random.Random) -> list[Delivery]:
    return [
        ("comment", *payloads.comment_delivery(rng.choice(PLAIN), rng.randint(1, issues)))
        for _ in range(n)
    ]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Connection:
    """One persistent HTTP/1.1 connection that sends prepared POSTs and reads the answers.

    The load generator shares the machine with what it measures, so it does as little as
    it can per request: the request bytes are built before the run, and the answer is read
    with one recv in the common case (status line, Content-Length, body). `requests` spent
    about 1.4 ms of CPU per delivery here, this about 0.1 ms.
    """

    def __init__(self, url: str, timeout: float = 10.0):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port or 80, parts.path or "/"
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def prepare(self, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "content-length"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        return sock

    def send(self, request: bytes) -> tuple[int, bytes, bytes | None]:
        """Sends one prepared request; returns (status, body, Server-Timing header).
        Reconnects once if the server closed an idle connection."""
        for attempt in (0, 1):
            sock = self.sock or self._connect()
            try:
                sock.sendall(request)
                return self._read(sock)
            except (ConnectionError, _Closed):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _read(self, sock: socket.socket) -> tuple[int, bytes, bytes | None]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise _Closed()
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        close = False
        timing = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"server-timing":
                timing = value.strip()
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise _Closed()
            rest += chunk
        if close:
            self.close()
        return status, rest[:length], timing

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Closed(Exception):
    """The server closed the connection before a whole answer arrived."""


def blast(
    urls: Sequence[str], deliveries: list[Delivery], rate: float, threads: int, seed: int = 0
) -> list[dict]:
    """Send every delivery to each of `urls` at its slot of one fixed schedule.

    Each endpoint gets `rate` deliveries per second from `threads` threads, one connection
    per thread. With two endpoints, each slot's two requests leave half a period apart, in
    an order drawn at random per slot: neither endpoint always follows the other (and so,
    say, always meets the work the other's last delivery woke). Returns one result per url.
    """
    n, k = len(deliveries), len(urls)
    records: list[list[tuple | None]] = [[None] * n for _ in urls]
    conns = [[Connection(url) for _ in range(threads)] for url in urls]
    prepared = [conns[0][0].prepare(body, headers) for _, body, headers in deliveries]
    order = random.Random(seed)
    offsets = [order.sample(range(k), k) for _ in range(n)]  # slot -> position of each url
    ready = threading.Barrier(threads * k + 1)
    start: list[float] = []

    def worker(u: int, t: int) -> None:
        conn, out = conns[u][t], records[u]
        ready.wait()
        t0 = start[0]
        for i in range(t, n, threads):
            due = t0 + (i + offsets[i][u] / k) / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            try:
                status, body, timing = conn.send(prepared[i])
            except (OSError, _Closed) as exc:
                out[i] = (
                    due,
                    sent,
                    time.perf_counter(),
                    f"error:{exc.__class__.__name__}",
                    None,
                    None,
                )
                continue
            out[i] = (due, sent, time.perf_counter(), status, body, timing)

    pool = [
        threading.Thread(target=worker, args=(u, t), daemon=True)
        for u in range(k)
        for t in range(threads)
    ]
    for thread in pool:
        thread.start()
    start.append(time.perf_counter() + 0.05)
    ready.wait()
    for thread in pool:
        thread.join()
    for row in conns:
        for c in row:
            c.close()
    return [_result(deliveries, recs, rate, start[0]) for recs in records]


def _result(
    deliveries: list[Delivery], records: list[tuple | None], rate: float, t0: float
) -> dict:
    done = [r for r in records if r is not None]
    latencies = [r[2] - r[1] for r in done]
    lags = [max(0.0, r[1] - r[0]) for r in done]
    end = max(r[2] for r in done)
    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    for (kind, _, _), r in zip(deliveries, records, strict=False):
        if r is not None:
            by_kind[kind].append(r[2] - r[1])
    return {
        "sent": len(done),
        "target_rate_per_s": rate,
        "achieved_rate_per_s": round(len(done) / (end - t0), 1),
        "duration_s": round(end - t0, 3),
        "latency_ms": summary(latencies, 1000.0),
        "latency_ms_by_kind": {k: summary(v, 1000.0) for k, v in sorted(by_kind.items())},
        "send_lag_ms": summary(lags, 1000.0),
        "status_counts": dict(collections.Counter(str(r[3]) for r in done)),
        "answer_counts": dict(collections.Counter(answer_state(r[4]) for r in done)),
        "handler_ms": summary([v for v in (handler_ms(r[5]) for r in done) if v is not None], 1.0),
    }


def handler_ms(timing: bytes | None) -> float | None:
    """kugetsu's own time for a delivery, from its `Server-Timing: handler;dur=MS`."""
    match = re.search(rb"handler;dur=([0-9.]+)", timing or b"")
    return float(match.group(1)) if match else None


def answer_state(body: bytes | None) -> str:
    """The "status" field of kugetsu's JSON answer (read after the run, not timed)."""
    try:
        return str(json.loads(body or b"").get("status"))
    except (ValueError, AttributeError):
        return "None"


def start_profile(out: Path | None, pid: int) -> subprocess.Popen | None:
    """py-spy sampling the service (without pausing it) while the run lasts."""
    if out is None:
        return None
    fmt = {".json": "speedscope", ".txt": "raw"}.get(out.suffix, "flamegraph")
    spy = subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--rate",
            "100",
            "--nonblocking",
            "--format",
            fmt,
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    return spy


def stop_profile(spy: subprocess.Popen | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


class BareServer:
    """The baseline, `bench/bare_webhook.py`, in a process and a session of its own.

    Its own session, like `kugetsu serve`'s: with autogroup scheduling (most Linux desktops
    and VMs), the CPU is shared fairly between sessions first, and the baseline must not share
    one with the load generator when both endpoints are measured side by side.
    """

    def __enter__(self) -> BareServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_webhook", "--secret", SECRET, "--threads", "8"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        port = json.loads(self.proc.stdout.readline())["port"]
        self.url = f"http://127.0.0.1:{port}/webhook"
        return self

    def __exit__(self, *_exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(
    servers: list[tuple[str, int]], args, work: list[Delivery], warm: list[Delivery]
) -> list[dict]:
    """Warm up, then send `work` to each (url, pid), with each server's CPU per delivery."""
    urls = [url for url, _ in servers]
    blast(urls, warm, args.rate, args.threads, seed=args.seed)
    time.sleep(0.5)
    cpu0, wall0 = [cpu_seconds(pid) for _, pid in servers], time.monotonic()
    results = blast(urls, work, args.rate, args.threads, seed=args.seed)
    cpu1, wall1 = [cpu_seconds(pid) for _, pid in servers], time.monotonic()
    for result, before, after in zip(results, cpu0, cpu1, strict=False):
        result["server_cpu_ms_per_delivery"] = round((after - before) * 1000 / len(work), 3)
        result["server_cpu_share_of_one_core"] = round((after - before) / (wall1 - wall0), 3)
    return results


def run_kugetsu(
    args, tmp: Path, work: list[Delivery], warm: list[Delivery], bare: BareServer | None = None
) -> list[dict]:
    """kugetsu alone, or kugetsu and `bare` side by side in the same run."""
    with GiteaProcess(tmp / "gitea", issues=args.issues) as gitea:
        port = free_port()
        agent = fake_agent_table(FAKE_MODE="nochange", FAKE_SECONDS=args.agent_seconds)
        config = write_config(
            tmp / "kugetsu.toml",
            service_tables(
                port=port,
                gitea_url=gitea.url,
                data_dir=tmp / "data",
                agents={"fake": agent},
                queue={"max_concurrent_agents": args.max_agents},
            ),
        )
        svc = Service(config, port, tmp).start()
        try:
            servers = [(svc.url + "/webhook", svc.proc.pid)]
            if bare is not None:
                servers.append((bare.url, bare.proc.pid))
            spy = start_profile(args.profile, svc.proc.pid)
            try:
                results = measure(servers, args, work, warm)
            finally:
                stop_profile(spy)
            rows = read_task_rows(tmp / "data" / "kugetsu.db")
            results[0]["tasks_queued"] = len(rows)
            results[0]["tasks_started_during_run"] = sum(
                1 for r in rows.values() if r["started_at"]
            )
        finally:
            svc.stop()
    return results


def ratio(kugetsu: dict, bare: dict) -> dict:
    return {
        k: round(kugetsu["latency_ms"][k] / bare["latency_ms"][k], 2)
        for k in ("p50", "p90", "p99", "max")
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="deliveries per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the measured run")
    parser.add_argument("--threads", type=int, default=8, help="sending threads per endpoint")
    parser.add_argument(
        "--issues", type=int, default=500, help="distinct issues the deliveries are about"
    )
    parser.add_argument(
        "--warmup", type=int, default=200, help="deliveries sent first and not measured"
    )
    parser.add_argument(
        "--max-agents", type=int, default=3, help="queue.max_concurrent_agents of the service"
    )
    parser.add_argument(
        "--agent-seconds",
        type=float,
        default=120.0,
        help="how long the fake agent of each queued task works (default 120: "
        "the first tasks keep every slot busy and the rest wait, as with "
        "real agents; 0: each exits at once without changes, and the worker "
        "takes a task from claim to its final comment about every 0.15 s, "
        "a stress test that saturates a small machine)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="OUT",
        help="record the service with py-spy during the measured run "
        "(.svg flame graph, .json speedscope, .txt collapsed stacks); "
        "needs py-spy on PATH",
    )
    parser.add_argument(
        "--mix",
        choices=sorted(MIXES),
        default="realistic",
        help="realistic: some deliveries queue work and wake the tick; quiet: "
        "none do, which isolates the request path",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--compare",
        choices=("both", "paired", "sequential"),
        default="both",
        help="paired: kugetsu and the bare endpoint get the same deliveries "
        "side by side in one run, on the same machine at the same time; "
        "sequential: kugetsu's run, then bare's; both (default): both",
    )
    parser.add_argument("--skip-bare", action="store_true", help="measure kugetsu only")
    args = parser.parse_args()
    if not (1 <= args.rate * args.seconds <= 20000):
        parser.error("rate x seconds must be between 1 and 20000 deliveries")

    rng = random.Random(args.seed)
    n = round(args.rate * args.seconds)
    work = build_deliveries(n, args.issues, rng, args.mix)
    warm = plain_deliveries(args.warmup, args.issues, rng)
    mix = dict(collections.Counter(k for k, _, _ in work))
    print(
        f"{n} deliveries at {args.rate:g}/s from {args.threads} threads per endpoint; mix {mix}",
        flush=True,
    )

    compare = "alone" if args.skip_bare else args.compare
    runs: dict[str, dict] = {}
    if compare in ("paired", "both"):
        with (
            BareServer() as bare,
            tempfile.TemporaryDirectory(prefix="kugetsu-bench-", ignore_cleanup_errors=True) as d,
        ):
            k, b = run_kugetsu(args, Path(d), work, warm, bare)
        runs["paired"] = {"kugetsu": k, "bare": b, "ratio": ratio(k, b)}
    if compare in ("sequential", "both", "alone"):
        with tempfile.TemporaryDirectory(prefix="kugetsu-bench-", ignore_cleanup_errors=True) as d:
            (k,) = run_kugetsu(args, Path(d), work, warm)
        runs["sequential"] = {"kugetsu": k}
        if compare != "alone":
            with BareServer() as bare:
                (b,) = measure([(bare.url, bare.proc.pid)], args, work, warm)
            runs["sequential"].update(bare=b, ratio=ratio(k, b))

    def row(name: str, r: dict) -> list:
        lat = r["latency_ms"]
        return [
            name,
            lat["p50"],
            lat["p90"],
            lat["p99"],
            lat["max"],
            r["achieved_rate_per_s"],
            r["send_lag_ms"]["max"],
            r["server_cpu_ms_per_delivery"],
            " ".join(f"{k}:{v}" for k, v in sorted(r["status_counts"].items())),
        ]

    rows = []
    for name, run in runs.items():
        rows.append(row(f"kugetsu, {name}", run["kugetsu"]))
        if "bare" in run:
            rows.append(row(f"bare, {name}", run["bare"]))
            q = run["ratio"]
            rows.append([f"ratio, {name}", q["p50"], q["p90"], q["p99"], q["max"], "", "", "", ""])
    print()
    print(
        table(
            [
                "endpoint, run",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "rate/s",
                "max lag ms",
                "cpu ms/req",
                "status",
            ],
            rows,
        )
    )
    for name, run in runs.items():
        h, kug = run["kugetsu"]["handler_ms"], run["kugetsu"]
        print(
            f"\n{name}: kugetsu handler time (its Server-Timing header): p50 {h.get('p50')} "
            f"ms, p99 {h.get('p99')} ms, max {h.get('max')} ms; tasks queued "
            f"{kug['tasks_queued']}, started during the run {kug['tasks_started_during_run']}"
        )

    # p99 < 10 ms is about kugetsu at 200 deliveries/s, so it is read from the run where
    # kugetsu alone gets them; within 2x compares the two endpoints, so it is read from the
    # run where both get the same deliveries on the same machine at the same time.
    absolute = runs.get("sequential", runs.get("paired"))
    relative = runs.get("paired", runs.get("sequential"))
    p99 = absolute["kugetsu"]["latency_ms"]["p99"]
    targets = {
        "p99_under_10ms": p99 < 10.0,
        "p99_within_2x_of_bare": None
        if "ratio" not in relative
        else relative["ratio"]["p99"] <= 2.0,
    }
    line = f"\ntargets: p99 < 10 ms: {'met' if targets['p99_under_10ms'] else 'MISSED'} ({p99} ms)"
    if targets["p99_within_2x_of_bare"] is not None:
        line += (
            f"; p99 within 2x of bare: "
            f"{'met' if targets['p99_within_2x_of_bare'] else 'MISSED'} "
            f"({relative['ratio']['p99']}x, "
            f"{'side by side' if relative is runs.get('paired') else 'one after the other'})"
        )
    if args.agent_seconds < 10 and args.mix == "realistic":
        line += (
            "\n(stress test: agents that exit at once saturate a small machine; the targets "
            'are read from the default run, see bench/README.md, "Targets")'
        )
    print(line)
    if "paired" in runs and "ratio" in runs.get("sequential", {}):
        print(
            f"one after the other, bare on a machine kugetsu's worker does not share: "
            f"{runs['sequential']['ratio']['p99']}x"
        )
    name = (
        "webhook_latency"
        + ("" if args.mix == "realistic" else f"-{args.mix}")
        + ("" if args.agent_seconds == 120 else f"-agents{args.agent_seconds:g}s")
        + ("-profiled" if args.profile else "")
    )
    path = write_result(
        name,
        {
            "options": {k: (v.name if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "mix": mix,
            "runs": runs,
            "targets": targets,
        },
    )
    print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
