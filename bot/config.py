"""Configuration: the only reader of TOML files and of the environment.

`load(path, environ)` returns a frozen `Config`. Everything else receives the
parts it needs as arguments; no module reads `os.environ` at import time.
A bad value raises `ConfigError` whose message names the key and the problem,
so `kugetsu` can stop with one clear line.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from bot.agents.presets import PLACEHOLDERS, PRESETS
from bot.core import commands, names
from bot.core.notify import Format, NotifyEvent
from bot.core.permissions import PERMISSIONS
from bot.core.tasks import RetryPolicy
from bot.logs import FORMATS, LEVELS

DEFAULT_CONFIG_PATHS = ("kugetsu.toml", "/etc/kugetsu/config.toml")


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    max_body_bytes: int = 5 * 1024 * 1024


@dataclass(frozen=True)
class GiteaConfig:
    url: str = "http://localhost:3000"
    token: str = field(default="", repr=False)
    webhook_secret: str = field(default="", repr=False)
    insecure_no_signature: bool = False
    bot_login: str = ""
    timeout_seconds: float = 10.0
    retries: int = 3
    #: repositories kugetsu serves besides those the database knows (tasks, deliveries):
    #: `kugetsu doctor` checks them, `kugetsu webhook install` without arguments uses them
    repos: tuple[str, ...] = ()

    @property
    def api_url(self) -> str:
        return self.url.rstrip("/") + "/api/v1"

    def git_url(self, full_name: str) -> str:
        return f"{self.url.rstrip('/')}/{full_name}.git"


LOG_SUFFIX = ".log"
PROMPT_SUFFIX = ".md"


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path = Path("kugetsu-data")
    #: /healthz reports the disk when less than this is free in data_dir
    min_free_mb: int = 200
    #: a PostgreSQL URL: the queue lives there, shared by every machine that names it;
    #: empty: SQLite in data_dir (one machine)
    database_url: str = field(default="", repr=False)

    @property
    def database(self) -> str | Path:
        """Where the store is: the PostgreSQL URL, or the SQLite file in data_dir."""
        return self.database_url or self.db_path

    @property
    def db_path(self) -> Path:
        return self.data_dir / "kugetsu.db"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def mirrors_dir(self) -> Path:
        return self.data_dir / "mirrors"

    @property
    def worktrees_dir(self) -> Path:
        return self.data_dir / "worktrees"

    @property
    def homes_dir(self) -> Path:
        return self.data_dir / "homes"

    @property
    def prompts_dir(self) -> Path:
        return self.data_dir / "prompts"

    def log_path(self, task_id: int) -> Path:
        """A task's agent log: written by the runner, served by the receiver's log link,
        shown by `kugetsu logs`, its tail quoted in a failed task's comment."""
        return self.logs_dir / f"{task_id}{LOG_SUFFIX}"

    def prompt_path(self, task_id: int) -> Path:
        """The prompt a task's agent was given (for `{prompt_file}`)."""
        return self.prompts_dir / f"{task_id}{PROMPT_SUFFIX}"

    def agent_home(self, owner: str, name: str, issue: int) -> Path:
        """An issue's agent home (HOME, XDG dirs, the CLI's sessions): every run on the
        issue gets the same one, so a follow-up resumes its session."""
        return self.homes_dir / owner / name / str(issue)

    def launcher_socket(self, pid: int | None = None) -> Path:
        """Where the sandbox's launcher (bot/launcher.py) of the `serve` process `pid`
        listens, for kugetsu's uid only; without a pid, that of workers built in-process."""
        return self.data_dir / (f"launcher-{pid}.sock" if pid else "launcher.sock")

    @property
    def task_files(self) -> tuple[tuple[Path, str], ...]:
        """(folder, suffix) of the files kept per task, named `<task id><suffix>`."""
        return ((self.logs_dir, LOG_SUFFIX), (self.prompts_dir, PROMPT_SUFFIX))


@dataclass(frozen=True)
class QueueConfig:
    poll_interval_seconds: float = 30.0
    max_concurrent_agents: int = 3
    max_attempts: int = 3
    retry_backoff_seconds: tuple[float, ...] = (30.0, 120.0, 600.0)
    cleanup_age_days: float = 7.0
    authorization_cache_seconds: float = 300.0

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.retry_backoff_seconds)


