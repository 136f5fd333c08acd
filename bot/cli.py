"""The `kugetsu` command: serve, queue, enqueue, logs.

Loads the config once and wires the parts together; nothing here holds logic
that a test would want to reach without a process.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

from bot import __version__
from bot.config import Config, ConfigError, load
from bot.core import names
from bot.core.intake import start_or_continue
from bot.core.tasks import CancelResult, Kind, State
from bot.ingest import StoreView
from bot.service import known_agents, run_worker, serve
from bot.store import SchemaTooNew, Store, open_store

log = logging.getLogger("kugetsu")


# --------------------------------------------------------------------------- queue


def ping_server(config: Config) -> bool:
    """Ask a running `kugetsu serve` to look at the queue now; harmless if none runs."""
    import requests

    from bot.app import wake_key

    host = config.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    try:
        r = requests.post(
            f"http://{host}:{config.server.port}/wake",
            timeout=2,
            headers={"X-Kugetsu-Wake": wake_key(config)},
        )
        return r.status_code == 202
    except requests.RequestException:
        return False


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def queue_list(
    store: Store,
    state: str | None,
    as_json: bool,
    *,
    limit: int | None = 50,
    before: int | None = None,
) -> int:
    """The newest `limit` tasks (every one with None) below id `before`, oldest first,
    printed as they are read from the database: the whole table is never in memory."""
    first = None
    if as_json:
        # the same text as json.dumps(list, indent=2), one task at a time
        print("[", end="")
        for task in store.iter_tasks(state, before=before, newest=limit):
            item = json.dumps(task.public_dict(), indent=2).replace("\n", "\n  ")
            print(("\n  " if first is None else ",\n  ") + item, end="")
            first = task.id if first is None else first
        print("]" if first is None else "\n]")
    else:
        for t in store.iter_tasks(state, before=before, newest=limit):
            if first is None:
                first = t.id
                print(
                    f"{'ID':>5}  {'ISSUE':<28} {'KIND':<9} {'STATE':<10} {'TRIES':<6} "
                    f"{'OUTCOME':<13} {'PR':<6} CREATED"
                )
            print(
                f"{t.id:>5}  {t.ref:<28} {t.kind.value:<9} {t.state.value:<10} "
                f"{t.attempts}/{t.max_attempts:<4} {(t.outcome.value if t.outcome else '-'):<13} "
                f"{('#' + str(t.pr_number)) if t.pr_number else '-':<6} {_fmt_time(t.created_at)}"
            )
        if first is None:
            print("no tasks")
    if (
        limit is not None
        and first is not None
        and next(store.iter_tasks(state, before=first, newest=1), None) is not None
    ):
        print(
            f"kugetsu: the newest {limit} shown; older ones with --before {first}, "
            "or all with --all",
            file=sys.stderr,
        )
    return 0


def queue_stats(store: Store, as_json: bool) -> int:
    stats = store.stats().as_dict()
    if as_json:
        print(json.dumps(stats, indent=2))
        return 0
    for state, count in stats["by_state"].items():
        print(f"{state:<10} {count}")
    if stats["by_outcome"]:
        print("outcomes:  " + ", ".join(f"{k} {v}" for k, v in sorted(stats["by_outcome"].items())))
    return 0


def queue_cancel(store: Store, task_id: int) -> int:
    if store.get(task_id) is None:
        print(f"kugetsu: no task {task_id}", file=sys.stderr)
        return 1
    result = store.request_cancel(task_id, "cli")
    messages = {
        CancelResult.CANCELLED: f"task {task_id} cancelled",
        CancelResult.STOPPING: f"task {task_id} is running; its agent will be stopped",
        CancelResult.FINISHED: f"task {task_id} has already finished",
    }
    print(messages[result])
    return 0 if result is not CancelResult.FINISHED else 1


def queue_retry(store: Store, task_id: int) -> int:
    try:
        done, blocker = store.try_requeue(task_id, "cli")
    except KeyError:
        print(f"kugetsu: no task {task_id}", file=sys.stderr)
        return 1
    if done:
        print(f"task {task_id} queued again")
        return 0
    if blocker is not None:
        print(
            f"kugetsu: task {blocker.id} is already active on {blocker.ref}; task {task_id} "
            "cannot be retried while it is",
            file=sys.stderr,
        )
        return 1
    task = store.require(task_id)
    print(
        f"kugetsu: task {task_id} is {task.state.value}; only failed or cancelled tasks can "
        "be retried",
        file=sys.stderr,
    )
    return 1


_REF = re.compile(r"(?P<repo>[^#]*)#(?P<issue>[0-9]{1,30})")


def parse_ref(ref: str) -> tuple[str, int] | str:
    """OWNER/REPO#N -> (repo, issue), or a one-line reason it is not one."""
    m = _REF.fullmatch(ref)
    if not m:
        return f"{names.shown(ref)} is not OWNER/REPO#NUMBER"
    error = names.repo_error(m.group("repo")) or names.number_error(
        int(m.group("issue")), "the issue number"
    )
    if error:
        return f"{names.shown(ref)} is not OWNER/REPO#NUMBER: {error}"
    return m.group("repo"), int(m.group("issue"))


