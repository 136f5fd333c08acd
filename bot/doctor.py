"""`kugetsu doctor`: every check of a setup, in order, each problem with its fix.

The checks are one registry, `CHECKS`, in the order they run: the config, the data
directory, Gitea, the token, each repository kugetsu serves (the bot's permission, its
webhook and, with `deliver_test`, a test delivery that must arrive), each configured agent,
and the sandbox. Adding a check is one entry. Each gives one or more `Result`s; a problem
carries its fix.

`kugetsu serve` runs the same checks at start (`ServeChecks`, in the worker) and logs each
problem as an error; then, every `SERVE_RECHECK_SECONDS`, the checks marked `readiness`
again, quickly, and records what keeps kugetsu from working (`core.health.Readiness`) for
the receiver's /healthz and /readyz.

Gitea has no call that lists a token's scopes. They are inferred from what the calls
kugetsu needs answer: `GET /user` (read:user), reading each repository (read:repository),
its issues (read:issue) and git's push handshake (write:repository). write:issue cannot be
seen without writing, and is said so.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot import agents, sandbox
from bot.config import Config
from bot.core import hooks
from bot.core.health import Readiness, describe
from bot.gitea import (
    Forbidden,
    GiteaClient,
    GiteaError,
    NotFound,
    ServerError,
    Unauthorized,
    Unreachable,
    missing_scope,
)
from bot.redact import redact
from bot.service import gitea_client
from bot.store import SchemaTooNew, Store, open_store

log = logging.getLogger(__name__)

#: how long `--deliver-test` waits for Gitea's test delivery to arrive
DELIVER_TEST_SECONDS = 20.0
#: how long an agent's `--version` may take
VERSION_SECONDS = 20.0
#: `kugetsu serve` checks Gitea, the token and the default agent again this often
SERVE_RECHECK_SECONDS = 60.0
#: the scopes kugetsu's token needs (docs/gitea-setup.md)
SCOPES = ("write:issue", "write:repository", "read:user")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Result:
    """One finding. `fix` says what to do when it is not `ok`. `blocks`: the problem keeps
    kugetsu from working at all (Gitea away, the token refused, the default agent missing):
    /readyz answers 503 while it lasts."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    blocks: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The shape `kugetsu doctor --json` prints: the fix is part of the detail."""
        detail = f"{self.detail} Fix: {self.fix}" if self.fix and not self.ok else self.detail
        return {"name": self.name, "ok": self.ok, "detail": detail}

    def line(self) -> str:
        """One line, for a log or /healthz: the problem and its fix."""
        return f"{self.name}: {self.detail}" + (f" ({self.fix})" if self.fix else "")


@dataclass
class Context:
    """What the checks share: the config, and what earlier checks found."""

    config: Config
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    #: --deliver-test: ask Gitea for a test delivery to each repository and wait for it
    deliver_test: bool = False
    deliver_seconds: float = DELIVER_TEST_SECONDS
    #: quick: no agent is run (for `serve`'s periodic checks)
    quick: bool = False
    #: run by `serve`'s worker, and the sandbox's launcher it runs agents through (None:
    #: without the sandbox; `kugetsu doctor` looks for a running serve's)
    serving: bool = False
    launcher: Path | None = None
    #: the database, when one is there (read: repositories and deliveries)
    store: Store | None = None
    #: why the database could not be opened (`open_database`)
    database_problems: list[str] = field(default_factory=list)
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    gitea_up: bool | None = None
    token_ok: bool | None = None
    login: str | None = None
    _client: GiteaClient | None = None

    @property
    def gitea(self) -> GiteaClient:
        if self._client is None:
            self._client = gitea_client(self.config, retries=0)
        return self._client

    def repos(self) -> list[str]:
        """The repositories kugetsu serves: those with tasks or deliveries, and
        `gitea.repos`."""
        known = set(self.config.gitea.repos)
        if self.store is not None:
            known.update(self.store.served_repos())
        return sorted(known)


