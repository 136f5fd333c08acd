"""Config: defaults, env overrides, and one clear line for every bad value."""

from pathlib import Path

import pytest

from bot.config import ConfigError, load


def write(tmp_path, text):
    path = tmp_path / "kugetsu.toml"
    path.write_text(text)
    return path


ENV = {"KUGETSU_WEBHOOK_SECRET": "s3cret"}


def test_built_in_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load(None, ENV)
    assert config.queue.max_concurrent_agents == 3 and config.queue.max_attempts == 3
    assert config.queue.poll_interval_seconds == 30
    assert config.triggers.label == "kugetsu" and config.triggers.command == "/kugetsu"
    assert config.triggers.min_permission == "write"
    assert (config.triggers.reply_limit, config.triggers.reply_window_seconds) == (5, 600)
    assert config.agents.default == "opencode" and config.agents.timeout_minutes == 60
    assert config.agents.nice == 10
    assert config.git.branch_template == "kugetsu/issue-{number}"
    assert config.storage.data_dir == tmp_path / "kugetsu-data"
    assert config.gitea.api_url == "http://localhost:3000/api/v1"
    assert (config.logging.format, config.logging.level) == ("text", "INFO")


def test_env_overrides_the_file(tmp_path):
    path = write(
        tmp_path,
        '[gitea]\nurl = "http://file:3000"\ntoken = "file-token"\n'
        'webhook_secret = "file-secret"\n[storage]\ndata_dir = "/file"\n',
    )
    config = load(
        path,
        {
            "KUGETSU_GITEA_URL": "http://env:3000/",
            "KUGETSU_GITEA_TOKEN": "t",
            "KUGETSU_WEBHOOK_SECRET": "w",
            "KUGETSU_DATA_DIR": str(tmp_path / "d"),
        },
    )
    assert config.gitea.url == "http://env:3000"
    assert (config.gitea.token, config.gitea.webhook_secret) == ("t", "w")
    assert config.storage.data_dir == tmp_path / "d"
    assert config.gitea.git_url("acme/widget") == "http://env:3000/acme/widget.git"


def test_kugetsu_config_names_the_file(tmp_path):
    path = write(tmp_path, "[queue]\nmax_concurrent_agents = 5\n")
    assert load(None, {**ENV, "KUGETSU_CONFIG": str(path)}).queue.max_concurrent_agents == 5


def test_fractional_timeout_and_agent_tables(tmp_path):
    path = write(
        tmp_path,
        """
[agents]
default = "mine"
timeout_minutes = 0.5
fallback = ["claude"]
[agents.mine]
command = ["my-agent", "--prompt-file", "{prompt_file}"]
env = { MODE = "fast" }
pass_env = ["MY_KEY"]
[agents.opencode]
pass_env = ["OPENROUTER_API_KEY"]
""",
    )
    config = load(path, ENV)
    assert config.agents.timeout_seconds == 30
    assert config.agents.tables["mine"].command == ("my-agent", "--prompt-file", "{prompt_file}")
    assert config.agents.tables["mine"].env == {"MODE": "fast"}
    assert config.agents.tables["opencode"].pass_env == ("OPENROUTER_API_KEY",)


def test_missing_secret_refuses_to_start_unless_insecure(tmp_path):
    with pytest.raises(ConfigError, match="webhook_secret"):
        load(write(tmp_path, ""), {})
    assert load(write(tmp_path, "[gitea]\ninsecure_no_signature = true\n"), {})
    assert load(write(tmp_path, ""), {}, require_secret=False)


