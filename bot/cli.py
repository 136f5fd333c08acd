"""The `kugetsu` command: serve, queue, enqueue, logs, doctor.

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
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from bot import __version__, tasklog
from bot.config import Config, ConfigError, load
from bot.core import names
from bot.core.intake import start_or_continue
from bot.core.tasks import CancelResult, Kind, State, Task
from bot.ingest import StoreView
from bot.logs import LEVELS
from bot.prune import disk_usage
from bot.redact import redact
from bot.service import ROLES, gitea_client, known_agents, run_worker, serve
from bot.store import STORE_ERRORS, SchemaTooNew, Store, open_store

log = logging.getLogger("kugetsu")


# --------------------------------------------------------------------------- queue


def ping_server(config: Config) -> bool:
    """Ask a running `kugetsu serve` to look at the queue now (through the wake socket in
    its data directory); False, and harmless, if none runs."""
    from bot import wake

    return wake.send(config.storage.data_dir)


def _not_running(config: Config) -> str:
    return (
        "kugetsu serve is not running with this data directory "
        f"({config.storage.data_dir}); it will pick the task up when it starts"
    )


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def queue_list(
    store: Store,
    state: str | None,
    as_json: bool,
    *,
    limit: int | None = 50,
    before: int | None = None,
    repo: str | None = None,
    issue: int | None = None,
) -> int:
    """The newest `limit` tasks (every one with None) below id `before`, of `repo` (and
    its `issue`) if given, oldest first, printed as they are read from the database: the
    whole table is never in memory."""
    first = None

    def tasks(before: int | None, newest: int | None) -> Iterator[Task]:
        return store.iter_tasks(state, before=before, newest=newest, repo=repo, issue=issue)

    if as_json:
        # the same text as json.dumps(list, indent=2), one task at a time
        print("[", end="")
        for task in tasks(before, limit):
            item = json.dumps(task.public_dict(), indent=2).replace("\n", "\n  ")
            print(("\n  " if first is None else ",\n  ") + item, end="")
            first = task.id if first is None else first
        print("]" if first is None else "\n]")
    else:
        for t in tasks(before, limit):
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
    if limit is not None and first is not None and next(tasks(first, 1), None) is not None:
        print(
            f"kugetsu: the newest {limit} shown; older ones with --before {first}, "
            "or all with --all",
            file=sys.stderr,
        )
    return 0


def queue_stats(config: Config, store: Store, as_json: bool) -> int:
    stats = store.stats().as_dict()
    stats["disk_bytes"] = disk_usage(config.storage)
    if as_json:
        print(json.dumps(stats, indent=2))
        return 0
    for state, count in stats["by_state"].items():
        print(f"{state:<10} {count}")
    if stats["by_outcome"]:
        print("outcomes:  " + ", ".join(f"{k} {v}" for k, v in sorted(stats["by_outcome"].items())))
    print("disk:      " + ", ".join(f"{k} {_size(v)}" for k, v in stats["disk_bytes"].items()))
    for w in stats["workers"]:
        print(
            f"worker {w['id']} on {w['host']}: {w['running']} of {w['capacity'] or '?'} "
            f"agents running, heartbeat {w['heartbeat_age_seconds']:.0f} s ago"
        )
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


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


# --------------------------------------------------------------------------- prune


def prune_now(
    config: Config, store: Store, days: float | None, dry_run: bool, as_json: bool
) -> int:
    """`kugetsu prune`: what the daily clean-up does, now; with `dry_run`, only shown."""
    from bot.prune import MAX_LOOKUPS, Pruner
    from bot.service import workspace_of

    report = Pruner(config, store, gitea_client(config), workspace_of(config)).run(
        days, dry_run=dry_run
    )
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    would = "would be " if dry_run else ""
    print(
        f"finished tasks {would}deleted: {report.tasks} (with {report.files} log and prompt files)"
    )
    print(f"worktrees {would}removed: {len(report.worktrees)}")
    for ref in report.worktrees:
        print(f"  {ref}")
    print(
        f"agent homes {would}removed (issue closed, or its pull request merged or closed): "
        f"{len(report.homes)}, with {report.prompts} prompt files"
    )
    for ref in report.homes:
        print(f"  {ref}")
    for ref, commits in report.unpushed:
        what = "commits that git could not check" if commits is None else f"{commits} commit(s)"
        print(f"kept: the worktree of {ref} holds {what} not pushed", file=sys.stderr)
    if report.unknown:
        print(
            f"{len(report.unknown)} idle issue(s) whose state was not learned this run "
            f"(Gitea asked {report.lookups} times, at most {MAX_LOOKUPS}, or it did not "
            "answer); their homes stay",
            file=sys.stderr,
        )
    return 0


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
    agent_requested = agent is not None
    agent = agent or config.agents.default
    if agent not in known_agents(config):
        print(f"kugetsu: unknown agent {agent!r}", file=sys.stderr)
        return 2
    refused = _check_issue(config, repo, issue)
    if refused:
        print(f"kugetsu: {refused}; nothing queued", file=sys.stderr)
        return 1
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
            agent_requested=agent_requested,
        )
    if ping_server(config):
        print(f"task {task_id} queued ({kind.value} on {ref})")
    elif store.SHARED:
        print(f"task {task_id} queued ({kind.value} on {ref}); the database wakes the workers")
    else:
        print(f"task {task_id} queued ({kind.value} on {ref}); {_not_running(config)}")
    return 0


def _check_issue(config: Config, repo: str, issue: int) -> str | None:
    """Why `repo#issue` cannot be queued (it is not an issue on Gitea), or None. When Gitea
    cannot say (it is away, the token is refused), a warning is printed and None given:
    the task waits in the queue, as one from a delivery would."""
    from bot.gitea import GiteaError, NotFound

    client = gitea_client(config, retries=0)
    owner, name = repo.split("/", 1)
    try:
        found = client.get_issue(owner, name, issue)
    except NotFound:
        return f"{repo}#{issue} is not an issue on Gitea (or the bot cannot see it)"
    except GiteaError as exc:
        print(
            f"kugetsu: warning: cannot check that {repo}#{issue} exists ({exc}); "
            "queued all the same",
            file=sys.stderr,
        )
        return None
    if found.get("pull_request"):
        return f"{repo}#{issue} is a pull request; name the issue it is for"
    return None


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
    if store.get(task_id) is None and tasklog.read(config, store, task_id) is None:
        print(f"kugetsu: no task {task_id}", file=sys.stderr)
        return 1
    position = 0
    out = sys.stdout.buffer if out is None else out
    while True:
        chunk = tasklog.read(config, store, task_id, position) or b""
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


# --------------------------------------------------------------------------- doctor


def doctor(
    config_path: str | None, *, as_json: bool, deliver_test: bool, deliver_wait: float
) -> int:
    """Every check of the setup, in order; 1 if any fails. A config that cannot be read is
    the first check's failure, in the same output."""
    from bot.doctor import Context, Result, open_database, report, run

    try:
        config = load(config_path, require_secret=False)
    except ConfigError as exc:
        results = [Result("config", False, f"{exc}.", "fix the config file (config.example.toml)")]
    else:
        problems: list[str] = []
        store = open_database(config, problems)
        try:
            ctx = Context(
                config,
                store=store,
                database_problems=problems,
                deliver_test=deliver_test,
                deliver_seconds=deliver_wait,
            )
            results = run(ctx)
        finally:
            if store is not None:
                store.close()
    ok = all(r.ok for r in results)
    if as_json:
        print(json.dumps({"ok": ok, "checks": [r.as_dict() for r in results]}, indent=2))
    else:
        print(report(results))
    return 0 if ok else 1