@dataclass(frozen=True)
class Check:
    name: str
    #: what it checks, one line (for `kugetsu doctor --help` and the docs)
    what: str
    run: Callable[[Context], list[Result]]
    #: `serve` runs it again every SERVE_RECHECK_SECONDS, for /readyz
    readiness: bool = False


# ------------------------------------------------------------------------------------ checks


def check_config(ctx: Context) -> list[Result]:
    config = ctx.config
    found = []
    if not config.gitea.webhook_secret and not config.gitea.insecure_no_signature:
        found.append(
            (
                "gitea.webhook_secret is not set, so kugetsu serve will not start",
                "set KUGETSU_WEBHOOK_SECRET (or gitea.webhook_secret) to the secret of the "
                "Gitea webhook",
            )
        )
    if not config.server.public_url:
        found.append(
            (
                "server.public_url is not set: Gitea's webhook URL cannot be known or checked, "
                "and comments carry no log links",
                "set server.public_url to the address at which Gitea reaches kugetsu, "
                "e.g. http://kugetsu:8080",
            )
        )
    if not found:
        return [Result("config", True, f"read from {config.source}")]
    return [
        Result(
            "config",
            False,
            f"{config.source}: " + "; ".join(d for d, _ in found) + ".",
            "; ".join(f for _, f in found),
        )
    ]


def check_data_dir(ctx: Context) -> list[Result]:
    storage = ctx.config.storage
    path = storage.data_dir
    name = "data_dir"
    where = f"storage.data_dir {path}"
    if path.exists() and not path.is_dir():
        return [
            Result(
                name,
                False,
                f"{where} is not a directory.",
                "point storage.data_dir (KUGETSU_DATA_DIR) at a directory",
                blocks=True,
            )
        ]
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kugetsu-doctor-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        what = "" if probe == path else f" (it does not exist yet, and {probe} "
        what += "" if probe == path else "cannot hold it)"
        return [
            Result(
                name,
                False,
                f"{where} cannot be written{what}: {exc.strerror or exc}.",
                f"give the user kugetsu runs as ({_user()}) write access to it, or set "
                "storage.data_dir (KUGETSU_DATA_DIR) to a directory it can write",
                blocks=True,
            )
        ]
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:
        return [Result(name, False, f"{where}: free space cannot be read: {exc}.", "", True)]
    need = storage.min_free_mb * MIB
    state = "writable" if probe == path else "does not exist yet; kugetsu serve creates it"
    if free < need:
        return [
            Result(
                name,
                False,
                f"{where}: {state}, but only {free / MIB:.1f} MiB free, below "
                f"storage.min_free_mb ({storage.min_free_mb}).",
                "free some space (old worktrees, logs), or move the data directory",
                blocks=True,
            )
        ]
    return [Result(name, True, f"{where}: {state}, {free / MIB / 1024:.1f} GiB free")]


#: a worker whose heartbeat is older than this is named by the database check
HEARTBEAT_SECONDS = 90.0


def check_database(ctx: Context) -> list[Result]:
    storage = ctx.config.storage
    if ctx.store is None:
        if not storage.database_url:
            return [
                Result("database", True, f"none yet at {storage.db_path}; kugetsu serve makes it")
            ]
        return [
            Result(
                "database",
                False,
                f"cannot be opened: {'; '.join(ctx.database_problems) or 'unknown error'}.",
                "check storage.database_url (KUGETSU_DATABASE_URL): the host, port, user, "
                "password and database, and that PostgreSQL runs and this machine may reach it",
                blocks=True,
            )
        ]
    where = ctx.store.describe()
    problems = ctx.store.check()
    if problems:
        fix = "run kugetsu serve with this version (it migrates), or upgrade kugetsu"
        return [Result("database", False, f"{where}: {'; '.join(problems)}.", fix)]
    results = [Result("database", True, f"{where}: schema up to date")]
    for w in ctx.store.worker_stats():
        age = w["heartbeat_age_seconds"]
        if age > HEARTBEAT_SECONDS:
            results.append(
                Result(
                    f"worker {w['id']}",
                    False,
                    f"on {w['host']}: no heartbeat for {age:.0f} s; its running tasks go "
                    "back to the queue once their leases run out.",
                    "restart kugetsu serve on that machine; a running worker forgets it "
                    "at its next recovery pass",
                )
            )
    return results