@dataclass(frozen=True)
class TriggersConfig:
    label: str = "kugetsu"
    command: str = "/kugetsu"
    min_permission: str = "write"
    allowed_users: tuple[str, ...] = ()
    #: at most this many replies to one user on one issue within the window; more
    #: commands are answered with a reaction alone
    reply_limit: int = 5
    reply_window_seconds: float = 600.0
    #: any "request changes" review on a pull request kugetsu opened, by someone who may
    #: ask for work, asks for a follow-up (without it, only a review holding a command)
    review_changes: bool = False


@dataclass(frozen=True)
class AgentConfig:
    """One `[agents.NAME]` table, as written. Presets fill what it leaves out."""

    name: str
    preset: str | None = None
    command: tuple[str, ...] | None = None
    resume_command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    pass_env: tuple[str, ...] | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    #: files copied into the agent's per-issue home: {"relative/path": "/source/file"}
    home_files: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentsConfig:
    default: str = "opencode"
    timeout_minutes: float = 60.0
    fallback: tuple[str, ...] = ()
    kill_grace_seconds: float = 10.0
    log_max_bytes: int = 5 * 1024 * 1024
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    #: niceness added to the worker process and all it starts (agents, git)
    nice: int = 10
    tables: Mapping[str, AgentConfig] = field(default_factory=dict)

    @property
    def timeout_seconds(self) -> float:
        return self.timeout_minutes * 60.0


@dataclass(frozen=True)
class WorkerConfig:
    """This process's worker: how many agents it runs, how it holds its tasks."""

    #: agents this worker runs at most; None: queue.max_concurrent_agents (the global
    #: limit, which holds across all workers whatever their capacities add up to)
    capacity: int | None = None
    #: a running task's lease runs out this long after its worker last renewed it; then
    #: any worker may put the task back in the queue
    lease_seconds: float = 60.0
    #: the name of this machine as other workers see it (the PID check of a dead worker
    #: applies only between workers of one host); empty: the host name
    host: str = ""


@dataclass(frozen=True)
class GitConfig:
    branch_template: str = "kugetsu/issue-{number}"
    author_name: str = "kugetsu"
    author_email: str = "kugetsu@localhost"


#: sandbox.mode: "none" runs agents as kugetsu's own user; "user" runs each concurrency
#: slot's agent as a uid of its own (bot/sandbox.py) and stops `serve` when that cannot be
#: had; "auto" is "user" where it can be had and "none", with a warning, where not
SANDBOX_MODES = ("none", "user", "auto")


@dataclass(frozen=True)
class SandboxConfig:
    mode: str = "none"
    #: the unprivileged user kugetsu runs as once started as root (a name or a uid)
    user: str = "kugetsu"
    #: slot k's agents run as uid and gid first_uid + k
    first_uid: int = 20000
    #: per slot: processes of its uid (RLIMIT_NPROC), and per process: memory
    #: (RLIMIT_AS) and the largest file it may write (RLIMIT_FSIZE); None is no limit
    max_processes: int | None = None
    max_memory_mb: int | None = None
    max_file_size_mb: int | None = None


# --------------------------------------------------------------------------- metrics, notify


@dataclass(frozen=True)
class MetricsConfig:
    """`[metrics]`: GET /metrics in the Prometheus text format."""

    enabled: bool = False
    #: with a token, /metrics answers 401 without `Authorization: Bearer <token>`
    token: str = field(default="", repr=False)
    #: label the task counts (and tokens, cost) by repository too: one series per repository
    repo_label: bool = False


@dataclass(frozen=True)
class NotifyConfig:
    """One `[[notify]]` entry: an endpoint that is told of tasks' changes."""

    url: str = field(repr=False)
    format: Format = Format.JSON
    events: frozenset[NotifyEvent] = frozenset(NotifyEvent)
    secret: str = field(default="", repr=False)
    #: an event the endpoint has not accepted within this long is dropped (and logged)
    retry_hours: float = 24.0
    timeout_seconds: float = 5.0
    #: how logs and errors name the endpoint (its URL may hold a secret): notify[N] otherwise
    name: str = ""

    @property
    def id(self) -> str:
        """What the endpoint's outbox rows are stored under: the same while its URL and format
        stay the same, whatever else changes in the file."""
        return hashlib.sha256(f"{self.format}\n{self.url}".encode()).hexdigest()[:16]

    @property
    def retry_seconds(self) -> float:
        return self.retry_hours * 3600.0

    @property
    def shown(self) -> str:
        """The endpoint as logs and errors name it: never its URL."""
        return self.name or f"endpoint {self.id[:8]}"