# --------------------------------------------------------------------------- webhook


def _webhook_targets(
    config: Config, repos: Sequence[str], org: str | None
) -> list[tuple[str, str | None]] | str:
    """(owner, repo or None for an organization) of each target, or a one-line reason
    there are none: the repositories named, the organization, or else those kugetsu
    serves (gitea.repos and the database)."""
    if org is not None:
        error = names.name_error(org, "organization", names.MAX_OWNER_LENGTH)
        return f"--org: {error}" if error else [(org, None)]
    for repo in repos:
        error = names.repo_error(repo)
        if error:
            return f"{names.shown(repo)} is not OWNER/REPO: {error}"
    if not repos:
        from bot.doctor import open_database

        store = open_database(config)
        known = set(config.gitea.repos)
        if store is not None:
            known.update(store.served_repos())
            store.close()
        repos = sorted(known)
    if not repos:
        return (
            "no repository given, and none known (gitea.repos is empty and the database "
            "has none): name OWNER/REPO or --org ORG"
        )
    return [names.split_repo(r) for r in dict.fromkeys(repos)]


def _target_name(owner: str, repo: str | None) -> str:
    return f"{owner}/{repo}" if repo else f"organization {owner}"


def _hook_url(config: Config, url: str | None) -> str:
    from bot.core import hooks

    return url or hooks.url_for(config.server.public_url)