def _user() -> str:
    with suppress(KeyError, ImportError):
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    return f"uid {os.geteuid()}"


def check_gitea(ctx: Context) -> list[Result]:
    url = ctx.config.gitea.url
    try:
        version = ctx.gitea.get_version()
    except (Unreachable, ServerError) as exc:
        ctx.gitea_up = False
        return [
            Result(
                "gitea",
                False,
                f"{url} is not reachable: {exc}.",
                "check gitea.url (KUGETSU_GITEA_URL) and that Gitea runs; in a container, "
                "use the address Gitea has on its network (http://gitea:3000), not localhost",
                blocks=True,
            )
        ]
    except GiteaError as exc:
        ctx.gitea_up = False
        return [
            Result(
                "gitea",
                False,
                f"{url} answers, but not as Gitea's API does: {exc}.",
                "gitea.url must be Gitea's root URL (without /api/v1)",
                blocks=True,
            )
        ]
    ctx.gitea_up = True
    return [Result("gitea", True, f"Gitea {version or '(version not given)'} at {url}")]


_SCOPE_NOTE = (
    "Gitea lists no token's scopes: read:user is seen from GET /user, read:repository, "
    "read:issue and write:repository from each repository below; write:issue cannot be "
    "seen without writing"
)


def check_token(ctx: Context) -> list[Result]:
    g = ctx.config.gitea
    fix = (
        f"create a token of the bot user with the scopes {', '.join(SCOPES)} "
        "(docs/gitea-setup.md) and set KUGETSU_GITEA_TOKEN"
    )
    if not g.token:
        ctx.token_ok = False
        return [Result("token", False, "gitea.token is not set.", fix, blocks=True)]
    if not ctx.gitea_up:
        return [Result("token", False, "not checked: Gitea is not reachable.", "", True)]
    try:
        user = ctx.gitea.get_user()
    except Unauthorized:
        ctx.token_ok = False
        return [
            Result(
                "token",
                False,
                "Gitea rejects it (HTTP 401): it is wrong, expired or revoked.",
                fix,
                blocks=True,
            )
        ]
    except GiteaError as exc:
        scope = missing_scope(exc)
        ctx.token_ok = scope is not None  # a token Gitea knows, short of a scope
        if scope:
            return [
                Result(
                    "token",
                    False,
                    f"valid, but without the scope {scope}: GET /user is refused, so kugetsu "
                    "cannot learn its own login (and would answer its own comments).",
                    fix,
                    blocks=True,
                )
            ]
        return [Result("token", False, f"cannot be checked: {exc}.", "", True)]
    ctx.token_ok = True
    ctx.login = str(user.get("login") or "")
    if g.bot_login and g.bot_login != ctx.login:
        return [
            Result(
                "token",
                False,
                f"it belongs to {ctx.login}, but gitea.bot_login says {g.bot_login}: kugetsu "
                "would take its own comments for someone else's.",
                "set gitea.bot_login to the token's user, or leave it empty",
            )
        ]
    return [Result("token", True, f"valid, user {ctx.login} (read:user). {_SCOPE_NOTE}")]


#: what the bot cannot do without admin on a repository (README, docs/gitea-setup.md)
WITHOUT_ADMIN = (
    "without admin, kugetsu cannot read other users' permissions (it judges each request "
    "by what its delivery shows, and a label added by someone who did not write the issue "
    "counts as write) nor read or install this repository's webhook"
)