@dataclass(frozen=True)
class ReconcileConfig:
    """`[reconcile]`: looking on Gitea for what deliveries missed (Gitea never retries one)."""

    #: minutes between passes over the repositories kugetsu serves; 0: no passes at all
    interval_minutes: float = 10.0
    #: repositories polled besides those kugetsu has tasks in or deliveries from
    repos: tuple[str, ...] = ()

    @property
    def interval_seconds(self) -> float:
        return self.interval_minutes * 60.0


@dataclass(frozen=True)
class DashboardConfig:
    """`[dashboard]`: the web pages people sign in to with their Gitea account."""

    enabled: bool = False
    #: the OAuth2 application kugetsu is registered as in Gitea (docs/gitea-setup.md)
    oauth_client_id: str = ""
    oauth_client_secret: str = field(default="", repr=False)
    #: Gitea as browsers reach it (its ROOT_URL), when gitea.url is an internal address
    gitea_public_url: str = ""
    #: a sign-in lasts this long
    session_hours: float = 8.0
    #: what Gitea said a user may read is kept this long before it is asked again
    access_cache_seconds: float = 60.0
    #: live log views at most at once; each holds one of the receiver's threads
    max_log_streams: int = 50


@dataclass(frozen=True)
class LoggingConfig:
    #: "text" (one line of text a record) or "json" (one JSON object a line)
    format: str = "text"
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    gitea: GiteaConfig = field(default_factory=GiteaConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    triggers: TriggersConfig = field(default_factory=TriggersConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    git: GitConfig = field(default_factory=GitConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    notify: tuple[NotifyConfig, ...] = ()
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "(built-in defaults)"
    #: the file named by `source` holds the token or the webhook secret (not only the
    #: environment): kugetsu warns when others can read it
    source_holds_secret: bool = False

    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a log line, comment, body or URL."""
        extra = [self.metrics.token, *(n.secret for n in self.notify), _url_password(self)]
        extra.append(self.dashboard.oauth_client_secret)
        return tuple(s for s in (self.gitea.token, self.gitea.webhook_secret, *extra) if s)

    def notify_routes(self) -> tuple[tuple[str, frozenset[str]], ...]:
        """(endpoint id, the events it wants) of each `[[notify]]` entry, for the store."""
        return tuple((n.id, frozenset(str(e) for e in n.events)) for n in self.notify)

    @property
    def capacity(self) -> int:
        """Agents this process's worker may run: `[worker] capacity`, by default the
        global limit."""
        return self.worker.capacity or self.queue.max_concurrent_agents


def _url_password(config: Config) -> str:
    """The password in the database URL, if it carries one (a secret like the token)."""
    from urllib.parse import unquote, urlsplit

    url = config.storage.database_url
    if not url:
        return ""
    try:
        return unquote(urlsplit(url).password or "")
    except ValueError:
        return ""


# --------------------------------------------------------------------------- reading


class _Section:
    """Typed access to one TOML table that remembers which keys were read."""

    def __init__(self, name: str, data: Any):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"[{name}] must be a table")
        self.name = name
        self.data = data
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        return self.data.get(key, default)

    def string(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._key(key)} must be a string, got {type(value).__name__}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)} must be true or false, got {value!r}")
        return value

    @overload
    def integer(
        self, key: str, default: int, minimum: int | None = None, maximum: int | None = None
    ) -> int: ...
    @overload
    def integer(
        self, key: str, default: None, minimum: int | None = None, maximum: int | None = None
    ) -> int | None: ...
    def integer(
        self, key: str, default: int | None, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        value = self._get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._key(key)} must be a whole number, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._key(key)} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self._key(key)} must be at most {maximum}, got {value}")
        return value

    @overload
    def number(
        self, key: str, default: float, minimum: float | None = None, positive: bool = False
    ) -> float: ...
    @overload
    def number(
        self, key: str, default: None, minimum: float | None = None, positive: bool = False
    ) -> float | None: ...
    def number(
        self, key: str, default: float | None, minimum: float | None = None, positive: bool = False
    ) -> float | None:
        value = self._get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self._key(key)} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{self._key(key)} must be a finite number, got {value}")
        if positive and value <= 0:
            raise ConfigError(f"{self._key(key)} must be greater than 0, got {value}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._key(key)} must be at least {minimum}, got {value}")
        return float(value)

    def strings(self, key: str, default: tuple[str, ...] | None) -> tuple[str, ...] | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self._key(key)} must be a list of strings, got {value!r}")
        return tuple(value)

    def table(self, key: str) -> dict[str, str]:
        value = self._get(key, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{self._key(key)} must be a table of strings")
        return dict(value)

    def check_unknown(self, allowed_extra: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(self.data) - self.used - set(allowed_extra))
        if unknown:
            raise ConfigError(f"[{self.name}] has an unknown key: {unknown[0]}")


_SECTIONS = (
    "server",
    "gitea",
    "storage",
    "queue",
    "triggers",
    "agents",
    "git",
    "metrics",
    "notify",
    "worker",
    "reconcile",
    "dashboard",
    "logging",
    "sandbox",
)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _override(env: Mapping[str, str], name: str, file_value: str) -> str:
    """An environment variable wins over the file (the file's value is still validated)."""
    return env.get(name) or file_value


_PLACEHOLDER_NAME_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _agent_table(name: str, data: Any) -> AgentConfig:
    sec = _Section(f"agents.{name}", data)
    cfg = AgentConfig(
        name=name,
        preset=sec.string("preset", "") or None,
        command=sec.strings("command", None),
        resume_command=sec.strings("resume_command", None),
        env=sec.table("env"),
        pass_env=sec.strings("pass_env", None),
        max_tokens=sec.integer("max_tokens", None, minimum=1),
        max_cost_usd=sec.number("max_cost_usd", None, positive=True),
        home_files=sec.table("home_files"),
    )
    sec.check_unknown()
    for rel in cfg.home_files:
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ConfigError(
                f"agents.{name}.home_files: {rel!r} must be a relative path inside the home"
            )
    if cfg.command is not None and not cfg.command:
        raise ConfigError(f"agents.{name}.command must not be empty")
    if cfg.resume_command is not None and not cfg.resume_command:
        raise ConfigError(
            f"agents.{name}.resume_command must not be empty; leave it out if the "
            "agent cannot resume a session"
        )
    for key in ("command", "resume_command"):
        for arg in getattr(cfg, key) or ():
            for placeholder in _PLACEHOLDER_NAME_RE.findall(arg):
                if placeholder not in PLACEHOLDERS:
                    raise ConfigError(
                        f"agents.{name}.{key}: unknown placeholder {{{placeholder}}}; use "
                        + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                    )
    return cfg


def _repos(section: _Section) -> tuple[str, ...]:
    """`repos` of a section (`gitea.repos`, `reconcile.repos`): OWNER/NAME each, as Gitea
    names repositories, without repeats."""
    repos = section.strings("repos", ()) or ()
    for repo in repos:
        error = names.repo_error(repo)
        if error:
            raise ConfigError(
                f"{section.name}.repos: {names.shown(repo)} is not OWNER/NAME: {error}"
            )
    return tuple(dict.fromkeys(repos))


def load(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_secret: bool = True,
) -> Config:
    """Read the config file (if any), apply env overrides, validate, freeze.

    `require_secret=False` is for commands that never receive webhooks (queue, logs).
    """
    env = dict(os.environ if environ is None else environ)
    if path is None and env.get("KUGETSU_CONFIG"):
        path = env["KUGETSU_CONFIG"]
    source = "(built-in defaults)"
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
        source = str(path)
    else:
        for candidate in DEFAULT_CONFIG_PATHS:
            if Path(candidate).is_file():
                data = _read_toml(Path(candidate))
                source = candidate
                break

    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]")

    # server
    s = _Section("server", data.get("server"))
    server = ServerConfig(
        host=s.string("host", ServerConfig.host),
        port=s.integer("port", ServerConfig.port, minimum=0, maximum=65535),
        public_url=s.string("public_url", ServerConfig.public_url).rstrip("/"),
        max_body_bytes=s.integer("max_body_bytes", ServerConfig.max_body_bytes, minimum=1024),
    )
    s.check_unknown()

    # gitea
    g = _Section("gitea", data.get("gitea"))
    gitea = GiteaConfig(
        url=_override(env, "KUGETSU_GITEA_URL", g.string("url", GiteaConfig.url)),
        token=_override(env, "KUGETSU_GITEA_TOKEN", g.string("token", GiteaConfig.token)),
        webhook_secret=_override(
            env, "KUGETSU_WEBHOOK_SECRET", g.string("webhook_secret", GiteaConfig.webhook_secret)
        ),
        insecure_no_signature=g.boolean("insecure_no_signature", GiteaConfig.insecure_no_signature),
        bot_login=g.string("bot_login", GiteaConfig.bot_login),
        timeout_seconds=g.number("timeout_seconds", GiteaConfig.timeout_seconds, positive=True),
        retries=g.integer("retries", GiteaConfig.retries, minimum=0),
        repos=_repos(g),
    )
    g.check_unknown()
    if not gitea.url.startswith(("http://", "https://")):
        raise ConfigError(f"gitea.url must start with http:// or https://, got {gitea.url!r}")
    if "@" in gitea.url.split("//", 1)[1].split("/", 1)[0]:
        raise ConfigError("gitea.url must not carry credentials; put the token in gitea.token")
    gitea = GiteaConfig(**{**gitea.__dict__, "url": gitea.url.rstrip("/")})
    if require_secret and not gitea.webhook_secret and not gitea.insecure_no_signature:
        raise ConfigError(
            "gitea.webhook_secret is not set (or KUGETSU_WEBHOOK_SECRET); "
            "set one, or set gitea.insecure_no_signature = true to accept unsigned deliveries"
        )

    # storage
    st = _Section("storage", data.get("storage"))
    data_dir = _override(
        env, "KUGETSU_DATA_DIR", st.string("data_dir", str(StorageConfig.data_dir))
    )
    min_free_mb = st.integer("min_free_mb", StorageConfig.min_free_mb, minimum=0)
    database_url = _override(
        env, "KUGETSU_DATABASE_URL", st.string("database_url", StorageConfig.database_url)
    )
    st.check_unknown()
    if database_url and not database_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            "storage.database_url must be a PostgreSQL URL (postgresql://user@host/db), "
            "or empty for SQLite in data_dir"
        )
    storage = StorageConfig(
        data_dir=Path(data_dir).expanduser().absolute(),
        min_free_mb=min_free_mb,
        database_url=database_url,
    )

    # queue
    q = _Section("queue", data.get("queue"))
    backoff = q._get("retry_backoff_seconds", list(QueueConfig.retry_backoff_seconds))
    if (
        not isinstance(backoff, list)
        or not backoff
        or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b >= 0
            for b in backoff
        )
    ):
        raise ConfigError(
            "queue.retry_backoff_seconds must be a non-empty list of finite numbers >= 0, "
            f"got {backoff!r}"
        )
    queue = QueueConfig(
        poll_interval_seconds=q.number(
            "poll_interval_seconds", QueueConfig.poll_interval_seconds, positive=True
        ),
        max_concurrent_agents=q.integer(
            "max_concurrent_agents", QueueConfig.max_concurrent_agents, minimum=1
        ),
        max_attempts=q.integer("max_attempts", QueueConfig.max_attempts, minimum=1),
        retry_backoff_seconds=tuple(float(b) for b in backoff),
        cleanup_age_days=q.number("cleanup_age_days", QueueConfig.cleanup_age_days, minimum=0),
        authorization_cache_seconds=q.number(
            "authorization_cache_seconds", QueueConfig.authorization_cache_seconds, minimum=0
        ),
    )
    q.check_unknown()

    # triggers
    t = _Section("triggers", data.get("triggers"))
    triggers = TriggersConfig(
        label=t.string("label", TriggersConfig.label),
        command=t.string("command", TriggersConfig.command),
        min_permission=t.string("min_permission", TriggersConfig.min_permission),
        allowed_users=t.strings("allowed_users", TriggersConfig.allowed_users) or (),
        reply_limit=t.integer("reply_limit", TriggersConfig.reply_limit, minimum=0),
        reply_window_seconds=t.number(
            "reply_window_seconds", TriggersConfig.reply_window_seconds, positive=True
        ),
        review_changes=t.boolean("review_changes", TriggersConfig.review_changes),
    )
    t.check_unknown()
    if not triggers.label.strip():
        raise ConfigError("triggers.label must not be empty")
    if not triggers.command.strip() or any(c.isspace() for c in triggers.command):
        raise ConfigError(f"triggers.command must be one word, got {triggers.command!r}")
    if triggers.min_permission not in PERMISSIONS[1:]:
        raise ConfigError(
            f"triggers.min_permission must be one of read, write, admin, owner; "
            f"got {triggers.min_permission!r}"
        )

    # agents
    a = _Section("agents", data.get("agents"))
    tables = {}
    for key, value in a.data.items():
        if isinstance(value, dict):
            a.used.add(key)
            tables[key] = _agent_table(key, value)
    agents = AgentsConfig(
        default=a.string("default", AgentsConfig.default),
        timeout_minutes=a.number("timeout_minutes", AgentsConfig.timeout_minutes, positive=True),
        fallback=a.strings("fallback", AgentsConfig.fallback) or (),
        kill_grace_seconds=a.number(
            "kill_grace_seconds", AgentsConfig.kill_grace_seconds, minimum=0
        ),
        log_max_bytes=a.integer("log_max_bytes", AgentsConfig.log_max_bytes, minimum=4096),
        max_tokens=a.integer("max_tokens", None, minimum=1),
        max_cost_usd=a.number("max_cost_usd", None, positive=True),
        nice=a.integer("nice", AgentsConfig.nice, minimum=0, maximum=19),
        tables=tables,
    )
    a.check_unknown()

    # git
    gi = _Section("git", data.get("git"))
    git = GitConfig(
        branch_template=gi.string("branch_template", GitConfig.branch_template),
        author_name=gi.string("author_name", GitConfig.author_name),
        author_email=gi.string("author_email", GitConfig.author_email),
    )
    gi.check_unknown()
    error = _branch_template_error(git.branch_template)
    if error:
        raise ConfigError(f"git.branch_template {error}")

    # worker
    w = _Section("worker", data.get("worker"))
    worker = WorkerConfig(
        capacity=w.integer("capacity", WorkerConfig.capacity, minimum=1),
        lease_seconds=w.number("lease_seconds", WorkerConfig.lease_seconds, minimum=1),
        host=w.string("host", WorkerConfig.host),
    )
    w.check_unknown()
    # logging
    lg = _Section("logging", data.get("logging"))
    logging_config = LoggingConfig(
        format=lg.string("format", LoggingConfig.format),
        level=_override(env, "KUGETSU_LOG_LEVEL", lg.string("level", LoggingConfig.level)).upper(),
    )
    lg.check_unknown()
    if logging_config.format not in FORMATS:
        raise ConfigError(
            f"logging.format must be one of {', '.join(FORMATS)}, got {logging_config.format!r}"
        )
    if logging_config.level not in LEVELS:
        raise ConfigError(
            f"logging.level must be one of {', '.join(LEVELS)}, got {logging_config.level!r}"
        )

    dashboard = _dashboard(data.get("dashboard"), env, server, gitea)

    config = Config(
        server=server,
        gitea=gitea,
        storage=storage,
        queue=queue,
        triggers=triggers,
        agents=agents,
        git=git,
        sandbox=_sandbox(data.get("sandbox"), env, queue.max_concurrent_agents),
        metrics=_metrics_section(data.get("metrics"), env),
        notify=_notify_entries(data.get("notify")),
        worker=worker,
        reconcile=_reconcile(data.get("reconcile")),
        dashboard=dashboard,
        logging=logging_config,
        source=source,
        source_holds_secret=bool(g.data.get("token") or g.data.get("webhook_secret")),
    )
    _check_agents(config)
    return config


#: the highest uid a slot may get: uids are 32-bit, and (uid_t) -1 means "unchanged"
MAX_SLOT_UID = 2**31 - 1


def _sandbox(data: Any, env: Mapping[str, str], slots: int) -> SandboxConfig:
    """The [sandbox] section; KUGETSU_SANDBOX overrides its mode."""
    sb = _Section("sandbox", data)
    default = SandboxConfig()
    mode = _override(env, "KUGETSU_SANDBOX", sb.string("mode", default.mode))
    cfg = SandboxConfig(
        mode=mode,
        user=sb.string("user", default.user),
        first_uid=sb.integer("first_uid", default.first_uid, minimum=1),
        max_processes=sb.integer("max_processes", None, minimum=1),
        max_memory_mb=sb.integer("max_memory_mb", None, minimum=1),
        max_file_size_mb=sb.integer("max_file_size_mb", None, minimum=1),
    )
    sb.check_unknown()
    if cfg.mode not in SANDBOX_MODES:
        raise ConfigError(
            f"sandbox.mode must be one of {', '.join(SANDBOX_MODES)}, got {cfg.mode!r}"
        )
    if not cfg.user.strip():
        raise ConfigError("sandbox.user must not be empty")
    if cfg.first_uid + slots - 1 > MAX_SLOT_UID:
        raise ConfigError(
            f"sandbox.first_uid + queue.max_concurrent_agents - 1 must be at most "
            f"{MAX_SLOT_UID}, got {cfg.first_uid + slots - 1}"
        )
    return cfg


def _branch_template_error(template: str) -> str | None:
    """Why a branch template cannot be used (the words after its key's name), or None."""
    try:
        branch = template.format(number=1, owner="o", repo="r")
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        return f"may use only {{number}}, {{owner}} and {{repo}}: {exc}"
    if not branch or branch.startswith(("-", "/")) or ".." in branch or " " in branch:
        return f"gives an invalid branch name: {branch!r}"
    return None


def _reconcile(data: Any) -> ReconcileConfig:
    r = _Section("reconcile", data)
    reconcile = ReconcileConfig(
        interval_minutes=r.number("interval_minutes", ReconcileConfig.interval_minutes, minimum=0),
        repos=_repos(r),
    )
    r.check_unknown()
    return reconcile


def _dashboard(
    data: Any, env: Mapping[str, str], server: ServerConfig, gitea: GiteaConfig
) -> DashboardConfig:
    d = _Section("dashboard", data)
    dashboard = DashboardConfig(
        enabled=d.boolean("enabled", DashboardConfig.enabled),
        oauth_client_id=d.string("oauth_client_id", DashboardConfig.oauth_client_id),
        oauth_client_secret=_override(
            env,
            "KUGETSU_OAUTH_CLIENT_SECRET",
            d.string("oauth_client_secret", DashboardConfig.oauth_client_secret),
        ),
        gitea_public_url=d.string("gitea_public_url", "").rstrip("/") or gitea.url,
        session_hours=d.number("session_hours", DashboardConfig.session_hours, positive=True),
        access_cache_seconds=d.number(
            "access_cache_seconds", DashboardConfig.access_cache_seconds, minimum=0
        ),
        max_log_streams=d.integer(
            "max_log_streams", DashboardConfig.max_log_streams, minimum=1, maximum=1000
        ),
    )
    d.check_unknown()
    if not dashboard.gitea_public_url.startswith(("http://", "https://")):
        raise ConfigError(
            "dashboard.gitea_public_url must start with http:// or https://, "
            f"got {dashboard.gitea_public_url!r}"
        )
    if dashboard.enabled:
        if not dashboard.oauth_client_id or not dashboard.oauth_client_secret:
            raise ConfigError(
                "dashboard.enabled needs dashboard.oauth_client_id and "
                "dashboard.oauth_client_secret (or KUGETSU_OAUTH_CLIENT_SECRET): register "
                "kugetsu as an OAuth2 application in Gitea (docs/gitea-setup.md)"
            )
        if not server.public_url.startswith(("http://", "https://")):
            raise ConfigError(
                "dashboard.enabled needs server.public_url (http:// or https://): Gitea "
                "sends people back to it after they sign in"
            )
    return dashboard


def _check_agents(config: Config) -> None:
    for name in (config.agents.default, *config.agents.fallback):
        if name not in config.agents.tables and name not in PRESETS:
            raise ConfigError(
                f"agents: {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                f"nor an [agents.{name}] table with a command"
            )
    for name, table in config.agents.tables.items():
        preset = table.preset or (name if name in PRESETS else None)
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"agents.{name}.preset: unknown preset {preset!r}")
        if preset is None and table.command is None:
            raise ConfigError(f"agents.{name}.command is required (no preset named {name!r})")


