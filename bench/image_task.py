"""One real task inside the container image, with the sandbox on: a labelled issue in the
suite's fake Gitea becomes a pull request written by the image's own opencode, talking to the
suite's fake LLM.

    python -m bench.image_task --build              # builds the image, then runs the task
    python -m bench.image_task --container NAME     # in a working container made before

Needs root and buildah (not CI: CI has no buildah). With `--build` it first builds the
Dockerfile (`buildah bud --isolation chroot`, tagged localhost/kugetsu:bench) and makes a
working container of it (`buildah from`); with `--container` it uses one made before
(`buildah containers`). The fake Gitea and the fake LLM run in this process on 127.0.0.1; the
image runs its own ENTRYPOINT and CMD in that container with `buildah run --isolation
chroot`, which shares this machine's network (port 8080 must be free) and PID namespace. A
config file copied into the container (KUGETSU_CONFIG) keeps the image's server and sandbox
settings and points the default agent, opencode, at the fake LLM; the Gitea URL, token and
webhook secret come from the environment, as in a real deployment. The container's /data is
emptied first, so a container used before starts afresh.

Then it posts a signed label delivery to http://127.0.0.1:8080/webhook and waits for the
task's end, and prints what happened: the container's processes with their uids while the
agent runs (kugetsu and its launcher as uid 1000, the agent as a slot uid), what the launcher
logged about PID namespaces, the tracking comment, the pull request and its branch, whether
any process of a slot uid is left after the task, and the times. It stops the container as
`docker stop` does (SIGTERM to its init) and writes bench/results/image_task.json, and the
container's output to bench/results/image_task.log.

Under chroot isolation the container shares the machine's PID namespace, so a slot's sweep
(kill(-1) as the slot's uid) reaches every process of that uid on the machine, not only the
container's: `--first-uid` moves the slots to a range nothing else here uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from bench.common import (
    REPO,
    RESULTS,
    SECRET,
    TOKEN,
    final_state,
    tracking_comments,
    wait_until,
    write_config,
    write_result,
)
from bench.real_agent_overhead import opencode_config
from tests import payloads
from tests.fakegitea import FakeGitea
from tests.fakellm import FakeLLM, Step, text, tool_call, write_file

IMAGE = "localhost/kugetsu:bench"
PORT = 8080  # the image's (EXPOSE, HEALTHCHECK, its config)
SERVICE_UID = 1000  # the image's user kugetsu
IMAGE_FIRST_UID = 20000  # the image's sandbox.first_uid (the default)
SLOTS = 3  # queue.max_concurrent_agents, the default
CONFIG_IN_IMAGE = "/etc/kugetsu/image-task.toml"
DATA_DIR = "/data"  # the image's KUGETSU_DATA_DIR
TITLE = "Greet the visitors"
BODY = "The project needs a hello.txt with a friendly greeting."
#: a process that outlives the agent unless the sandbox's sweep ends it: a session of its
#: own, SIGTERM ignored, its output away from the agent's
DAEMON = "setsid sh -c 'trap \"\" TERM; exec sleep 3600' </dev/null >/dev/null 2>&1 &"
SCRIPT: list[Step] = [
    write_file("hello.txt", "Hello, visitor!\n"),
    tool_call("bash", {"command": DAEMON, "description": "Start a helper in the background"}),
    text("Created hello.txt with a friendly greeting."),
]


def buildah(storage: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["buildah", "--storage-driver", storage, *args], check=True, capture_output=True, text=True
    )


def containers(storage: str) -> dict[str, str]:
    """The working containers buildah keeps: {id: name}."""
    out = buildah(storage, "containers", "--json").stdout
    return {c["id"]: c["containername"] for c in json.loads(out or "[]")}


def build(project: Path, storage: str) -> tuple[str, dict[str, Any]]:
    """Build the Dockerfile as IMAGE and make a working container of it: its name, and how
    long the build took and how large the image is."""
    started = time.monotonic()
    proc = subprocess.run(
        [
            "buildah",
            "--storage-driver",
            storage,
            "bud",
            "--quiet",
            "--format",
            "docker",
            "--isolation",
            "chroot",
            "--layers=false",
            "-t",
            IMAGE,
            str(project),
        ],
        cwd=project,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"buildah bud failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    took = round(time.monotonic() - started, 1)
    size = buildah(storage, "images", "--format", "{{.Size}}", IMAGE).stdout.strip()
    container = buildah(storage, "from", "--pull=never", IMAGE).stdout.strip()
    return container, {"build_seconds": took, "image_size": size}


def image_argv(storage: str, container: str) -> list[str]:
    """The container's ENTRYPOINT + CMD, as `docker run` would start them."""
    info = json.loads(buildah(storage, "inspect", "--type", "container", container).stdout)
    config = info["OCIv1"]["config"]
    return [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]