@pytest.mark.parametrize(
    "text, key",
    [
        ("[queue]\nmax_concurrent_agents = 0\n", "queue.max_concurrent_agents"),
        ('[queue]\nmax_concurrent_agents = "3"\n', "queue.max_concurrent_agents"),
        ("[queue]\npoll_interval_seconds = -1\n", "queue.poll_interval_seconds"),
        ("[queue]\nretry_backoff_seconds = []\n", "queue.retry_backoff_seconds"),
        ("[triggers]\nreply_limit = -1\n", "triggers.reply_limit"),
        ("[triggers]\nreply_window_seconds = 0\n", "triggers.reply_window_seconds"),
        ('[queue]\nretry_backoff_seconds = ["soon"]\n', "queue.retry_backoff_seconds"),
        ("[queue]\nbogus = 1\n", "bogus"),
        ("[nonsense]\n", "nonsense"),
        ('[gitea]\nurl = "gitea.local"\n', "gitea.url"),
        ('[gitea]\nurl = "http://user:pw@gitea.local"\n', "gitea.url"),
        ('[triggers]\nmin_permission = "root"\n', "triggers.min_permission"),
        ('[triggers]\ncommand = "/ku getsu"\n', "triggers.command"),
        ('[agents]\ndefault = "nobody"\n', "nobody"),
        ("[agents]\ntimeout_minutes = 0\n", "agents.timeout_minutes"),
        ("[agents]\nnice = -5\n", "agents.nice"),
        ("[agents]\nnice = 20\n", "agents.nice"),
        ("[agents]\nnice = 2.5\n", "agents.nice"),
        ('[agents.custom]\nenv = { A = "x" }\n', "agents.custom.command"),
        ("[agents.custom]\ncommand = []\n", "agents.custom.command"),
        ('[agents.x]\npreset = "gpt"\ncommand = ["a"]\n', "agents.x.preset"),
        (
            '[agents.x]\ncommand = ["a"]\nhome_files = { "../x" = "/etc/passwd" }\n',
            "agents.x.home_files",
        ),
        ('[git]\nbranch_template = "kugetsu/{issue}"\n', "git.branch_template"),
        ("[server]\nport = 70000\n", "server.port"),
        ('[logging]\nformat = "xml"\n', "logging.format"),
        ('[logging]\nlevel = "LOUD"\n', "logging.level"),
        ("[logging]\ncolour = true\n", "colour"),
        ("not toml = = 1", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text), ENV)
    assert key in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("[queue]\npoll_interval_seconds = nan\n", "queue.poll_interval_seconds"),
        ("[queue]\npoll_interval_seconds = inf\n", "queue.poll_interval_seconds"),
        ("[queue]\ncleanup_age_days = inf\n", "queue.cleanup_age_days"),
        ("[queue]\nauthorization_cache_seconds = nan\n", "queue.authorization_cache_seconds"),
        ("[queue]\nretry_backoff_seconds = [inf]\n", "queue.retry_backoff_seconds"),
        ("[queue]\nretry_backoff_seconds = [1, nan]\n", "queue.retry_backoff_seconds"),
        ("[agents]\ntimeout_minutes = nan\n", "agents.timeout_minutes"),
        ("[agents]\ntimeout_minutes = inf\n", "agents.timeout_minutes"),
        ("[agents]\nkill_grace_seconds = -inf\n", "agents.kill_grace_seconds"),
        ("[agents]\nmax_cost_usd = inf\n", "agents.max_cost_usd"),
        ("[gitea]\ntimeout_seconds = nan\n", "gitea.timeout_seconds"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, text, key):
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text), ENV)
    assert key in str(exc.value) and "finite" in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "text, key, why",
    [
        ('[agents.x]\ncommand = ["foo", "{promt}"]\n', "agents.x.command", "{promt}"),
        ('[agents.x]\ncommand = ["foo", "--in={dir}"]\n', "agents.x.command", "{dir}"),
        (
            '[agents.x]\ncommand = ["foo"]\nresume_command = ["foo", "{session}"]\n',
            "agents.x.resume_command",
            "{session}",
        ),
        (
            '[agents.claude]\nresume_command = ["claude", "{sessionid}", "{prompt}"]\n',
            "agents.claude.resume_command",
            "{sessionid}",
        ),
        (
            '[agents.x]\ncommand = ["foo"]\nresume_command = []\n',
            "agents.x.resume_command",
            "empty",
        ),
        ("[agents.opencode]\nresume_command = []\n", "agents.opencode.resume_command", "empty"),
    ],
)
def test_agent_command_lines_are_checked(tmp_path, text, key, why):
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text), ENV)
    assert key in str(exc.value) and why in str(exc.value)
    assert "\n" not in str(exc.value)


def test_agent_command_lines_may_hold_other_braces(tmp_path):
    config = load(
        write(
            tmp_path,
            """
[agents.x]
command = ["foo", "--config", '{"model": "{env:MODEL}"}', "{}", "{ x }", "--in={workdir}",
           "{prompt_file}", "{prompt}"]
resume_command = ["foo", "--resume={session_id}", "{prompt}"]
""",
        ),
        ENV,
    )
    assert config.agents.tables["x"].resume_command == ("foo", "--resume={session_id}", "{prompt}")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", ENV)


def test_secrets_are_not_in_repr(tmp_path):
    config = load(write(tmp_path, '[gitea]\ntoken = "tok-123456"\n'), ENV)
    assert "tok-123456" not in repr(config) and "s3cret" not in repr(config)
    assert set(config.secrets()) == {"tok-123456", "s3cret"}


def test_example_config_loads():
    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    config = load(example, ENV)
    assert config.agents.default


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    from bot.cli import main

    path = write(tmp_path, "[queue]\nmax_attempts = 0\n")
    assert main(["queue", "list", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "queue.max_attempts" in err


def test_the_database_url_and_the_worker_section(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(
        '[storage]\ndatabase_url = "postgresql://kugetsu:file-pw@db/kugetsu"\n'
        '[worker]\ncapacity = 2\nlease_seconds = 15\nhost = "machine-a"\n'
        "[queue]\nmax_concurrent_agents = 5\n"
    )
    config = load(path, ENV)
    assert config.storage.database == "postgresql://kugetsu:file-pw@db/kugetsu"
    worker = (config.capacity, config.worker.lease_seconds, config.worker.host)
    assert worker == (2, 15, "machine-a")
    assert "file-pw" in config.secrets() and "file-pw" not in repr(config)
    # the environment wins; without a URL the queue is SQLite in data_dir, and a worker's
    # capacity is the global limit
    url = "postgresql://kugetsu:p%40ss@db:5433/q"
    config = load(path, {**ENV, "KUGETSU_DATABASE_URL": url})
    assert config.storage.database == url and "p@ss" in config.secrets()
    default = load(None, ENV)
    assert default.storage.database == default.storage.db_path
    assert default.capacity == default.queue.max_concurrent_agents == 3
    for text, key in [
        ('[storage]\ndatabase_url = "mysql://x"', "storage.database_url"),
        ("[worker]\ncapacity = 0", "worker.capacity"),
        ("[worker]\nlease_seconds = 0.5", "worker.lease_seconds"),
        ("[worker]\nnodes = 2", "[worker] has an unknown key: nodes"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load(path, ENV)


def test_logging_format_and_level_and_the_environment(tmp_path):
    path = write(tmp_path, '[logging]\nformat = "json"\nlevel = "warning"\n')
    assert (load(path, ENV).logging.format, load(path, ENV).logging.level) == ("json", "WARNING")
    # KUGETSU_LOG_LEVEL overrides the file, as the other variables do
    assert load(path, {**ENV, "KUGETSU_LOG_LEVEL": "DEBUG"}).logging.level == "DEBUG"
