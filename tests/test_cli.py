"""The command line against a real database: list, stats, clear, enqueue, logs --follow."""

import io
import json
import os

import pytest

from bot.cli import main, show_logs
from bot.config import load
from bot.core.tasks import Kind, Outcome, State
from bot.store import open_store
from tests.conftest import enqueue


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "data"
    config = tmp_path / "kugetsu.toml"
    # no server runs, and nothing listens where Gitea would be: enqueue queues all the
    # same, with a warning that it could not check the issue
    config.write_text(f'[storage]\ndata_dir = "{data}"\n[gitea]\nurl = "http://127.0.0.1:9"\n')
    store = open_store(data / "kugetsu.db")
    yield str(config), store, data
    store.close()


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_enqueue_list_and_stats(setup, capsys):
    config, store, _ = setup
    code, out, _ = run(capsys, "enqueue", "acme/widget#7", "make it so", "--config", config)
    assert code == 0 and "queued (start on acme/widget#7)" in out and "is not running" in out
    code, _, err = run(capsys, "enqueue", "acme/widget#7", "--config", config)
    assert code == 1 and "already queued" in err
    code, out, _ = run(capsys, "enqueue", "acme/widget#7", "more", "--continue", "--config", config)
    assert code == 0 and "continue" in out
    code, _, err = run(capsys, "enqueue", "acme/widget#8", "--agent", "nope", "--config", config)
    assert code == 2 and "unknown agent" in err

    code, out, _ = run(capsys, "queue", "list", "--config", config)
    assert code == 0 and "acme/widget#7" in out and "continue" in out
    code, out, _ = run(capsys, "queue", "list", "--json", "--state", "pending", "--config", config)
    tasks = json.loads(out)
    assert [(t["kind"], t["requested_by"]) for t in tasks] == [
        ("start", "cli"),
        ("continue", "cli"),
    ]
    code, out, _ = run(capsys, "queue", "stats", "--json", "--config", config)
    assert json.loads(out)["by_state"]["pending"] == 2


def test_cancel_retry_and_clear(setup, capsys):
    config, store, _ = setup
    tid = enqueue(
        store,
        repo="a/b",
        issue=1,
        kind=Kind.START,
        prompt="",
        agent="opencode",
        requested_by="cli",
        max_attempts=3,
        authorized=True,
    )
    assert run(capsys, "queue", "retry", str(tid), "--config", config)[0] == 1
    code, out, _ = run(capsys, "queue", "cancel", str(tid), "--config", config)
    assert code == 0 and "cancelled" in out
    assert run(capsys, "queue", "cancel", str(tid), "--config", config)[0] == 1
    assert run(capsys, "queue", "cancel", "999", "--config", config)[0] == 1
    assert run(capsys, "queue", "retry", str(tid), "--config", config)[0] == 0
    assert store.get(tid).state is State.PENDING
    store.request_cancel(tid, "cli")
    code, out, _ = run(capsys, "queue", "clear", "--older-than", "0", "--config", config)
    assert code == 0 and "1 finished task(s) removed" in out
    assert store.get(tid) is None


def test_retry_refuses_a_second_active_task_on_the_issue(setup, capsys):
    config, store, _ = setup
    assert run(capsys, "enqueue", "o/r#5", "--config", config)[0] == 0
    assert run(capsys, "queue", "cancel", "1", "--config", config)[0] == 0
    assert run(capsys, "enqueue", "o/r#5", "--config", config)[0] == 0
    code, _, err = run(capsys, "queue", "retry", "1", "--config", config)
    assert code == 1 and "task 2 is already active on o/r#5" in err
    assert err.count("\n") == 1
    assert [t.id for t in store.list_tasks(state=State.PENDING)] == [2]
    assert store.get(1).state is State.CANCELLED


