"""What the sandbox adds per task: lending the worktree and home, starting the agent through
the launcher, the sweep and taking them back, against `sandbox.mode = "none"` in one run.

    sudo python -m bench.sandbox_overhead [--runs 40] [--files 2000]

Needs root, as `serve` with the sandbox does. Starts a launcher as `serve` would (service
user uid 29999, first slot uid 20000), makes an issue's worktree (a linked worktree of a
bare mirror with `--files` files checked out, as kugetsu's git leaves one) and home, then
runs the same trivial agent (`true`) through the worker's own path (`Sandbox.lend`,
`AgentProcess.start`, `close`) alternately with `NoSandbox` and with `UserSandbox`, so both
meet the same machine. The
figure is the whole agent run, `lend` to the end of the block: for `none` a fork, exec and
reap; for `user` also the launcher's round trips, the chown of the worktree and home both
ways, the sweep of the slot's uid, and, where the kernel lets agents have them, making
the agent's namespaces and its /proc. Writes bench/results/sandbox_overhead.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import summary, table, write_result
from bot import sandbox
from bot.config import Config, QueueConfig, SandboxConfig, StorageConfig

SERVICE_UID = 29999
FIRST_UID = 20000


def make_tree(data: Path, files: int) -> tuple[Path, Path]:
    """An issue's worktree and its home, owned by the service user as kugetsu leaves them.
    The worktree is what kugetsu's git makes: a linked worktree of a bare mirror (`git
    worktree add`), so it holds the `files` checked-out files and a `.git` file, while the
    objects stay in the mirror, which is never lent."""
    wt = data / "worktrees" / "acme" / "widget" / "1"
    home = data / "homes" / "acme" / "widget" / "1"
    source = data / "source"
    mirror = data / "mirrors" / "acme" / "widget.git"
    for i in range(files):
        folder = source / f"pkg{i % 40}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"mod{i}.py").write_text(f"VALUE = {i}\n")
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run([*git, "init", "-q", str(source)], check=True)
    subprocess.run([*git, "-C", str(source), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(source), "commit", "-qm", "x", "--allow-empty"], check=True)
    subprocess.run([*git, "clone", "-q", "--bare", str(source), str(mirror)], check=True)
    wt.parent.mkdir(parents=True)
    subprocess.run(
        [*git, "-C", str(mirror), "worktree", "add", "-q", "-b", "kugetsu/issue-1", str(wt)],
        check=True,
    )
    shutil.rmtree(source)
    (home / ".config").mkdir(parents=True)
    subprocess.run(["chown", "-R", f"{SERVICE_UID}:{SERVICE_UID}", str(data)], check=True)
    return wt, home


def one_run(box: sandbox.Sandbox, wt: Path, home: Path, log: Path) -> float:
    started = time.perf_counter()
    with box.lend(0, [wt, home]) as start:
        proc = start(
            ["true"],
            cwd=wt,
            env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
            log_path=log,
            log_max_bytes=1 << 20,
        )
        proc.wait(30)
        proc.close(grace=1.0)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs per mode, alternating")
    parser.add_argument("--files", type=int, default=2000, help="files in the worktree")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.sandbox_overhead: needs root, as serve with the sandbox does", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="kugetsu-bench-sandbox-"))
    tmp.chmod(0o711)
    data = tmp / "data"
    data.mkdir(mode=0o700)
    settings = SandboxConfig(mode="user", user=str(SERVICE_UID), first_uid=FIRST_UID)
    config = Config(
        storage=StorageConfig(data_dir=data),
        queue=QueueConfig(max_concurrent_agents=1),
        sandbox=settings,
    )
    wt, home = make_tree(data, args.files)
    launcher = sandbox.start_launcher(
        config, sandbox.Account(None, SERVICE_UID, SERVICE_UID), log_level="WARNING"
    )
    boxes: dict[str, sandbox.Sandbox] = {
        "none": sandbox.NoSandbox(),
        "user": sandbox.UserSandbox(config.storage, settings),
    }
    times: dict[str, list[float]] = {"none": [], "user": []}
    try:
        for i in range(args.runs + 2):
            for mode, box in boxes.items():
                took = one_run(box, wt, home, tmp / f"{mode}.log")
                if i >= 2:  # the first two of each: warm-up
                    times[mode].append(took)
    finally:
        launcher.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    none, user = summary(times["none"], 1000, 1), summary(times["user"], 1000, 1)
    added = round(user["p50"] - none["p50"], 1)
    print(f"sandbox overhead per agent run, {args.runs} runs each, {args.files} files (ms)")
    print(
        table(
            ["mode", "p50", "p90", "max"],
            [[m, s["p50"], s["p90"], s["max"]] for m, s in (("none", none), ("user", user))],
        )
    )
    print(f"added by the sandbox at the median: {added} ms (target < 100 ms)")
    path = write_result(
        "sandbox_overhead",
        {
            "runs": args.runs,
            "files": args.files,
            "none_ms": none,
            "user_ms": user,
            "added_ms": added,
        },
    )
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