def processes() -> dict[int, dict[str, Any]]:
    """Every process on the machine: {pid: {"ppid", "uid", "args"}} (real uid)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        table[int(entry)] = {
            "ppid": int(fields["PPid"]),
            "uid": int(fields["Uid"].split()[0]),
            "args": cmdline.replace(b"\0", b" ").decode(errors="replace").strip(),
        }
    return table


def descendants(root: int, named: bool = False) -> list[tuple[int, int, str]]:
    """(uid, pid, args) of every process below `root`, by parent links: the container's
    processes, also those that made sessions or namespaces of their own. `named`: only
    those with a command line (not zombies)."""
    table = processes()
    children: dict[int, list[int]] = {}
    for pid, p in table.items():
        children.setdefault(p["ppid"], []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        args = table[pid]["args"]
        if not args.startswith("buildah") and (args or not named):  # buildah: its helpers
            found.append((table[pid]["uid"], pid, args))
        todo += children.get(pid, [])
    return sorted(found, key=lambda row: row[1])


def of_uids(first: int, count: int) -> list[tuple[int, int, str]]:
    return [
        (p["uid"], pid, p["args"])
        for pid, p in processes().items()
        if first <= p["uid"] < first + count
    ]


def ps_lines(rows: list[tuple[int, int, str]]) -> list[str]:
    return [f"{uid:>6} {pid:>7} {' '.join(args.split())[:160]}" for uid, pid, args in rows]


def healthy() -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{PORT}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def fakes(tmp: Path) -> Iterator[tuple[FakeGitea, FakeLLM]]:
    """The suite's fake Gitea, with the repository and a user who may ask for work, and its
    fake LLM with SCRIPT, both on 127.0.0.1."""
    with FakeGitea(tmp / "gitea", token=TOKEN) as gitea, FakeLLM(SCRIPT) as llm:
        gitea.create_repo(REPO, files={"README.md": "# widget\n", "src/widget.py": "VALUE = 1\n"})
        gitea.set_permission(REPO, "alice", "write")
        yield gitea, llm


def opencode_table(llm: FakeLLM) -> dict[str, dict[str, Any]]:
    """The config tables that make opencode, the default agent, talk to the fake LLM."""
    return {
        "agents": {"default": "opencode", "timeout_minutes": 5},
        "agents.opencode": {"env": {"OPENCODE_CONFIG_CONTENT": opencode_config(llm)}},
    }


def run_task(
    gitea: FakeGitea,
    first_uid: int,
    timeout: float,
    processes_of_service: Callable[[], list[tuple[int, int, str]]],
) -> dict[str, Any]:
    """A labelled issue, its signed delivery to the service on PORT, and what came of it:
    the pull request, its branch, the tracking comment, the service's processes while the
    agent ran (`processes_of_service` lists them), every process of a slot uid seen, and
    whether one is left when the task has ended. Raises SystemExit if the delivery is not
    taken or the task does not end in `timeout` s."""
    result: dict[str, Any] = {}
    n = gitea.create_issue(REPO, TITLE, BODY, labels=["kugetsu"])
    body, headers = payloads.label_delivery(["kugetsu"], n)
    posted = time.monotonic()
    answer = requests.post(
        f"http://127.0.0.1:{PORT}/webhook", data=body, headers=headers, timeout=10
    )
    result["delivery_status"] = answer.status_code
    if answer.status_code != 202:
        raise SystemExit(f"the delivery was answered {answer.status_code}")
    running: list[tuple[int, int, str]] = []
    slot_seen: dict[int, tuple[int, int, str]] = {}
    while final_state(gitea, n) is None:
        for row in of_uids(first_uid, SLOTS):  # each as first seen with a command line
            if not slot_seen.get(row[1], (0, 0, ""))[2]:
                slot_seen[row[1]] = row
        rows = processes_of_service()
        if any(uid >= first_uid for uid, _, _ in rows) and len(rows) > len(running):
            running = rows
        if time.monotonic() - posted > timeout:
            raise SystemExit(f"no end of the task in {timeout:g} s")
        time.sleep(0.2)
    ended = time.monotonic()
    result["task_seconds"] = round(ended - posted, 1)
    result["state"] = final_state(gitea, n)
    left_at_end = of_uids(first_uid, SLOTS)
    try:
        swept = wait_until(lambda: not of_uids(first_uid, SLOTS), 30, 0.1, "the slots to end")
    except TimeoutError:
        swept = False
    result["slot_processes_left_at_end"] = ps_lines(left_at_end)
    result["slot_processes_gone_after_seconds"] = (
        round(time.monotonic() - ended, 1) if swept else None
    )
    result["processes_while_agent_ran"] = ps_lines(running)
    result["slot_processes_seen"] = ps_lines(sorted(slot_seen.values()))
    branch = f"kugetsu/issue-{n}"
    result["pulls"] = [
        {"number": p["number"], "title": p["title"], "head": p["head"]["ref"], "body": p["body"]}
        for p in gitea.pulls_of(REPO).values()
    ]
    result["branch"] = {
        "log": gitea.git(REPO, "log", "--format=%an <%ae> %s", f"main..{branch}"),
        "diff": gitea.git(REPO, "diff", "--stat", "main", branch),
        "hello.txt": gitea.file_at(REPO, branch, "hello.txt"),
    }
    result["tracking_comment"] = tracking_comments(gitea, n)[-1]["body"]
    return result


def log_lines(logs: str) -> dict[str, list[str]]:
    """The service's lines about PID namespaces and agent starts."""
    lines = logs.splitlines()
    return {
        "namespace_log": [line for line in lines if "PID namespace" in line],
        "agent_started_log": [line for line in lines if "agent started" in line],
    }