def check_repositories(ctx: Context) -> list[Result]:
    repos = ctx.repos()
    if not repos:
        return [
            Result(
                "repositories",
                False,
                "none known: no task or delivery in the database, and gitea.repos is empty, "
                "so no webhook can be checked.",
                'list them in the config: [gitea] repos = ["owner/name"]',
            )
        ]
    if not (ctx.gitea_up and ctx.token_ok):
        return [
            Result(f"repo {r}", False, "not checked: Gitea or the token failed above.")
            for r in repos
        ]
    results = []
    for full in repos:
        owner, name = full.split("/", 1)
        permission, readable = _check_permission(ctx, owner, name)
        results.append(permission)
        if readable:
            results += _check_webhook(ctx, owner, name)
    return results


def _check_permission(ctx: Context, owner: str, name: str) -> tuple[Result, bool]:
    """The bot's access to a repository, and whether the repository could be read at all
    (its webhook is looked at only then)."""
    full = f"{owner}/{name}"
    label = f"repo {full}"
    gitea = ctx.gitea
    bot = ctx.login or "the bot"
    try:
        data = gitea.get_repo(owner, name)
    except NotFound:
        return Result(
            label,
            False,
            "not found, or the bot cannot see it.",
            f"check the name, and add {bot} as a collaborator with write (better: admin) access",
        ), False
    except GiteaError as exc:
        return Result(label, False, _refused("read it", exc), _fix(exc, bot, full)), False
    if data.get("archived"):
        return Result(label, False, "archived: nothing can be pushed to it.", "unarchive it"), True
    admin = bool((data.get("permissions") or {}).get("admin"))
    problems = []
    try:
        gitea.list_issues(owner, name)
    except GiteaError as exc:
        problems.append((_refused("read its issues", exc), _fix(exc, bot, full)))
    try:
        gitea.may_push(owner, name)
    except GiteaError as exc:
        problems.append((_refused("push to it (git's push handshake)", exc), _fix(exc, bot, full)))
    if problems:
        return Result(
            label,
            False,
            " ".join(p for p, _ in problems),
            "; ".join(dict.fromkeys(f for _, f in problems if f)),
        ), True
    if admin:
        return Result(label, True, "admin: may push, read permissions and manage its webhook"), True
    return Result(label, True, f"write: may push; {WITHOUT_ADMIN}"), True


def _refused(what: str, exc: GiteaError) -> str:
    scope = missing_scope(exc)
    if scope:
        return f"the token may not {what}: it lacks {scope}."
    return f"cannot {what}: {exc}."


def _fix(exc: GiteaError, bot: str, full: str) -> str:
    scope = missing_scope(exc)
    if scope:
        return f"give the token {scope} (it needs {', '.join(SCOPES)}), or create a new one"
    if isinstance(exc, (Forbidden, Unauthorized)):
        return f"give {bot} write (better: admin) access to {full}"
    return ""