def _metrics_section(data: Any, env: Mapping[str, str]) -> MetricsConfig:
    m = _Section("metrics", data)
    metrics = MetricsConfig(
        enabled=m.boolean("enabled", MetricsConfig.enabled),
        token=_override(env, "KUGETSU_METRICS_TOKEN", m.string("token", MetricsConfig.token)),
        repo_label=m.boolean("repo_label", MetricsConfig.repo_label),
    )
    m.check_unknown()
    return metrics


def _notify_entries(data: Any) -> tuple[NotifyConfig, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError("notify must be written as [[notify]] entries (an array of tables)")
    entries = []
    for i, item in enumerate(data):
        n = _Section(f"notify[{i}]", item)
        url = n.string("url", "")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"notify[{i}].url must start with http:// or https://")
        fmt = n.string("format", str(Format.JSON))
        if fmt not in {str(f) for f in Format}:
            raise ConfigError(f"notify[{i}].format must be one of {', '.join(Format)}; got {fmt!r}")
        default_events = tuple(str(e) for e in NotifyEvent)
        events = n.strings("events", default_events) or ()
        unknown = [e for e in events if e not in default_events]
        if unknown:
            raise ConfigError(
                f"notify[{i}].events: unknown event {unknown[0]!r}; use "
                + ", ".join(default_events)
            )
        entry = NotifyConfig(
            url=url,
            format=Format(fmt),
            events=frozenset(NotifyEvent(e) for e in events),
            secret=n.string("secret", ""),
            retry_hours=n.number("retry_hours", NotifyConfig.retry_hours, positive=True),
            timeout_seconds=n.number(
                "timeout_seconds", NotifyConfig.timeout_seconds, positive=True
            ),
            name=n.string("name", "") or f"notify[{i}]",
        )
        n.check_unknown()
        entries.append(entry)
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise ConfigError("notify: two entries have the same url and format")
    return tuple(entries)