def print_task(result: dict[str, Any]) -> None:
    print(f"delivery answered {result['delivery_status']}; task {result['state']} in "
          f"{result['task_seconds']} s (started in {result['start_seconds']} s)")  # fmt: skip
    print("processes while the agent ran (uid, pid, command):")
    print("\n".join(result["processes_while_agent_ran"]) or "  (none seen)")
    print("every process of a slot uid seen during the task:")
    print("\n".join(result["slot_processes_seen"]) or "  (none seen)")
    print("launcher:", *result["namespace_log"], sep="\n  ")
    print("agent started:", *result["agent_started_log"], sep="\n  ")
    print(f"pull requests: {json.dumps(result['pulls'], indent=2, ensure_ascii=False)}")
    print(f"branch:\n{result['branch']['log']}{result['branch']['diff']}"
          f"hello.txt: {result['branch']['hello.txt']!r}")  # fmt: skip
    print(f"tracking comment:\n{result['tracking_comment']}")
    left = result["slot_processes_left_at_end"]
    print(
        f"processes of the slot uids when the task had ended: {len(left)}"
        + ("".join(f"\n  {line}" for line in left))
        + f"; none left {result['slot_processes_gone_after_seconds']} s after"
    )


def task_ok(result: dict[str, Any]) -> bool:
    return (
        result.get("state") == "done"
        and len(result.get("pulls", ())) == 1
        and result.get("slot_processes_gone_after_seconds") is not None
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--container", help="a working container of the image (`buildah from`)")
    where.add_argument(
        "--build", action="store_true", help="build the Dockerfile and make a container of it"
    )
    parser.add_argument(
        "--project",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the project whose Dockerfile --build builds (default: this one)",
    )
    parser.add_argument("--storage-driver", default="vfs", help="buildah's (default: vfs)")
    parser.add_argument(
        "--first-uid",
        type=int,
        default=IMAGE_FIRST_UID,
        help=f"sandbox.first_uid (default {IMAGE_FIRST_UID}, the image's); see above",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="for the task (s)")
    parser.add_argument(
        "--remove", action="store_true", help="remove the container at the end (`buildah rm`)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run it as root: buildah and the image's sandbox need it")
    if healthy():
        parser.error(f"something answers on port {PORT} already; stop it first")

    result: dict[str, Any] = {"first_uid": args.first_uid}
    if args.build:
        container, built = build(args.project, args.storage_driver)
        result.update(built)
    else:
        container = args.container
    argv = image_argv(args.storage_driver, container)
    result.update(container=container, argv=argv)

    with tempfile.TemporaryDirectory(prefix="kugetsu-image-task-") as d:
        tmp = Path(d)
        with fakes(tmp) as (gitea, llm):
            # the image's own settings (server, sandbox), and opencode pointed at the fake
            # LLM; no secret in the file: they come from the environment
            config = write_config(
                tmp / "image-task.toml",
                {
                    "server": {"host": "0.0.0.0", "port": PORT},
                    "sandbox": {"mode": "auto", "user": "kugetsu", "first_uid": args.first_uid},
                    "queue": {"poll_interval_seconds": 30, "max_attempts": 1},
                    **opencode_table(llm),
                },
            )
            # a fresh data directory: a container used before holds tasks of issues the
            # new fake Gitea numbers again from 1
            buildah(
                args.storage_driver, "run", "--isolation", "chroot", container, "--",
                "find", DATA_DIR, "-mindepth", "1", "-delete",
            )  # fmt: skip
            buildah(
                args.storage_driver, "copy", "--chown", f"{SERVICE_UID}:{SERVICE_UID}",
                "--chmod", "0600", container, str(config), CONFIG_IN_IMAGE,
            )  # fmt: skip
            log_path = tmp / "container.log"
            command = [
                "buildah", "--storage-driver", args.storage_driver, "run",
                "--isolation", "chroot",
                # tini is not PID 1 under chroot isolation: it reaps orphans as in Docker
                "--env", "TINI_SUBREAPER=1",
                "--env", f"KUGETSU_CONFIG={CONFIG_IN_IMAGE}",
                "--env", f"KUGETSU_GITEA_URL={gitea.url}",
                "--env", f"KUGETSU_GITEA_TOKEN={TOKEN}",
                "--env", f"KUGETSU_WEBHOOK_SECRET={SECRET}",
                container, "--", "sh", "-c", "exec " + shlex.join(argv),
            ]  # fmt: skip
            with open(log_path, "wb") as log:
                run = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            init = None
            try:
                started = time.monotonic()
                wait_until(
                    lambda: healthy() or run.poll() is not None, 120, 0.25, "/healthz to answer"
                )
                if run.poll() is not None:
                    raise SystemExit(f"the container ended:\n{log_path.read_text()[-3000:]}")
                result["start_seconds"] = round(time.monotonic() - started, 1)
                init = descendants(run.pid)[0][1]  # the image's ENTRYPOINT: tini
                result.update(
                    run_task(gitea, args.first_uid, args.timeout, lambda: descendants(run.pid))
                )
            finally:
                if init is not None:
                    os.kill(init, signal.SIGTERM)  # as `docker stop`
                    try:
                        run.wait(60)
                    except subprocess.TimeoutExpired:
                        os.killpg(run.pid, signal.SIGKILL)
                        run.wait()
                else:
                    os.killpg(run.pid, signal.SIGKILL)
                    run.wait()
                logs = log_path.read_text(errors="replace")
                RESULTS.mkdir(parents=True, exist_ok=True)
                (RESULTS / "image_task.log").write_text(logs)
                result.update(log_lines(logs))
    if args.remove:
        buildah(args.storage_driver, "rm", container)

    print(f"container {container}: {shlex.join(argv)}")
    print_task(result)
    print(f"wrote {write_result('image_task', result)}")
    return 0 if task_ok(result) else 1


if __name__ == "__main__":
    sys.exit(main())