def _check_webhook(ctx: Context, owner: str, name: str) -> list[Result]:
    full = f"{owner}/{name}"
    label = f"webhook {full}"
    url = hooks.url_for(ctx.config.server.public_url)
    if not url:
        return [Result(label, False, "not checked: server.public_url is not set.", "set it")]
    install = f"run kugetsu webhook install {full}"
    try:
        found = hooks.ours(ctx.gitea.list_hooks(owner, name), url)
        where = "repository"
    except GiteaError as exc:
        if missing_scope(exc) or not isinstance(exc, Forbidden):
            bot = ctx.login or "the bot"
            return [Result(label, False, _refused("read its webhooks", exc), _fix(exc, bot, full))]
        # not an admin of the repository: what arrives tells instead
        last = ctx.store.last_delivery(full) if ctx.store is not None else None
        if last is not None:
            return [
                Result(
                    label,
                    True,
                    "its webhooks cannot be read without admin, but deliveries from it arrive "
                    f"(the last at {_at(last)}).",
                )
            ]
        return [
            Result(
                label,
                False,
                "its webhooks cannot be read without admin, and no delivery from it has "
                "arrived yet.",
                f"give the bot admin on {full} and {install}, or check the webhook in Gitea "
                "(Settings, Webhooks) and send a test delivery",
            )
        ]
    if not found:
        with suppress(GiteaError):  # an organization's hook delivers for its repositories
            found = hooks.ours(ctx.gitea.list_hooks(owner), url)
            where = "organization"
    if not found:
        return [Result(label, False, f"no webhook delivers to {url}.", install)]
    hook = found[0]
    results = []
    if len(found) > 1:
        ids = ", ".join(str(h.get("id")) for h in found)
        results.append(
            Result(
                label,
                False,
                f"{len(found)} hooks deliver to kugetsu ({ids}): each event arrives "
                f"{len(found)} times.",
                f"delete all but hook {hook.get('id')} in Gitea",
            )
        )
    differs = hooks.differences(hook, url)
    if differs:
        results.append(
            Result(
                label,
                False,
                f"{where} hook {hook.get('id')} differs: " + "; ".join(differs) + ".",
                f"{install} (it updates the hook in place)",
            )
        )
    elif not results:
        results.append(
            Result(
                label,
                True,
                f"{where} {hooks.describe(hook)}; Gitea never shows its secret: --deliver-test "
                "proves it",
            )
        )
    if ctx.deliver_test:
        results.append(_deliver_test(ctx, owner, name, hook, where))
    return results