def test_logs_follow_streams_until_the_task_ends(setup, capsysbinary):
    config, store, data = setup
    tid = enqueue(
        store,
        repo="a/b",
        issue=1,
        kind=Kind.START,
        prompt="",
        agent="opencode",
        requested_by="cli",
        max_attempts=3,
        authorized=True,
    )
    store.claim(1, "w")
    log = data / "logs" / f"{tid}.log"
    log.parent.mkdir(parents=True)
    log.write_text("first line\n")
    out = io.BytesIO()

    def more_output():
        # what was there is shown before the task ends; then the agent writes more
        assert out.getvalue() == b"first line\n"
        with log.open("a") as fh:
            fh.write("second line\n")

    def task_ends():
        assert out.getvalue() == b"first line\nsecond line\n"
        store.transition(
            tid, State.RUNNING, State.COMPLETED, event="done", outcome=Outcome.SUCCEEDED
        )

    # each wait between two looks at the log is one step of the agent's run; a wait after
    # the task ended with nothing more to show would find no step left
    steps = [more_output, task_ends]
    cfg = load(config, require_secret=False)
    assert show_logs(cfg, store, tid, True, out=out, wait=lambda: steps.pop(0)()) == 0
    assert steps == [] and out.getvalue() == b"first line\nsecond line\n"
    # the command itself, for the task that has ended: all of it, and it returns
    assert main(["logs", str(tid), "--follow", "--config", config]) == 0
    assert capsysbinary.readouterr().out == b"first line\nsecond line\n"


def test_logs_of_an_unknown_task(setup, capsys):
    config, _, _ = setup
    code, _, err = run(capsys, "logs", "42", "--config", config)
    assert code == 1 and "no task 42" in err


def test_enqueue_rejects_a_bad_reference(setup, capsys):
    config, _, _ = setup
    code, _, err = run(capsys, "enqueue", "acme/widget/7", "--config", config)
    assert code == 2 and "OWNER/REPO#NUMBER" in err


def usage_error(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ("queue", "cancel", "99999999999999999999"),
        ("queue", "retry", "99999999999999999999"),
        ("queue", "cancel", "0"),
        ("queue", "retry", "-3"),
        ("logs", "99999999999999999999"),
        ("logs", "x"),
    ],
)
def test_task_ids_out_of_range_are_usage_errors(setup, capsys, args):
    config, _, _ = setup
    code, err = usage_error(capsys, *args, "--config", config)
    assert code == 2 and "argument id" in err and "Traceback" not in err


@pytest.mark.parametrize("days", ["-1", "nan", "inf", "-inf", "soon"])
def test_clear_refuses_a_negative_or_non_finite_age(setup, capsys, days):
    config, store, _ = setup
    tid = enqueue(
        store,
        repo="a/b",
        issue=1,
        kind=Kind.START,
        prompt="",
        agent="opencode",
        requested_by="cli",
        max_attempts=3,
        authorized=True,
    )
    store.request_cancel(tid, "cli")
    with store.tx() as c:
        store.seen_delivery(c, "delivery-1", "issues")
    code, err = usage_error(capsys, "queue", "clear", "--older-than", days, "--config", config)
    assert code == 2 and "--older-than" in err
    assert store.get(tid) is not None
    with store.tx() as c:
        assert store.seen_delivery(c, "delivery-1", "issues")


@pytest.mark.parametrize(
    "ref, why",
    [
        ("a/b#99999999999999999999", "issue number"),
        ("a/b#0", "issue number"),
        ("../..#1", "owner '..' is not a name"),
        ("./b#1", "owner '.' is not a name"),
        ("a/..#1", "repository name '..' is not a name"),
        ("a/b c#1", "OWNER/REPO#NUMBER"),
        ("a/b/c#1", "is not owner/name"),
        (f"{'o' * 41}/b#1", "longer than 40"),
        ("a/b#1\n", "OWNER/REPO#NUMBER"),
    ],
)
def test_enqueue_rejects_invalid_repos_and_issue_numbers(setup, capsys, ref, why):
    config, store, _ = setup
    code, _, err = run(capsys, "enqueue", ref, "--config", config)
    assert code == 2 and why in err and err.count("\n") == 1
    assert store.list_tasks() == []