# --------------------------------------------------------------------------- a repository's own


#: where a repository may keep settings of its own, on its default branch; the first found
REPO_SETTINGS_PATHS = (".kugetsu.toml", ".gitea/.kugetsu.toml")
#: a larger file is refused unread
REPO_SETTINGS_MAX_BYTES = 16 * 1024
#: the most text `[prompt] instructions` may add to every prompt
REPO_INSTRUCTIONS_MAX_CHARS = 4000


@dataclass(frozen=True)
class RepoSettings:
    """What a repository asks for in its `.kugetsu.toml`, within the server's bounds.
    Each field left out (None, "") is the server's own setting."""

    agent: str | None = None
    instructions: str = ""
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    branch_template: str | None = None


#: the server's budget for an agent: (max_tokens, max_cost_usd), None where it sets none
Budget = tuple[int | None, float | None]


def repo_settings(
    data: bytes,
    *,
    default_agent: str,
    known_agents: frozenset[str],
    budget_of: Callable[[str], Budget],
) -> RepoSettings:
    """Read a repository's `.kugetsu.toml`, written by whoever can push to its default
    branch: hostile input. ConfigError, in one line, says the first thing wrong with it.

    It may set `[agents] default` (one of the server's agents), `max_tokens` and
    `max_cost_usd` (at or below the server's budget for that agent, where the server
    sets one), `[prompt] instructions` (at most REPO_INSTRUCTIONS_MAX_CHARS characters)
    and `[git] branch_template` (the server's rules, and it must use `{number}` so that
    no two issues share a branch). Nothing else.
    """
    if len(data) > REPO_SETTINGS_MAX_BYTES:
        raise ConfigError(f"it is larger than {REPO_SETTINGS_MAX_BYTES} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("it is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"it is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError("it is not valid TOML: nested too deeply") from None
    unknown = sorted(set(doc) - {"agents", "prompt", "git"})
    if unknown:
        raise ConfigError(f"unknown section or key {names.shown(unknown[0])}")

    a = _Section("agents", doc.get("agents"))
    agent = a.string("default", "") or None
    max_tokens = a.integer("max_tokens", None, minimum=1, maximum=commands.MAX_TOKENS)
    max_cost = a.number("max_cost_usd", None, positive=True)
    a.check_unknown()
    if max_cost is not None and max_cost > commands.MAX_COST_USD:
        raise ConfigError(f"agents.max_cost_usd must be at most {commands.MAX_COST_USD}")
    if agent is not None and agent not in known_agents:
        raise ConfigError(
            f"agents.default {names.shown(agent)} is not one of this server's agents "
            f"({', '.join(sorted(known_agents))})"
        )
    name = agent or default_agent
    server_tokens, server_cost = budget_of(name)
    if max_tokens is not None and server_tokens is not None and max_tokens > server_tokens:
        raise ConfigError(
            f"agents.max_tokens must be at most {server_tokens} (the server's budget for "
            f"{name}), got {max_tokens}"
        )
    if max_cost is not None and server_cost is not None and max_cost > server_cost:
        raise ConfigError(
            f"agents.max_cost_usd must be at most {server_cost:g} (the server's budget for "
            f"{name}), got {max_cost:g}"
        )

    pr = _Section("prompt", doc.get("prompt"))
    instructions = pr.string("instructions", "").strip()
    pr.check_unknown()
    if len(instructions) > REPO_INSTRUCTIONS_MAX_CHARS:
        raise ConfigError(
            f"prompt.instructions is longer than {REPO_INSTRUCTIONS_MAX_CHARS} characters"
        )

    g = _Section("git", doc.get("git"))
    template = g.string("branch_template", "") or None
    g.check_unknown()
    if template is not None:
        error = _branch_template_error(template)
        if error is None and "{number}" not in template:
            error = "must use {number}, so that each issue has a branch of its own"
        if error:
            raise ConfigError(f"git.branch_template {error}")
    return RepoSettings(agent, instructions, max_tokens, max_cost, template)
