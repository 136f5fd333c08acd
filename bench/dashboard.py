"""The dashboard: page times at 100,000 tasks, webhook acknowledgement while 50 people
follow live logs, and the receiver's memory while a 50 MB log is sent.

    python -m bench.dashboard [pages] [viewers] [biglog]     (all three by default)

- pages: the Flask app in this process with 100,000 tasks in its database (8
  repositories), the fake Gitea in this process too; each page asked 200 times by a
  site admin and by a user who may read 4 of the 8 repositories (what Gitea said is
  cached, as in use), timed around the app's own handling (no network): p50, p95, max.
- viewers: `kugetsu serve` with three agents that print 100 lines a second, then
  deliveries at 200/s for 10 s (bench/webhook_latency.py's lean client and mix), first
  with nobody watching, then with 50 signed-in viewers following the three live logs
  (the viewers in a process of their own, beside the timing client's).
- biglog: `kugetsu serve` with a finished task whose log is 50 MB; the whole log is
  read over the live stream from byte 0, as a download, and through the signed link,
  once by a fast reader and once by a slow one, while the receiver's resident memory is
  sampled every 20 ms.

Writes bench/results/dashboard.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REPO,
    TOKEN,
    Service,
    fake_agent_table,
    free_port,
    memory_kib,
    pct,
    service_tables,
    summary,
    table,
    write_config,
    write_result,
)
from bench.gitea_process import GiteaProcess
from bench.large_table import create_database, fill
from tests import payloads
from tests.dashboard import dashboard_table, sign_in_http

REPOS = [f"acme/r{i}" for i in range(8)]
TASKS = 100_000


# ------------------------------------------------------------------------------ pages


def bench_pages(tmp: Path, repeat: int) -> dict:
    import dataclasses

    from bot.app import create_app
    from bot.ingest import RulesSource
    from bot.store import open_store
    from tests.conftest import make_config
    from tests.dashboard import CLIENT_ID, CLIENT_SECRET, sign_in, with_dashboard
    from tests.fakegitea import FakeGitea

    db_dir = tmp / "data"
    db_dir.mkdir()
    db = db_dir / "kugetsu.db"
    create_database(db, tmp)
    now = time.time()
    fill(db, TASKS, now)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"UPDATE tasks SET repo = 'acme/r' || (id % {len(REPOS)})")
    # the newest 100 wait in the queue, 3 run
    conn.execute(
        "UPDATE tasks SET state = 'pending', outcome = NULL, finished_at = NULL "
        f"WHERE id > {TASKS - 100}"
    )
    conn.execute(
        f"UPDATE tasks SET state = 'running', outcome = NULL, finished_at = NULL "
        f"WHERE id IN ({TASKS - 100}, {TASKS - 101}, {TASKS - 102})"
    )
    conn.close()
    public = "http://kugetsu.bench"
    with FakeGitea(tmp / "gitea", token=TOKEN) as gitea:
        for i, repo in enumerate(REPOS):
            gitea.create_repo(repo)
            if i % 2:
                gitea.set_private(repo)
            gitea.set_permission(repo, "alice", "write")
        gitea.set_admin("root")
        gitea.register_oauth_app(CLIENT_ID, CLIENT_SECRET, public + "/oauth/callback")
        config = with_dashboard(make_config(db_dir, gitea.url, public_url=public), gitea.url)
        config = dataclasses.replace(
            config, storage=dataclasses.replace(config.storage, data_dir=db_dir)
        )
        store = open_store(db)
        app = create_app(config, store, rules=RulesSource(config, store, frozenset({"fake"})))
        # alice may read r0, r2, r4, r6 (public) and the private ones she writes to: make
        # her read only the public four
        for i, repo in enumerate(REPOS):
            if i % 2:
                gitea.set_permission(repo, "alice", "none")
        rng = random.Random(1)
        pages = {
            "/": "/",
            "/ (page 2 of finished)": None,
            "/?repo=acme/r2": "/?repo=acme/r2",
            "/?state=failed": "/?state=failed",
            "/?agent=opencode": "/?agent=opencode",
            "/?requester=alice": "/?requester=alice",
            "/?q=#31000": "/?q=%2331000",
            "/tasks/<id>": None,
        }
        results: dict = {}
        samples: dict = {}
        for login in ("root", "alice"):
            client = app.test_client()
            sign_in(client, login)
            first = time.perf_counter()
            client.get("/")
            cold = (time.perf_counter() - first) * 1000
            results[login] = {"first_overview_ms (Gitea asked)": round(cold, 1)}
            for name, path in pages.items():
                times = []
                for _ in range(repeat):
                    if name == "/tasks/<id>":
                        url = f"/tasks/{rng.randint(1, TASKS)}"
                    elif path is None:
                        url = f"/?before={now - 3 * 86400}:{rng.randint(1, TASKS)}"
                    else:
                        url = path
                    started = time.perf_counter()
                    answer = client.get(url)
                    times.append(time.perf_counter() - started)
                    samples.setdefault((login, name), []).append(times[-1])
                    assert answer.status_code in (200, 404), (url, answer.status_code)
                results[login][name] = {
                    **summary(times, 1000.0, 2),
                    "p95": round(pct(times, 95) * 1000.0, 2),
                }
        store.close()
    return results


# ---------------------------------------------------------------------------- viewers


class Viewer(threading.Thread):
    """One person following a live log: a connection that reads whatever arrives."""

    def __init__(self, port: int, path: str, cookie: str, stop: Any):
        super().__init__(daemon=True)
        self.port, self.path, self.cookie, self.stop = port, path, cookie, stop
        self.bytes = 0
        self.error = ""

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(
                    f"GET {self.path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                    f"Cookie: kugetsu_session={self.cookie}\r\n\r\n".encode()
                )
                sock.settimeout(0.5)
                while not self.stop.is_set():
                    try:
                        data = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    self.bytes += len(data)
        except OSError as exc:
            self.error = repr(exc)


def crowd(
    port: int, paths: list[str], cookie: str, stop: Any, received: Any, connected: Any
) -> None:
    """The viewers, in a process of their own (so that their threads do not slow the
    timing client's): `received` is the bytes they have read so far, `connected` how
    many read something without an error, once `stop` is set."""
    people = [Viewer(port, path, cookie, stop) for path in paths]
    for v in people:
        v.start()
    while not stop.wait(0.2):
        received.value = sum(v.bytes for v in people)
    for v in people:
        v.join(5)
    received.value = sum(v.bytes for v in people)
    connected.value = sum(1 for v in people if v.bytes and not v.error)


def bench_viewers(tmp: Path, viewers: int, rate: float, seconds: float, rounds: int) -> dict:
    from bench.webhook_latency import blast, build_deliveries, plain_deliveries

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # the deliveries go to issues 1 to 500 (a /kugetsu stop among them must not end a
    # followed task); the followed agents work on 501 to 503
    with GiteaProcess(tmp / "gitea", issues=503, oauth_redirect=url + "/oauth/callback") as gitea:
        agent = fake_agent_table(FAKE_MODE="nochange", FAKE_SECONDS=600, FAKE_PRINT_EVERY=0.01)
        tables = service_tables(
            port=port, gitea_url=gitea.url, data_dir=tmp / "data", agents={"fake": agent}
        )
        tables["dashboard"] = dashboard_table(gitea.url)
        svc = Service(write_config(tmp / "kugetsu.toml", tables), port, tmp).start()
        try:
            for number in (501, 502, 503):
                body, headers = payloads.comment_delivery("/kugetsu start", number)
                assert svc.post(body, headers).status_code == 202
            db = tmp / "data" / "kugetsu.db"

            def running() -> int:
                c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                try:
                    return c.execute(
                        "SELECT COUNT(*) FROM tasks WHERE state='running' AND pid IS NOT NULL"
                    ).fetchone()[0]
                finally:
                    c.close()

            deadline = time.monotonic() + 60
            while running() < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            cookie = sign_in_http(url, "alice").cookies["kugetsu_session"]
            rng = random.Random(7)
            n = round(rate * seconds)
            out: dict = {}
            spawn = multiprocessing.get_context("spawn")
            # the two in turn, `rounds` times: a machine whose load drifts meets both alike
            runs = [("nobody watching", 0), (f"{viewers} viewers", viewers)] * rounds
            for turn, (name, watchers) in enumerate(runs):
                label = f"{name}, round {turn // 2 + 1}" if rounds > 1 else name
                stop, received, connected = spawn.Event(), spawn.Value("q", 0), spawn.Value("i", 0)
                paths = [f"/tasks/{1 + i % 3}/log/stream?from=0" for i in range(watchers)]
                people = spawn.Process(
                    target=crowd, args=(port, paths, cookie, stop, received, connected)
                )
                people.start()
                time.sleep(3.0 if watchers else 1.0)
                blast([url + "/webhook"], plain_deliveries(200, 500, rng), rate, 8)
                work = build_deliveries(n, 500, rng, "realistic")
                before = received.value
                started = time.monotonic()
                (result,) = blast([url + "/webhook"], work, rate, 8)
                took = time.monotonic() - started
                streamed = received.value - before
                stop.set()
                people.join(15)
                out[label] = {
                    "latency_ms": result["latency_ms"],
                    "status_counts": result["status_counts"],
                    "viewers_connected": connected.value,
                    "log_bytes_streamed_per_s": round(streamed / took),
                }
                time.sleep(3.0)  # the streams end (their next write fails) before the next run
        finally:
            svc.stop()
    return out


# ----------------------------------------------------------------------------- big log


def bench_biglog(tmp: Path, megabytes: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp / "data"
    data.mkdir()
    db = data / "kugetsu.db"
    create_database(db, tmp)
    now = time.time()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(
        "INSERT INTO tasks (id, repo, issue, kind, prompt, agent, requested_by, state, attempts, "
        "created_at, updated_at, started_at, finished_at, outcome, authorized) VALUES "
        "(1, ?, 1, 'start', '', 'fake', 'alice', 'completed', 1, ?, ?, ?, ?, 'succeeded', 1)",
        (REPO, now - 60, now, now - 50, now),
    )
    conn.close()
    (data / "logs").mkdir()
    line = b"".join(
        b"%08d the agent printed this line, and many like it\n" % i for i in range(1000)
    )
    with (data / "logs" / "1.log").open("wb") as fh:
        for _ in range(megabytes * 1024 * 1024 // len(line)):
            fh.write(line)
    size = (data / "logs" / "1.log").stat().st_size
    rows: dict = {}
    bases = []
    with GiteaProcess(tmp / "gitea", issues=1, oauth_redirect=url + "/oauth/callback") as gitea:
        tables = service_tables(
            port=port, gitea_url=gitea.url, data_dir=data, agents={"fake": fake_agent_table()}
        )
        tables["dashboard"] = dashboard_table(gitea.url)
        config = write_config(tmp / "kugetsu.toml", tables)
        from bot.config import load
        from bot.core.render import log_token

        token = log_token(load(config, {}), 1)
        for name, path, slow in (
            ("live stream from byte 0", "/tasks/1/log/stream?from=0", False),
            ("live stream, slow reader", "/tasks/1/log/stream?from=0", True),
            ("download", "/tasks/1/log.txt", False),
            ("signed log link", f"/logs/1/{token}?plain", False),
        ):
            # each read in a receiver of its own: memory it took and kept does not count
            # against the next
            svc = Service(config, port, tmp).start()
            try:
                http = sign_in_http(url, "alice")
                pid = svc.proc.pid
                time.sleep(1.0)
                base = memory_kib(pid)["VmRSS"]
                bases.append(base)
                peak, stop = [base], threading.Event()

                def sample(peak=peak, stop=stop, pid=pid) -> None:
                    while not stop.is_set():
                        peak[0] = max(peak[0], memory_kib(pid)["VmRSS"])
                        time.sleep(0.02)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                started, got = time.monotonic(), 0
                with http.get(url + path, stream=True, timeout=30) as answer:
                    for chunk in answer.iter_content(chunk_size=65536):
                        got += len(chunk)
                        if slow:
                            time.sleep(0.005)
                        if b"event: end" in chunk[-200:]:
                            break
                took = time.monotonic() - started
                stop.set()
                sampler.join()
                rows[name] = {
                    "bytes_received": got,
                    "seconds": round(took, 2),
                    "rss_growth_mib": round((peak[0] - base) / 1024, 1),
                }
            finally:
                svc.stop()
    return {"log_bytes": size, "rss_before_mib": round(min(bases) / 1024, 1), "reads": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["pages", "viewers", "biglog"])
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--viewers", type=int, default=50)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="viewers: runs of each, in turn")
    parser.add_argument("--megabytes", type=int, default=50)
    args = parser.parse_args()
    results: dict = {}
    for part in args.parts:
        with tempfile.TemporaryDirectory(prefix="kugetsu-bench-", ignore_cleanup_errors=True) as d:
            if part == "pages":
                results["pages"] = r = bench_pages(Path(d), args.repeat)
                rows = [
                    [login, name, s["p50"], s["p95"], s["max"]]
                    for login, pages in r.items()
                    for name, s in pages.items()
                    if isinstance(s, dict)
                ]
                print(table(["user", "page", "p50 ms", "p95 ms", "max ms"], rows))
                for login, pages in r.items():
                    print(f"{login}: first overview {pages['first_overview_ms (Gitea asked)']} ms")
            elif part == "viewers":
                results["viewers"] = r = bench_viewers(
                    Path(d), args.viewers, args.rate, args.seconds, args.rounds
                )
                rows = [
                    [
                        k,
                        v["latency_ms"]["p50"],
                        v["latency_ms"]["p99"],
                        v["latency_ms"]["max"],
                        v["viewers_connected"],
                        v["log_bytes_streamed_per_s"],
                        v["status_counts"],
                    ]
                    for k, v in r.items()
                ]
                print(
                    table(
                        ["run", "p50 ms", "p99 ms", "max ms", "viewers", "log B/s", "status"], rows
                    )
                )
            elif part == "biglog":
                results["biglog"] = r = bench_biglog(Path(d), args.megabytes)
                rows = [
                    [k, v["bytes_received"], v["seconds"], v["rss_growth_mib"]]
                    for k, v in r["reads"].items()
                ]
                print(
                    f"log {r['log_bytes']:,} bytes; receiver RSS before {r['rss_before_mib']} MiB"
                )
                print(table(["read", "bytes", "s", "RSS growth MiB"], rows))
    path = write_result("dashboard", results)
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