def webhook_install(config: Config, repos: Sequence[str], org: str | None, url: str | None) -> int:
    """Create kugetsu's webhook on each target, or update it in place: one hook each,
    however often this runs."""
    from bot.core import hooks
    from bot.gitea import Forbidden, GiteaError, missing_scope

    targets = _webhook_targets(config, repos, org)
    if isinstance(targets, str):
        print(f"kugetsu: {targets}", file=sys.stderr)
        return 2
    where = _hook_url(config, url)
    if not where.startswith(("http://", "https://")):
        print(
            "kugetsu: the webhook needs the URL at which Gitea reaches kugetsu: set "
            "server.public_url, or give --url http://HOST:PORT/webhook",
            file=sys.stderr,
        )
        return 2
    secret = config.gitea.webhook_secret
    if not secret:
        print(
            "kugetsu: gitea.webhook_secret (KUGETSU_WEBHOOK_SECRET) is not set: the webhook "
            "needs the secret kugetsu checks every delivery against",
            file=sys.stderr,
        )
        return 2
    client = gitea_client(config)
    failed = 0
    for owner, repo in targets:
        target = _target_name(owner, repo)
        try:
            found = hooks.ours(client.list_hooks(owner, repo), where)
            if not found:
                made = client.create_hook(owner, repo, hooks.create_body(where, secret))
                print(f"{target}: created {hooks.describe(made)}")
                continue
            hook = found[0]
            differs = hooks.differences(hook, where)
            made = client.edit_hook(owner, repo, int(hook["id"]), hooks.edit_body(where, secret))
            if differs:
                print(f"{target}: updated {hooks.describe(made)} (it had: {'; '.join(differs)})")
            else:
                print(f"{target}: {hooks.describe(made)} was right; its secret was set again")
            for extra in found[1:]:
                failed += 1
                print(
                    f"{target}: hook {extra.get('id')} also delivers to kugetsu, so each event "
                    "would arrive twice: delete it in Gitea",
                    file=sys.stderr,
                )
        except GiteaError as exc:
            failed += 1
            scope = missing_scope(exc)
            if scope:
                why = f"the token lacks {scope}"
            elif isinstance(exc, Forbidden):
                why = (
                    "managing webhooks needs admin on the repository (or owner of the "
                    "organization): give the bot admin, or run this once with an admin's "
                    "token in KUGETSU_GITEA_TOKEN"
                )
            else:
                why = str(exc)
            print(f"kugetsu: {target}: not installed: {why}", file=sys.stderr)
    return 1 if failed else 0