def _at(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _deliver_test(
    ctx: Context, owner: str, name: str, hook: Mapping[str, Any], where: str
) -> Result:
    """Ask Gitea for its test delivery to the hook, and wait for the receiver to record it.

    Gitea sends the push test only to a hook that has the push event: kugetsu's has not,
    so it is added for the test and taken away again."""
    full = f"{owner}/{name}"
    label = f"delivery {full}"
    if where != "repository":
        return Result(
            label,
            False,
            "not tested: Gitea's API tests only a repository's own hooks, this one is the "
            "organization's.",
            "press Test Delivery on the hook's page in Gitea",
        )
    if ctx.store is None:
        return Result(
            label,
            False,
            "not tested: there is no database yet, so nothing records deliveries.",
            "start kugetsu serve with this config first",
        )
    hook_id = int(hook["id"])
    events = hooks.events_of(hook)
    keep = {
        "branch_filter": hook.get("branch_filter") or "",
        "authorization_header": hook.get("authorization_header") or "",
    }
    added = "push" not in events
    started = ctx.clock()
    try:
        if added:
            ctx.gitea.edit_hook(owner, name, hook_id, {"events": [*events, "push"], **keep})
        ctx.gitea.test_hook(owner, name, hook_id)
        arrived = None
        deadline = started + ctx.deliver_seconds
        while arrived is None and ctx.clock() < deadline:
            ctx.sleep(0.1)
            arrived = ctx.store.last_delivery(full, event="push", since=started)
    except GiteaError as exc:
        return Result(label, False, f"Gitea refused the test: {exc}.", "")
    finally:
        if added:
            with suppress(GiteaError):
                ctx.gitea.edit_hook(owner, name, hook_id, {"events": events, **keep})
    if arrived is None:
        return Result(
            label,
            False,
            f"Gitea's test delivery to {hooks.hook_url(hook)} did not arrive within "
            f"{ctx.deliver_seconds:g} s.",
            "see the hook's Recent Deliveries in Gitea: \"webhook can only call allowed HTTP "
            "servers\" means [webhook] ALLOWED_HOST_LIST must allow kugetsu's host "
            "(docs/gitea-setup.md); a 401 answer means the secrets differ (kugetsu webhook "
            "install sets it again); no answer means Gitea cannot reach the URL, or kugetsu "
            "serve is not running",
        )
    return Result(
        label, True, f"Gitea's test delivery arrived after {max(0.0, arrived - started):.1f} s"
    )


def check_agents(ctx: Context) -> list[Result]:
    config = ctx.config.agents
    names = list(dict.fromkeys([config.default, *config.fallback, *sorted(config.tables)]))
    return [_check_agent(ctx, name, default=name == config.default) for name in names]


def _check_agent(ctx: Context, name: str, *, default: bool) -> Result:
    label = f"agent {name}"
    role = "the default agent" if default else "an agent"
    try:
        spec = agents.resolve(ctx.config.agents, name)
    except agents.UnknownAgent as exc:
        return Result(label, False, f"{exc}.", f"fix [agents.{name}]", blocks=default)
    argv0, path = spec.command[0], agents.agent_path(spec, ctx.environ)
    found = agents.find_program(spec, ctx.environ)
    if found is None:
        where = (
            f"{argv0} is not an executable file"
            if "/" in argv0
            else (f"{argv0} is not on PATH ({path})")
        )
        install = _install_hint(spec)
        return Result(
            label,
            False,
            f"{role} cannot start: {where}.",
            f"{install}or set agents.{name}.command to where it is",
            blocks=default,
        )
    parts = [found]
    if spec.preset is None:
        parts.append("a custom command: its version is not asked")
    elif not ctx.quick:
        version = _version(ctx, spec, found)
        if version.startswith("!"):
            return Result(
                label,
                False,
                f"{found} --version failed: {version[1:]}.",
                "run it by hand as the user kugetsu runs as, and reinstall it if it fails",
                blocks=default,
            )
        parts.append(version)
    missing = [v for v in spec.pass_env if not ctx.environ.get(v)]
    table = ctx.config.agents.tables.get(name)
    if table is not None and table.pass_env is not None and missing:
        return Result(
            label,
            False,
            f"{', '.join(parts)}; agents.{name}.pass_env names variables that are not set: "
            f"{', '.join(missing)}.",
            "set them in kugetsu's environment, or take them out of pass_env",
        )
    if spec.pass_env and len(missing) == len(spec.pass_env):
        parts.append(
            "none of the variables it passes on is set "
            f"({', '.join(spec.pass_env[:4])}{', ...' if len(spec.pass_env) > 4 else ''}): "
            "fine if its config holds the key"
        )
    elif spec.pass_env:
        parts.append("passes " + ", ".join(v for v in spec.pass_env if v not in missing))
    return Result(label, True, "; ".join(parts))


def _install_hint(spec: agents.AgentSpec) -> str:
    return {
        "opencode": "install it (npm install -g opencode-ai) ",
        "claude": "install it (npm install -g @anthropic-ai/claude-code) ",
        "codex": "install it (npm install -g @openai/codex) ",
        "aider": "install it (pip install aider-chat, README) ",
    }.get(spec.preset or "", "install it ")


def _version(ctx: Context, spec: agents.AgentSpec, binary: str) -> str:
    """Its `--version` output's first line, or "!" and why it failed. Run as a task runs it
    (the environment `build_env` gives it: the preset's variables that keep it from phoning
    home included), in an empty home of its own."""
    with tempfile.TemporaryDirectory(prefix="kugetsu-doctor-") as home:
        env = agents.build_env(
            spec,
            home_env={"HOME": home},
            task_vars={},
            environ=ctx.environ,
            secrets=ctx.config.secrets(),
        )
        try:
            done = subprocess.run(
                [binary, "--version"],
                env=env,
                cwd=home,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=VERSION_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"!it did not answer within {VERSION_SECONDS:g} s"
        except OSError as exc:
            return f"!{exc.strerror or exc}"
    text = (done.stdout or done.stderr).decode("utf-8", "replace").strip()
    first = text.splitlines()[0][:120] if text else ""
    if done.returncode != 0:
        return f"!exit code {done.returncode}" + (f": {first}" if first else "")
    return f"version {first or '(empty)'}"


def check_sandbox(ctx: Context) -> list[Result]:
    """The sandbox (bot/sandbox.py): on in a running `serve` (its launcher answers), or
    whether it can be had as this process runs; and a config file others can read."""
    config, found = ctx.config, []
    sb = config.sandbox
    readable = sandbox.readable_secret_file(config)
    if readable:
        found.append(
            Result(
                "config file",
                False,
                f"{readable} holds the Gitea token and other users can read it.",
                fix="chmod 600 it (640 with kugetsu's group)",
            )
        )
    slots = sandbox.slot_uids(config)
    uids = f"uids {slots[0]}-{slots[-1]}" if len(slots) > 1 else f"uid {slots[0]}"
    if sb.mode == "none":
        if ctx.serving and os.geteuid() == 0:
            result = Result(
                "sandbox",
                False,
                "off while kugetsu runs as root: agents run as root, can read its token and "
                "signal it.",
                fix='set sandbox.mode = "user"',
            )
        else:
            result = Result(
                "sandbox",
                True,
                'off (sandbox.mode = "none"): agents run as kugetsu\'s own user and can read '
                "what it can, its token included (README, What an agent can and cannot do)",
            )
        return [result, *found]
    launcher = ctx.launcher or sandbox.running_launcher(config.storage.data_dir)
    if launcher is not None:
        try:
            answer = sandbox.LauncherClient(launcher).call({"op": "ping"})
        except sandbox.SandboxError as exc:
            result = Result(
                "sandbox launcher",
                False,
                f"{exc}.",
                fix="start kugetsu serve again; it starts a new launcher",
            )
        else:
            seen = (
                "each sees only its own processes"
                if answer.get("private_pids")
                else "each can list every process (no PID namespace can be had here)"
            )
            result = Result(
                "sandbox",
                True,
                f"on: agents run as {uids}, through the launcher at {launcher}; {seen}",
            )
        return [result, *found]
    state = sandbox.state(config)
    who = f"as uid {os.geteuid()} runs it"
    if state.active:
        result = Result(
            "sandbox",
            True,
            f"can be had {who}: agents would run as {uids}, kugetsu as {sb.user}",
        )
    else:
        result = Result(
            "sandbox",
            False,
            f"sandbox.mode = {sb.mode!r} cannot be had {who}: " + "; ".join(state.missing) + ".",
            fix="start kugetsu serve as root, or see README, Agents in a sandbox",
            blocks=sb.mode == "user",
        )
    return [result, *found]


#: every check, in the order it runs
CHECKS: tuple[Check, ...] = (
    Check(
        "config", "the config: where it was read from, the webhook secret, public_url", check_config
    ),
    Check(
        "data_dir",
        "storage.data_dir: writable, with storage.min_free_mb free",
        check_data_dir,
    ),
    Check(
        "database",
        "the database (SQLite in data_dir, or storage.database_url): reachable, its schema, "
        "and each worker's heartbeat",
        check_database,
    ),
    Check("gitea", "gitea.url reachable, and Gitea's version", check_gitea, readiness=True),
    Check(
        "token", "the token: valid, its user and the scopes it shows", check_token, readiness=True
    ),
    Check(
        "repositories",
        "each repository served (tasks, deliveries, gitea.repos): the bot's permission, the "
        "webhook (URL, content type, events, active) and, with --deliver-test, a test delivery",
        check_repositories,
    ),
    Check(
        "agents",
        "each configured agent: found, its --version runs, its pass_env set",
        check_agents,
        readiness=True,
    ),
    Check(
        "sandbox",
        "the sandbox: its mode, the slot uids free, the launcher answering, and a config "
        "file holding the token that others can read",
        check_sandbox,
    ),
)


def run(ctx: Context, names: Iterable[str] | None = None) -> list[Result]:
    """The results of the checks (all, or those named), in registry order. A check that
    raises becomes a failed result naming the error, and the others still run."""
    wanted = None if names is None else set(names)
    results: list[Result] = []
    for check in CHECKS:
        if wanted is not None and check.name not in wanted:
            continue
        try:
            results += check.run(ctx)
        except Exception as exc:  # one broken check must not hide the others
            log.exception("doctor check failed", extra={"check": check.name})
            results.append(Result(check.name, False, f"the check itself failed: {describe(exc)}"))
    return results


def open_database(config: Config, problems: list[str] | None = None) -> Store | None:
    """The database if there is one (doctor never creates a SQLite file, nor migrates a
    PostgreSQL database), else None; why it could not be opened is added to `problems`,
    without credentials."""
    url = config.storage.database_url
    if not url and not config.storage.db_path.is_file():
        return None
    try:
        return open_store(url, migrate=False) if url else open_store(config.storage.db_path)
    except (SchemaTooNew, OSError) as exc:
        reason = str(exc)
    except Exception as exc:  # a database that cannot be read is the data dir's problem
        reason = describe(exc)
    reason = " ".join(redact(reason, config.secrets()).split())
    log.warning("database not read", extra={"error": reason})
    if problems is not None:
        problems.append(reason)
    return None


# ------------------------------------------------------------------------ kugetsu serve


class ServeChecks:
    """The checks `kugetsu serve` runs in its worker: all of them once at start, each
    problem logged as an error; then the `readiness` ones, quickly, every
    SERVE_RECHECK_SECONDS, so a Gitea that goes away after a good start is noticed (and
    logged when it goes and when it is back). What keeps kugetsu from working is written
    to the database (`Store.set_readiness`) for /healthz and /readyz."""

    def __init__(
        self,
        config: Config,
        store: Store,
        worker_id: str,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        launcher: Path | None = None,
    ):
        self.config, self.store, self.worker_id, self.clock = config, store, worker_id, clock
        self.launcher = launcher
        self.environ = dict(os.environ if environ is None else environ)
        self._first = True
        self._blocking: dict[str, Result] = {}

    def __call__(self) -> Readiness:
        ctx = Context(
            self.config,
            self.environ,
            store=self.store,
            clock=self.clock,
            serving=True,
            launcher=self.launcher,
        )
        if self._first:
            results = run(ctx)
        else:
            ctx.quick = True
            results = run(ctx, [c.name for c in CHECKS if c.readiness])
        blocking = {r.name: r for r in results if not r.ok and r.blocks}
        if self._first:
            self._first = False
            for r in results:
                if not r.ok:
                    log.error(
                        "setup problem",
                        extra={"check": r.name, "problem": r.detail, "fix": r.fix},
                    )
        else:
            for key, r in blocking.items():
                if key not in self._blocking:
                    log.error("setup problem", extra={"check": key, "problem": r.detail})
            for key in self._blocking.keys() - blocking.keys():
                log.info("setup problem gone", extra={"check": key})
        self._blocking = blocking
        readiness = Readiness(self.clock(), tuple(r.line() for r in blocking.values()))
        self.store.set_readiness(self.worker_id, readiness.to_json())
        return readiness


def report(results: Sequence[Result]) -> str:
    """The human form: one line per result, each problem followed by its fix."""
    lines = []
    for r in results:
        lines.append(f"{'ok  ' if r.ok else 'FAIL'} {r.name}: {r.detail}")
        if not r.ok and r.fix:
            lines.append(f"     fix: {r.fix}")
    failed = sum(1 for r in results if not r.ok)
    lines.append(
        "all checks passed" if not failed else f"{failed} problem{'s' if failed > 1 else ''}"
    )
    return "\n".join(lines)


__all__ = ["CHECKS", "Check", "Context", "Result", "ServeChecks", "report", "run"]
