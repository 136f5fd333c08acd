"""The wall time kugetsu adds around a real opencode run.

    python -m bench.real_agent_overhead [--runs 5]

Runs `kugetsu serve` configured as in tests/test_e2e_real_agents.py: the pinned real opencode
CLI (installed from npm into the test cache on first use), talking to the scripted fake LLM on
127.0.0.1, which has it write hello.txt and answer with a line of text. The opencode agent
table keeps `preset = "opencode"` and the preset's own arguments, but runs them through
bench/timed.py, which records when the CLI started and ended. For each run a new issue gets
the `kugetsu` label and the bench waits for "Done" in the tracking comment:
overhead = (delivery -> Done) - (the CLI's own run).
Then the same opencode command runs directly, without kugetsu, as many times: same prompt,
same environment and a fresh home and clone each time, as kugetsu gives it.
Writes bench/results/real_agent_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from bench.common import (
    REPO,
    ROOT,
    TOKEN,
    Service,
    final_state,
    free_port,
    read_record,
    read_task_rows,
    service_tables,
    summary,
    table,
    task_phases,
    wait_until,
    write_config,
    write_result,
)
from bot import agents
from bot.config import load as load_config
from tests import agentcli, payloads
from tests.fakegitea import FakeGitea
from tests.fakellm import FakeLLM, text, write_file

TIMED = Path(__file__).resolve().parent / "timed.py"
WRAPPER = [sys.executable, "-I", "-S", str(TIMED)]
SCRIPT = [
    write_file("hello.txt", "Hello, visitor!\n"),
    text("Created hello.txt with a friendly greeting."),
]


def opencode_config(llm: FakeLLM) -> str:
    return json.dumps(
        {
            "autoupdate": False,
            "share": "disabled",
            "model": "fake/fake-model",
            "small_model": "fake/fake-model",
            "enabled_providers": ["fake"],
            "provider": {
                "fake": {
                    "npm": "@ai-sdk/openai-compatible",
                    "name": "Fake LLM",
                    "options": {"baseURL": llm.url, "apiKey": "sk-fake"},
                    "models": {
                        "fake-model": {
                            "name": "Fake",
                            "tool_call": True,
                            "limit": {"context": 128000, "output": 4096},
                        }
                    },
                }
            },
        }
    )


def wrapper_cost(record: Path, runs: int = 20) -> dict:
    """What bench/timed.py itself adds: wall time around it minus the time it records."""
    costs = []
    for i in range(runs):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KUGETSU_TASK_ID": f"w{i}"}
        t0 = time.monotonic()
        subprocess.run([*WRAPPER, str(record), "true"], env=env, check=True)
        wall = time.monotonic() - t0
        mark = read_record(record)[f"w{i}"]
        costs.append(wall - (mark["end"] - mark["start"]))
    return summary(costs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=5, help="runs through kugetsu, and as many direct runs"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="per-run limit (s)")
    args = parser.parse_args()
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be 1..50")
    try:
        binary = agentcli.ensure("opencode")
    except agentcli.CLIUnavailable as exc:
        print(f"opencode is not available here: {exc.reason}", file=sys.stderr)
        return 1
    path_env = f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    preset = agents.PRESETS["opencode"]

    served, direct = [], []
    with tempfile.TemporaryDirectory(prefix="kugetsu-bench-", ignore_cleanup_errors=True) as d:
        tmp = Path(d)
        record = tmp / "cli-record.txt"
        wrapper = wrapper_cost(tmp / "wrapper-record.txt")
        with FakeGitea(tmp / "gitea", token=TOKEN) as gitea, FakeLLM(SCRIPT) as llm:
            gitea.create_repo(REPO, files={"README.md": "# widget\n"})
            gitea.set_permission(REPO, "alice", "write")
            port = free_port()
            table_ = {
                "preset": "opencode",
                "command": [*WRAPPER, str(record), *preset.command],
                "env": {"OPENCODE_CONFIG_CONTENT": opencode_config(llm)},
            }
            config_path = write_config(
                tmp / "kugetsu.toml",
                service_tables(
                    port=port,
                    gitea_url=gitea.url,
                    data_dir=tmp / "data",
                    default="opencode",
                    agents={"opencode": table_},
                    queue={"max_attempts": 1},
                    agents_options={"timeout_minutes": 5},
                ),
            )
            svc = Service(config_path, port, tmp, env={"PATH": path_env}).start()
            session = requests.Session()
            try:
                time.sleep(1.0)
                for i in range(args.runs):
                    n = gitea.create_issue(
                        REPO,
                        "Greet the visitors",
                        "The project needs a hello.txt with a friendly greeting.",
                        labels=["kugetsu"],
                    )
                    body, headers = payloads.label_delivery(["kugetsu"], n)
                    sent_wall, sent = time.time(), time.monotonic()
                    r = session.post(svc.url + "/webhook", data=body, headers=headers, timeout=10)
                    if r.status_code != 202:
                        raise RuntimeError(f"delivery answered {r.status_code}: {r.text}")
                    task = r.json()["tasks"][0]
                    state = wait_until(
                        lambda n=n: final_state(gitea, n),
                        args.timeout,
                        interval=0.01,
                        what=f"task {task} to finish",
                    )
                    done = time.monotonic()
                    if state != "done":
                        raise RuntimeError(f"task {task} ended {state}:\n{svc.logs()[-3000:]}")
                    served.append(
                        {"task": task, "sent": sent, "sent_wall": sent_wall, "done": done}
                    )
                    print(f"kugetsu run {i + 1}: {done - sent:.2f} s", flush=True)
                rows = read_task_rows(tmp / "data" / "kugetsu.db")
                prompts = [
                    (tmp / "data" / "prompts" / f"{r['task']}.md").read_text() for r in served
                ]
            finally:
                session.close()
                svc.stop()
            marks = read_record(record)

            # the same command without kugetsu: fresh home and clone, same env and prompt
            config = load_config(str(config_path))
            spec = agents.resolve(config.agents, "opencode")
            for i in range(args.runs):
                root = tmp / "direct" / str(i)
                work = root / "repo"
                subprocess.run(
                    ["git", "clone", "--quiet", str(gitea.repos_root / f"{REPO}.git"), str(work)],
                    check=True,
                    env=gitea.git_env(),
                )
                home_env = agents.prepare_home(spec, root / "home")
                env = agents.build_env(
                    spec,
                    home_env=home_env,
                    task_vars={},
                    environ={"PATH": path_env, "LANG": "C.UTF-8"},
                    secrets=[],
                )
                argv = agents.fill(
                    preset.command,
                    prompt=prompts[i % len(prompts)],
                    prompt_file="",
                    workdir=str(work),
                    session_id=None,
                )
                t0 = time.monotonic()
                proc = subprocess.run(
                    argv,
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    timeout=args.timeout,
                )
                wall = time.monotonic() - t0
                if proc.returncode != 0 or not (work / "hello.txt").exists():
                    raise RuntimeError(
                        f"direct opencode run failed ({proc.returncode}):\n"
                        f"{proc.stdout[-3000:].decode(errors='replace')}"
                    )
                direct.append(wall)
                print(f"direct run {i + 1}: {wall:.2f} s", flush=True)

    totals, clis, overheads = [], [], []
    phases: dict[str, list[float]] = {"claimed": [], "prepare": [], "publish": [], "comment": []}
    for run in served:
        mark = marks[str(run["task"])]
        run.update(total_s=run["done"] - run["sent"], cli_s=mark["end"] - mark["start"])
        run["overhead_s"] = run["total_s"] - run["cli_s"]
        run.update(
            task_phases(
                sent=run["sent"],
                sent_wall=run["sent_wall"],
                done=run["done"],
                start=mark["start"],
                end=mark["end"],
                row=rows[run["task"]],
            )
        )
        for key in phases:
            phases[key].append(run[key + "_s"])
        totals.append(run["total_s"])
        clis.append(run["cli_s"])
        overheads.append(run["overhead_s"])
        for key in ("sent", "sent_wall", "done"):
            run.pop(key)

    s_total, s_cli, s_over = summary(totals), summary(clis), summary(overheads)
    s_direct = summary(direct)
    out_rows = [
        ["through kugetsu: delivery -> Done", s_total["p50"], s_total["min"], s_total["max"]],
        ["  opencode's own run (timed.py)", s_cli["p50"], s_cli["min"], s_cli["max"]],
        ["  kugetsu overhead", s_over["p50"], s_over["min"], s_over["max"]],
    ]
    labels = {
        "claimed": "delivery -> claimed",
        "prepare": "claimed -> CLI start",
        "publish": "CLI end -> task finished",
        "comment": "task finished -> Done",
    }
    phase_stats = {k: summary(v) for k, v in phases.items()}
    out_rows += [["    " + labels[k], s["p50"], s["min"], s["max"]] for k, s in phase_stats.items()]
    out_rows.append(["opencode run directly", s_direct["p50"], s_direct["min"], s_direct["max"]])
    print()
    print(table(["seconds", "median", "min", "max"], out_rows))
    print(
        f"\ntimed.py's own start-up, counted in the overhead: median {wrapper['p50'] * 1000:.1f} ms"
    )
    path = write_result(
        "real_agent_overhead",
        {
            "options": vars(args),
            "opencode_version": agentcli.version("opencode"),
            "total_s": s_total,
            "cli_s": s_cli,
            "overhead_s": s_over,
            "phases_s": phase_stats,
            "direct_s": s_direct,
            "wrapper_startup_s": wrapper,
            "runs": [
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                for r in served
            ],
            "direct_runs_s": [round(v, 4) for v in direct],
        },
    )
    print(f"written to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