def webhook_list(config: Config, repos: Sequence[str], org: str | None, url: str | None) -> int:
    """The webhooks of each target, and how kugetsu's differs from what it needs; 1 when
    one is missing or differs."""
    from bot.core import hooks
    from bot.gitea import GiteaError

    targets = _webhook_targets(config, repos, org)
    if isinstance(targets, str):
        print(f"kugetsu: {targets}", file=sys.stderr)
        return 2
    where = _hook_url(config, url)
    client = gitea_client(config)
    wrong = 0
    for owner, repo in targets:
        target = _target_name(owner, repo)
        try:
            installed = client.list_hooks(owner, repo)
        except GiteaError as exc:
            wrong += 1
            print(f"{target}: cannot read its webhooks: {exc}")
            continue
        print(f"{target}:")
        found = hooks.ours(installed, where)
        for hook in installed:
            line = f"  {hooks.describe(hook)}"
            if any(h is hook for h in found):
                differs = hooks.differences(hook, where) if where else ["no URL to compare"]
                line += (
                    f"  [kugetsu's; differs: {'; '.join(differs)}]" if differs else "  [kugetsu's]"
                )
                wrong += bool(differs) or hook is not found[0]
            print(line)
        if not found:
            wrong += 1
            print(
                f"  no hook delivers to {where or '(server.public_url is not set)'}: "
                f"kugetsu webhook install {f'{owner}/{repo}' if repo else '--org ' + owner}"
            )
    return 1 if wrong else 0


# --------------------------------------------------------------------------- backup


def backup(config: Config, dest: str) -> int:
    """A consistent copy of the database (SQLite's online backup), taken while `serve`
    runs; never over an existing file."""
    if config.storage.database_url:
        print(
            "kugetsu: the database is PostgreSQL (storage.database_url): back it up with "
            "pg_dump, which takes a consistent copy while kugetsu runs",
            file=sys.stderr,
        )
        return 1
    source = config.storage.db_path
    if not source.is_file():
        print(f"kugetsu: no database at {source} (storage.data_dir)", file=sys.stderr)
        return 1
    target = Path(dest).expanduser()
    if target.is_dir():
        target = target / time.strftime("kugetsu-%Y%m%d-%H%M%S.db", time.gmtime())
    if target.exists():
        print(f"kugetsu: {target} exists; kugetsu backup never overwrites a file", file=sys.stderr)
        return 1
    store = Store(source)
    try:
        version, tasks = store.backup(target)
    finally:
        store.close()
    size = target.stat().st_size / (1024 * 1024)
    print(f"backed up {tasks} task(s), schema version {version}, to {target} ({size:.1f} MiB)")
    return 0


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
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{serve,queue,enqueue,logs,prune,doctor,webhook,backup}",
    )

    p = sub.add_parser("serve", parents=[common], help="run the webhook server and scheduler")
    p.add_argument(
        "--log-level",
        default=None,
        choices=LEVELS,
        help="default: logging.level (or $KUGETSU_LOG_LEVEL), else INFO",
    )
    p.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="all: receiver and worker (default); receiver: take Gitea's deliveries only; "
        "worker: run agents only. Several machines share one queue through "
        "storage.database_url",
    )
    # started by `serve` itself; not for people
    w = sub.add_parser("worker", parents=[common])
    w.add_argument("--wake-fd", type=int, default=None)
    w.add_argument("--fd-limit", type=int, default=None)
    w.add_argument("--log-level", default=None, choices=LEVELS)
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
    ql.add_argument("--repo", type=repo_arg, metavar="OWNER/REPO", help="only this repository's")
    ql.add_argument(
        "--issue",
        type=_whole_number("issue number"),
        metavar="N",
        help="only this issue's (with --repo)",
    )
    qs = qsub.add_parser("stats", parents=[common], help="count tasks by state and outcome")
    qs.add_argument("--json", action="store_true")
    qc = qsub.add_parser("cancel", parents=[common], help="cancel a queued or running task")
    qc.add_argument("id", type=task_id_arg)
    qr = qsub.add_parser("retry", parents=[common], help="queue a failed or cancelled task again")
    qr.add_argument("id", type=task_id_arg)
    age = argparse.ArgumentParser(add_help=False)
    age.add_argument(
        "--older-than",
        type=days_arg,
        metavar="DAYS",
        default=None,
        help="default: queue.cleanup_age_days",
    )
    qsub.add_parser("clear", parents=[common, age], help="delete old finished tasks")

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

    pr = sub.add_parser(
        "prune",
        parents=[common, age],
        help="remove old tasks, idle worktrees and the homes of finished issues now",
    )
    pr.add_argument("--dry-run", action="store_true", help="show what would go; change nothing")
    pr.add_argument("--json", action="store_true")

    lg = sub.add_parser("logs", parents=[common], help="show a task's agent log")
    lg.add_argument("id", type=task_id_arg)
    lg.add_argument("--follow", "-f", action="store_true")
    _operator_commands(sub, common)
    return parser