def test_a_junk_database_is_one_line(tmp_path, capsys, monkeypatch):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "kugetsu.db").write_text("this is not a database\n" * 10)
    monkeypatch.setenv("KUGETSU_DATA_DIR", str(junk))
    monkeypatch.delenv("KUGETSU_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    for args in (["queue", "list"], ["queue", "cancel", "1"], ["enqueue", "a/b#1"]):
        code, _, err = run(capsys, *args)
        assert code == 1 and err.startswith("kugetsu: ") and err.count("\n") == 1
        assert "not a database" in err


def test_a_data_dir_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    plain = tmp_path / "plain"
    plain.write_text("")
    monkeypatch.setenv("KUGETSU_DATA_DIR", str(plain))
    monkeypatch.delenv("KUGETSU_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "enqueue", "a/b#1")
    assert code == 1 and err.startswith("kugetsu: ") and err.count("\n") == 1
    assert str(plain) in err


def _tasks(store, n: int, issue_from: int = 1) -> list[int]:
    return [
        enqueue(
            store,
            repo="a/b",
            issue=issue_from + i,
            kind=Kind.START,
            prompt="",
            agent="opencode",
            requested_by="cli",
            max_attempts=3,
        )
        for i in range(n)
    ]


def _listed(out: str) -> list[int]:
    return [int(line.split()[0]) for line in out.splitlines()[1:]]


def test_queue_list_pages_newest_first_and_says_how_to_go_on(setup, capsys):
    config, store, _ = setup
    ids = _tasks(store, 7)
    for tid in ids[:2]:
        store.request_cancel(tid, "cli")
    code, out, err = run(capsys, "queue", "list", "--limit", "3", "--config", config)
    assert code == 0 and _listed(out) == ids[4:]
    assert err == (
        f"kugetsu: the newest 3 shown; older ones with --before {ids[4]}, or all with --all\n"
    )
    code, out, err = run(
        capsys, "queue", "list", "--limit", "3", "--before", str(ids[4]), "--config", config
    )
    assert _listed(out) == ids[1:4] and f"--before {ids[1]}" in err
    code, out, err = run(
        capsys, "queue", "list", "--limit", "3", "--before", str(ids[1]), "--config", config
    )
    assert _listed(out) == ids[:1] and err == ""
    assert _listed(run(capsys, "queue", "list", "--all", "--config", config)[1]) == ids
    assert _listed(run(capsys, "queue", "list", "--config", config)[1]) == ids  # 50 by default
    # with a state, the pages are of that state's tasks
    code, out, err = run(
        capsys, "queue", "list", "--state", "pending", "--limit", "4", "--config", config
    )
    assert _listed(out) == ids[3:] and f"--before {ids[3]}" in err
    code, out, err = run(
        capsys, "queue", "list", "--state", "cancelled", "--limit", "4", "--config", config
    )
    assert _listed(out) == ids[:2] and err == ""
    assert run(capsys, "queue", "list", "--before", "1", "--config", config)[1] == "no tasks\n"


def test_queue_list_json_is_the_same_array_page_by_page(setup, capsys):
    config, store, _ = setup
    ids = _tasks(store, 5)
    code, out, err = run(capsys, "queue", "list", "--json", "--limit", "2", "--config", config)
    assert (
        code == 0
        and out == json.dumps([store.get(i).public_dict() for i in ids[3:]], indent=2) + "\n"
    )
    assert f"--before {ids[3]}" in err
    code, out, _ = run(capsys, "queue", "list", "--json", "--all", "--config", config)
    assert [t["id"] for t in json.loads(out)] == ids
    assert set(json.loads(out)[0]) == {
        "id",
        "repo",
        "issue",
        "kind",
        "state",
        "attempts",
        "max_attempts",
        "outcome",
        "pr_number",
        "agent",
        "requested_by",
        "branch",
        "error",
        "created_at",
        "started_at",
        "finished_at",
    }
    code, out, err = run(
        capsys, "queue", "list", "--json", "--before", str(ids[0]), "--config", config
    )
    assert out == "[]\n" and err == ""


@pytest.mark.parametrize("as_json", [False, True])
def test_queue_list_all_prints_each_task_as_it_is_read(setup, monkeypatch, as_json):
    """The first task is out before the second is read from the database: the table is
    never held in memory, whatever its size."""
    import sys

    import bot.store

    config, store, _ = setup
    _tasks(store, 300)
    read = [0]
    to_task = bot.store._row_to_task

    def counting(row):
        read[0] += 1
        return to_task(row)

    class Out:
        reads_at_first_task: int | None = None

        def write(self, text: str) -> int:
            if self.reads_at_first_task is None and ('"a/b"' in text or "a/b#" in text):
                self.reads_at_first_task = read[0]
            return len(text)

        def flush(self) -> None:
            pass

    out = Out()
    monkeypatch.setattr(bot.store, "_row_to_task", counting)
    monkeypatch.setattr(sys, "stdout", out)
    assert (
        main(["queue", "list", "--all", "--config", config] + (["--json"] if as_json else [])) == 0
    )
    assert read[0] == 300 and out.reads_at_first_task == 1


@pytest.mark.parametrize(
    "args",
    [
        ("--limit", "0"),
        ("--limit", "-1"),
        ("--limit", "many"),
        ("--before", "0"),
        ("--limit", "5", "--all"),
    ],
)
def test_queue_list_paging_arguments_are_checked(setup, capsys, args):
    config, _, _ = setup
    code, err = usage_error(capsys, "queue", "list", *args, "--config", config)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("kugetsu queue list: error: argument --")


# ---------------------------------------------------------------- operators' rough edges


def test_queue_list_by_repository_and_issue(setup, capsys):
    config, store, _ = setup
    for repo, issue in (("a/b", 1), ("a/b", 2), ("c/d", 1)):
        enqueue(
            store,
            repo=repo,
            issue=issue,
            kind=Kind.START,
            prompt="",
            agent="opencode",
            requested_by="cli",
            max_attempts=3,
        )
    code, out, _ = run(capsys, "queue", "list", "--repo", "a/b", "--json", "--config", config)
    assert [(t["repo"], t["issue"]) for t in json.loads(out)] == [("a/b", 1), ("a/b", 2)]
    code, out, _ = run(
        capsys, "queue", "list", "--repo", "a/b", "--issue", "2", "--json", "--config", config
    )
    assert [(t["repo"], t["issue"]) for t in json.loads(out)] == [("a/b", 2)]
    code, out, _ = run(capsys, "queue", "list", "--repo", "a/b", "--issue", "9", "--config", config)
    assert code == 0 and out == "no tasks\n"
    code, _, err = run(capsys, "queue", "list", "--issue", "2", "--config", config)
    assert code == 2 and err == "kugetsu: --issue needs --repo\n"
    assert usage_error(capsys, "queue", "list", "--repo", "a/b/c", "--config", config)[0] == 2


@pytest.mark.parametrize(
    "args",
    [
        ["queue", "list"],
        ["queue", "list", "--json"],
        ["queue", "stats"],
        ["queue", "stats", "--json"],
        ["queue", "clear"],
        ["logs", "1"],
        ["doctor"],
        ["doctor", "--json"],
        ["webhook", "list", "a/b"],
        ["--help"],
    ],
)
def test_a_reader_that_stops_early_ends_it_quietly(setup, args):
    """`kugetsu ... | head`: a pipe whose reader is gone is no error of kugetsu's."""
    import subprocess
    import sys

    config, store, data = setup
    enqueue(
        store,
        repo="a/b",
        issue=1,
        kind=Kind.START,
        prompt="",
        agent="opencode",
        requested_by="cli",
        max_attempts=3,
    )
    (data / "logs").mkdir(exist_ok=True)
    (data / "logs" / "1.log").write_text("a line of the agent\n" * 10)
    read, write = os.pipe()
    os.close(read)  # the reader has stopped before the first line
    # as in a shell: output to a pipe is buffered, so some of it is written only at exit
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bot", *args, "--config", config],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=60,
            env=env,
        )
    finally:
        os.close(write)
    assert done.stderr.decode() == ""


def test_data_dir_errors_name_storage_data_dir(tmp_path):
    import subprocess
    import sys

    plain = tmp_path / "plain"
    plain.write_text("")
    config = tmp_path / "kugetsu.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{plain}"\n[gitea]\nwebhook_secret = "s"\n'
        f'url = "http://127.0.0.1:9"\n[server]\nport = 0\n'
    )
    for args in (["serve"], ["queue", "list"], ["enqueue", "a/b#1"], ["backup", "x"]):
        done = subprocess.run(
            [sys.executable, "-m", "bot", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 1 and "storage.data_dir" in last, (args, done.stderr)
        assert last.startswith("kugetsu: ") and str(plain) in last


def test_one_log_line_for_the_migrations_of_a_new_database(tmp_path, caplog):
    import logging

    from bot.store import SCHEMA_VERSION

    with caplog.at_level(logging.INFO, logger="bot.store"):
        open_store(tmp_path / "new.db").close()
        open_store(tmp_path / "new.db").close()  # nothing to do the second time
    [record] = [r for r in caplog.records if r.getMessage() == "database migrated"]
    assert (record.from_version, record.schema_version) == (0, SCHEMA_VERSION)


@pytest.fixture
def any_backend(tmp_path, backend, request):
    """A config file and a store for the test's backend (SQLite in data_dir, or a
    PostgreSQL schema of its own)."""
    data = tmp_path / "data"
    url = "" if backend == "sqlite" else request.getfixturevalue("pg_cluster").url_for()
    config = tmp_path / "kugetsu.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{data}"\ndatabase_url = "{url}"\n[server]\nport = 9\n'
    )
    store = open_store(url or data / "kugetsu.db")
    yield str(config), store
    store.close()


def test_doctor_checks_the_database_and_names_a_worker_whose_heartbeat_is_old(
    any_backend, capsys, backend
):
    config, store = any_backend

    def database_checks() -> tuple[int, list[dict]]:
        code, out, _ = run(capsys, "doctor", "--json", "--config", config)
        checks = json.loads(out)["checks"]
        return code, [c for c in checks if c["name"] == "database" or c["name"][:7] == "worker "]

    _, [found] = database_checks()
    assert found["ok"] and found["detail"].endswith(": schema up to date")
    assert found["detail"].startswith("sqlite " if backend == "sqlite" else "postgresql ")
    store.register_worker("w-old", 1, None, host="machine-a", capacity=2)
    store._conn().execute("UPDATE workers SET heartbeat_at = heartbeat_at - 600")
    code, [found, worker] = database_checks()
    assert code == 1 and found["ok"] and not worker["ok"] and worker["name"] == "worker w-old"
    assert worker["detail"].startswith("on machine-a: no heartbeat for 600 s")
    # queue stats names the workers too
    code, out, _ = run(capsys, "queue", "stats", "--config", config)
    assert code == 0 and "worker w-old on machine-a: 0 of 2 agents running" in out


def test_doctor_says_when_the_database_cannot_be_reached(tmp_path, capsys):
    from tests.service import free_port

    config = tmp_path / "kugetsu.toml"
    url = f"postgresql://kugetsu:pw-in-url@127.0.0.1:{free_port()}/kugetsu?connect_timeout=2"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path}"\ndatabase_url = "{url}"\n')
    code, out, err = run(capsys, "doctor", "--config", str(config))
    [line] = [x for x in out.splitlines() if x.startswith("FAIL database: ")]
    assert code == 1 and line.startswith("FAIL database: cannot be opened: OperationalFailure")
    assert "pw-in-url" not in out + err
    # and the other commands say it in one line
    code, out, err = run(capsys, "queue", "stats", "--config", str(config))
    assert code == 1 and err.startswith("kugetsu: database the PostgreSQL database: ")
    assert len(err.strip().splitlines()) == 1 and "pw-in-url" not in err