def enqueue(
    config: Config, store: Store, ref: str, message: str, agent: str | None, follow_up: bool
) -> int:
    parsed = parse_ref(ref)
    if isinstance(parsed, str):
        print(f"kugetsu: {parsed}", file=sys.stderr)
        return 2
    repo, issue = parsed
    agent = agent or config.agents.default
    if agent not in known_agents(config):
        print(f"kugetsu: unknown agent {agent!r}", file=sys.stderr)
        return 2
    with store.tx() as c:
        asked = Kind.CONTINUE if follow_up else Kind.START
        kind, active = start_or_continue(StoreView(store, c), repo, issue, asked)
        if follow_up and not message:
            print("kugetsu: --continue needs a message", file=sys.stderr)
            return 2
        if active is not None:
            print(f"kugetsu: already queued on {ref} as task {active.id}", file=sys.stderr)
            return 1
        task_id = store.insert_task(
            c,
            repo=repo,
            issue=issue,
            kind=kind,
            prompt=message,
            agent=agent,
            requested_by="cli",
            max_attempts=config.queue.max_attempts,
            authorized=True,
        )
    if ping_server(config):
        print(f"task {task_id} queued ({kind.value} on {ref})")
    else:
        print(
            f"task {task_id} queued ({kind.value} on {ref}); kugetsu serve is not reachable "
            f"at {config.server.host}:{config.server.port}, it will pick the task up when it runs"
        )
    return 0


#: how often `kugetsu logs --follow` looks for more output
FOLLOW_SECONDS = 0.5


def _follow_wait() -> None:
    time.sleep(FOLLOW_SECONDS)


def show_logs(
    config: Config,
    store: Store,
    task_id: int,
    follow: bool,
    *,
    out: BinaryIO | None = None,
    wait: Callable[[], object] = _follow_wait,
) -> int:
    """Print a task's log; with `follow`, what is added to it too (`wait` between looks),
    until the task is no longer active and nothing more came."""
    path = config.storage.log_path(task_id)
    if store.get(task_id) is None and not path.exists():
        print(f"kugetsu: no task {task_id}", file=sys.stderr)
        return 1
    position = 0
    out = sys.stdout.buffer if out is None else out
    while True:
        try:
            with path.open("rb") as fh:
                fh.seek(position)
                chunk = fh.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            out.write(chunk)
            out.flush()
            position += len(chunk)
        if not follow:
            if position == 0:
                print(f"(task {task_id} has no log yet)", file=sys.stderr)
            return 0
        task = store.get(task_id)
        if task is None or (not task.active and not chunk):
            return 0
        wait()


# --------------------------------------------------------------------------- parsing