def _seconds_arg(text: str) -> float:
    """An argparse type: a number of seconds, more than 0 and finite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"the seconds must be a finite number > 0, got {text}")
    return value


def repo_arg(text: str) -> str:
    """An argparse type: OWNER/REPO, as Gitea names repositories."""
    error = names.repo_error(text)
    if error:
        raise argparse.ArgumentTypeError(error)
    return text


def _operator_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """doctor, webhook install / list, backup."""
    from bot.doctor import CHECKS, DELIVER_TEST_SECONDS

    d = sub.add_parser(
        "doctor",
        parents=[common],
        help="check the setup, each problem with its fix (exit 1 if any)",
        description="Checks, in order: " + "; ".join(f"{c.name}: {c.what}" for c in CHECKS) + ".",
    )
    d.add_argument(
        "--json", action="store_true", help='print {"ok": bool, "checks": [{name, ok, detail}]}'
    )
    d.add_argument(
        "--deliver-test",
        action="store_true",
        help="have Gitea send each webhook a test delivery, and wait for it to arrive "
        "(kugetsu serve must be running)",
    )
    d.add_argument(
        "--deliver-wait",
        type=_seconds_arg,
        default=DELIVER_TEST_SECONDS,
        metavar="SECONDS",
        help=f"how long to wait for each (default {DELIVER_TEST_SECONDS:g})",
    )
    w = sub.add_parser("webhook", parents=[common], help="install or list kugetsu's webhooks")
    wsub = w.add_subparsers(dest="webhook_command", required=True)
    for name, what in (
        ("install", "create kugetsu's webhook, or update it in place"),
        ("list", "show the webhooks, and where kugetsu's differs from what it needs"),
    ):
        wp = wsub.add_parser(
            name,
            parents=[common],
            help=what,
            description=f"{what[0].upper()}{what[1:]}, on each repository named, or on the "
            "organization, or (with neither) on those kugetsu serves: gitea.repos and the "
            "repositories in its database.",
        )
        wp.add_argument("repos", nargs="*", metavar="OWNER/REPO")
        wp.add_argument("--org", metavar="ORG", help="the organization's webhook instead")
        wp.add_argument(
            "--url", help="where Gitea delivers (default: server.public_url + /webhook)"
        )
    b = sub.add_parser(
        "backup",
        parents=[common],
        help="copy the database while kugetsu serve runs (SQLite's online backup)",
    )
    b.add_argument("path", metavar="PATH", help="a new file, or a directory to put one in")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # what is still buffered (argparse's --help too) goes now
    except BrokenPipeError:
        # the reader stopped early (`kugetsu queue list --all | head`): not an error of
        # ours, and nothing more is to be written, not even at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # Whatever the umask kugetsu is started with, what it creates (the database and its
    # -wal and -shm, logs, prompts, mirrors, worktrees, agent homes) is its user's alone:
    # logs and prompts hold issue text and agent output. Agents inherit it.
    os.umask(0o077)
    if args.command not in ("serve", "worker"):
        # the command line says what went wrong itself; only errors of the parts it uses
        logging.basicConfig(level=logging.ERROR, format="kugetsu: %(name)s: %(message)s")
    if args.command == "doctor":
        return doctor(
            getattr(args, "config", None),
            as_json=args.json,
            deliver_test=args.deliver_test,
            deliver_wait=args.deliver_wait,
        )
    try:
        config = load(getattr(args, "config", None), require_secret=args.command == "serve")
    except ConfigError as exc:
        print(f"kugetsu: config error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, config)
    except SchemaTooNew as exc:
        print(f"kugetsu: {exc}", file=sys.stderr)
        return 1
    except STORE_ERRORS as exc:
        where = "the PostgreSQL database" if config.storage.database_url else config.storage.db_path
        reason = " ".join(redact(str(exc), config.secrets()).split())
        print(f"kugetsu: database {where}: {reason}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise
    except OSError as exc:
        print(f"kugetsu: {_os_error(config, exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _os_error(config: Config, exc: OSError) -> str:
    """One line for an OSError; one about the data directory names storage.data_dir."""
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return what
    data_dir = config.storage.data_dir
    path = Path(os.fsdecode(exc.filename)).absolute()
    if path == data_dir:
        return f"storage.data_dir {data_dir}: {what}"
    if data_dir in path.parents or path in data_dir.parents:
        return f"storage.data_dir {data_dir}: {path}: {what}"
    return f"{path}: {what}"


def _run(args: argparse.Namespace, config: Config) -> int:
    if args.command == "serve":
        return serve(config, log_level=args.log_level or config.logging.level, role=args.role)
    if args.command == "worker":
        return run_worker(
            config,
            args.wake_fd,
            log_level=args.log_level or config.logging.level,
            fd_limit=args.fd_limit,
            launcher=args.launcher,
        )
    if args.command == "webhook":
        hook_action = webhook_install if args.webhook_command == "install" else webhook_list
        return hook_action(config, args.repos, args.org, args.url)
    if args.command == "backup":
        return backup(config, args.path)
    if (
        not config.storage.database_url
        and not config.storage.db_path.exists()
        and args.command != "enqueue"
    ):
        print(
            f"kugetsu: no database at {config.storage.db_path} (has kugetsu served "
            "with this storage.data_dir yet?)",
            file=sys.stderr,
        )
        return 1
    store = open_store(config.storage.database, notify=config.notify_routes())
    try:
        if args.command == "queue":
            if args.queue_command == "list":
                if args.issue is not None and args.repo is None:
                    print("kugetsu: --issue needs --repo", file=sys.stderr)
                    return 2
                return queue_list(
                    store,
                    args.state,
                    args.json,
                    limit=None if args.all else args.limit,
                    before=args.before,
                    repo=args.repo,
                    issue=args.issue,
                )
            if args.queue_command == "stats":
                return queue_stats(config, store, args.json)
            if args.queue_command in ("cancel", "retry"):
                action = queue_cancel if args.queue_command == "cancel" else queue_retry
                code = action(store, args.id)
                if code == 0 and not ping_server(config):
                    print(_not_running(config).replace("the task", "it"))
                return code
            if args.queue_command == "clear":
                days = config.queue.cleanup_age_days if args.older_than is None else args.older_than
                print(f"{store.clear(days)} finished task(s) removed")
                return 0
        if args.command == "enqueue":
            return enqueue(config, store, args.ref, args.message, args.agent, args.follow_up)
        if args.command == "logs":
            return show_logs(config, store, args.id, args.follow)
        if args.command == "prune":
            return prune_now(config, store, args.older_than, args.dry_run, args.json)
    finally:
        store.close()
    return 2