def _whole_number(what: str) -> Callable[[str], int]:
    """An argparse type: `what`, a whole number from 1 to 2**63-1."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        error = names.number_error(value, what)
        if error:
            raise argparse.ArgumentTypeError(error)
        return value

    return parse


task_id_arg = _whole_number("task id")


def days_arg(text: str) -> float:
    """An argparse type: a finite number of days, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"the number of days must be a finite number >= 0, got {text}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: $KUGETSU_CONFIG, ./kugetsu.toml, "
        "/etc/kugetsu/config.toml, or built-in defaults)",
    )
    parser = argparse.ArgumentParser(
        prog="kugetsu",
        parents=[common],
        description="Turns Gitea issues into pull requests written by AI coding agents.",
    )
    parser.add_argument("--version", action="version", version=f"kugetsu {__version__}")
    # `worker` is started by `serve` itself and is left out of the listing
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,queue,enqueue,logs}")

    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    p = sub.add_parser("serve", parents=[common], help="run the webhook server and scheduler")
    p.add_argument(
        "--log-level", default=os.environ.get("KUGETSU_LOG_LEVEL", "INFO"), choices=levels
    )
    # started by `serve` itself; not for people
    w = sub.add_parser("worker", parents=[common])
    w.add_argument("--wake-fd", type=int, default=None)
    w.add_argument("--fd-limit", type=int, default=None)
    w.add_argument("--log-level", default="INFO", choices=levels)
    w.add_argument("--launcher", default=None)

    q = sub.add_parser("queue", parents=[common], help="inspect and manage the task queue")
    qsub = q.add_subparsers(dest="queue_command", required=True)
    ql = qsub.add_parser("list", parents=[common], help="list tasks")
    ql.add_argument("--state", choices=[s.value for s in State])
    ql.add_argument("--json", action="store_true")
    how_many = ql.add_mutually_exclusive_group()
    how_many.add_argument(
        "--limit",
        type=_whole_number("number of tasks"),
        default=50,
        metavar="N",
        help="the newest N tasks (default 50)",
    )
    how_many.add_argument("--all", action="store_true", help="every task")
    ql.add_argument(
        "--before",
        type=task_id_arg,
        metavar="ID",
        help="only tasks with a lower id: the next page is --before the first id shown",
    )
    qs = qsub.add_parser("stats", parents=[common], help="count tasks by state and outcome")
    qs.add_argument("--json", action="store_true")
    qc = qsub.add_parser("cancel", parents=[common], help="cancel a queued or running task")
    qc.add_argument("id", type=task_id_arg)
    qr = qsub.add_parser("retry", parents=[common], help="queue a failed or cancelled task again")
    qr.add_argument("id", type=task_id_arg)
    qx = qsub.add_parser("clear", parents=[common], help="delete old finished tasks")
    qx.add_argument(
        "--older-than",
        type=days_arg,
        metavar="DAYS",
        default=None,
        help="default: queue.cleanup_age_days",
    )

    e = sub.add_parser("enqueue", parents=[common], help="queue work on an issue by hand")
    e.add_argument("ref", metavar="OWNER/REPO#N")
    e.add_argument("message", nargs="?", default="")
    e.add_argument("--agent")
    e.add_argument(
        "--continue",
        dest="follow_up",
        action="store_true",
        help="follow up on the issue's earlier work",
    )

    lg = sub.add_parser("logs", parents=[common], help="show a task's agent log")
    lg.add_argument("id", type=task_id_arg)
    lg.add_argument("--follow", "-f", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Whatever the umask kugetsu is started with, what it creates (the database and its
    # -wal and -shm, logs, prompts, mirrors, worktrees, agent homes) is its user's alone:
    # logs and prompts hold issue text and agent output. Agents inherit it.
    os.umask(0o077)
    try:
        config = load(getattr(args, "config", None), require_secret=args.command == "serve")
    except ConfigError as exc:
        print(f"kugetsu: config error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return serve(config, log_level=args.log_level)
        if args.command == "worker":
            return run_worker(
                config,
                args.wake_fd,
                log_level=args.log_level,
                fd_limit=args.fd_limit,
                launcher=args.launcher,
            )
        if not config.storage.db_path.exists() and args.command != "enqueue":
            print(
                f"kugetsu: no database at {config.storage.db_path} (has kugetsu served "
                "with this data_dir yet?)",
                file=sys.stderr,
            )
            return 1
        store = open_store(config.storage.db_path)
        try:
            if args.command == "queue":
                if args.queue_command == "list":
                    return queue_list(
                        store,
                        args.state,
                        args.json,
                        limit=None if args.all else args.limit,
                        before=args.before,
                    )
                if args.queue_command == "stats":
                    return queue_stats(store, args.json)
                if args.queue_command in ("cancel", "retry"):
                    action = queue_cancel if args.queue_command == "cancel" else queue_retry
                    code = action(store, args.id)
                    if code == 0:
                        ping_server(config)
                    return code
                if args.queue_command == "clear":
                    days = (
                        config.queue.cleanup_age_days
                        if args.older_than is None
                        else args.older_than
                    )
                    print(f"{store.clear(days)} finished task(s) removed")
                    return 0
            if args.command == "enqueue":
                return enqueue(config, store, args.ref, args.message, args.agent, args.follow_up)
            if args.command == "logs":
                return show_logs(config, store, args.id, args.follow)
        finally:
            store.close()
    except SchemaTooNew as exc:
        print(f"kugetsu: {exc}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as exc:
        print(f"kugetsu: database {config.storage.db_path}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader stopped early (`kugetsu queue list --all | head`): not an error of
        # ours, and nothing more is to be written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        what = exc.strerror or str(exc) or type(exc).__name__
        if exc.filename is not None:
            what = f"{exc.filename}: {what}"
        print(f"kugetsu: {what}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
