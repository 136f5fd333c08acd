"""The README's systemd units, run for real under systemd with the sandbox on: each boots in a
container (systemd-nspawn, systemd as its PID 1) made from the kugetsu image, and one labelled
issue becomes a pull request written by the image's opencode against the suite's fakes.

    python -m bench.systemd_task [--image localhost/kugetsu:bench] [--unit root|caps]

Needs root, buildah, systemd-nspawn (Debian: systemd-container) and nsenter; not CI. The image
is the one `bench.image_task --build` builds; the script makes a working
container of it, installs systemd there from Debian (`buildah run`, this machine's network),
and boots it with `systemd-nspawn --boot`, which shares this machine's network, so port 8080
must be free. The units are read from README.md ("Bare metal with systemd"): `root` is the
first one as written (started as root, `sandbox.mode = "user"`), `caps` the same with the
second block's User=, Group=, AmbientCapabilities= and CapabilityBoundingSet= in [Service].
Its config file holds the token, `root:kugetsu` 0640, as the README says. For each unit it
prints the service's processes with their uids while the agent runs, the main process's uid
and capabilities, the launcher's line about PID namespaces, the pull request, and whether a
process of a slot uid is left when the task has ended. Writes bench/results/systemd_task.json.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SECRET, TOKEN, wait_until, write_config, write_result
from bench.image_task import (
    IMAGE,
    PORT,
    SERVICE_UID,
    buildah,
    descendants,
    fakes,
    healthy,
    log_lines,
    opencode_table,
    print_task,
    run_task,
    task_ok,
)

MACHINE = "kugetsu-systemd-task"


def readme_units(readme: Path) -> dict[str, str]:
    """The README's two units: {"root": the unit, "caps": the unit with the lines the
    README gives for starting kugetsu as its user with the launcher's capabilities}."""
    text = readme.read_text()
    section = text[text.index("**Bare metal with systemd**") :]
    unit, lines = re.findall(r"```ini\n(.*?)```", section, re.S)[:2]
    head, service_and_rest = unit.split("[Service]\n", 1)
    service, rest = service_and_rest.split("\n[", 1)
    return {
        "root": unit,
        "caps": f"{head}[Service]\n{service}\n{lines}\n[{rest}",
    }


def with_systemd(storage: str, image: str) -> tuple[str, Path]:
    """A working container of `image` with systemd installed, and its root directory."""
    container = buildah(storage, "from", "--pull=never", image).stdout.strip()
    buildah(
        storage, "run", "--isolation", "chroot", container, "--", "sh", "-c",
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
        "--no-install-recommends systemd systemd-sysv dbus >/dev/null",
    )  # fmt: skip
    return container, Path(buildah(storage, "mount", container).stdout.strip())


def in_namespace(pid: int, *command: str) -> str:
    proc = subprocess.run(
        ["nsenter", "-t", str(pid), "-a", *command], capture_output=True, text=True
    )
    return proc.stdout + proc.stderr


def boot_and_run(
    rootfs: Path, name: str, unit: str, first_uid: int, timeout: float, tmp: Path
) -> dict[str, Any]:
    """Boot `rootfs` with `unit` enabled as kugetsu.service, run one task, power it off."""
    result: dict[str, Any] = {"unit": unit}
    with fakes(tmp) as (gitea, llm):
        config = rootfs / "etc/kugetsu/config.toml"
        write_config(
            config,
            {
                "server": {"host": "0.0.0.0", "port": PORT},
                "gitea": {"url": gitea.url, "token": TOKEN, "webhook_secret": SECRET},
                "storage": {"data_dir": "/data"},
                "sandbox": {"mode": "user", "user": "kugetsu", "first_uid": first_uid},
                "queue": {"poll_interval_seconds": 30, "max_attempts": 1},
                **opencode_table(llm),
            },
        )
        os.chown(config, 0, SERVICE_UID)  # root:kugetsu 0640, as the README says
        config.chmod(0o640)
        subprocess.run(["find", str(rootfs / "data"), "-mindepth", "1", "-delete"], check=True)
        subprocess.run(["rm", "-rf", str(rootfs / "var/log/journal")], check=True)
        system = rootfs / "etc/systemd/system"
        (system / "kugetsu.service").write_text(unit)
        wants = system / "multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        if not (wants / "kugetsu.service").is_symlink():
            (wants / "kugetsu.service").symlink_to("/etc/systemd/system/kugetsu.service")
        log_path = tmp / "boot.log"
        with open(log_path, "wb") as log:
            # no machined here: --register=no, and --keep-unit (no scope through the bus)
            boot = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--directory", str(rootfs), "--machine", name,
                 "--register=no", "--keep-unit", "--boot", "--console=pipe"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        leader = 0
        try:
            started = time.monotonic()
            wait_until(lambda: healthy() or boot.poll() is not None, 180, 0.5, "/healthz to answer")
            if boot.poll() is not None:
                raise SystemExit(f"the container ended:\n{log_path.read_text()[-3000:]}")
            result["start_seconds"] = round(time.monotonic() - started, 1)
            leader = int(
                subprocess.run(
                    ["pgrep", "-P", str(boot.pid)], capture_output=True, text=True
                ).stdout.split()[0]
            )
            result.update(
                run_task(gitea, first_uid, timeout, lambda: descendants(boot.pid, named=True))
            )
            result["main_process"] = in_namespace(
                leader, "sh", "-c",
                "grep -E '^(Uid|Gid|CapEff|CapBnd)' "
                "/proc/$(systemctl show --property MainPID --value kugetsu)/status",
            ).split("\n")  # fmt: skip
            journal = in_namespace(leader, "journalctl", "--unit", "kugetsu", "--output", "cat")
            result.update(log_lines(journal))
            result["systemctl_status"] = in_namespace(
                leader, "systemctl", "status", "kugetsu", "--no-pager", "--lines", "0"
            )
        finally:
            if leader:
                in_namespace(leader, "systemctl", "poweroff")
            try:
                boot.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(boot.pid, signal.SIGKILL)
                boot.wait()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=IMAGE, help=f"default {IMAGE} (bench.image_task's)")
    parser.add_argument("--unit", choices=("root", "caps", "both"), default="both")
    parser.add_argument("--storage-driver", default="vfs", help="buildah's (default: vfs)")
    parser.add_argument(
        "--first-uid", type=int, default=20000, help="sandbox.first_uid (default 20000)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="for each task (s)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run it as root: buildah and systemd-nspawn need it")
    if healthy():
        parser.error(f"something answers on port {PORT} already; stop it first")
    units = readme_units(ROOT / "README.md")
    names = ["root", "caps"] if args.unit == "both" else [args.unit]
    started = time.monotonic()
    container, rootfs = with_systemd(args.storage_driver, args.image)
    results: dict[str, Any] = {
        "image": args.image,
        "systemd": (rootfs / "usr/lib/systemd/systemd").exists(),
        "prepare_seconds": round(time.monotonic() - started, 1),
    }
    try:
        for name in names:
            with tempfile.TemporaryDirectory(prefix="kugetsu-systemd-task-") as d:
                result = boot_and_run(
                    rootfs, MACHINE, units[name], args.first_uid, args.timeout, Path(d)
                )
            results[name] = result
            print(f"== unit {name}:\n{result['unit']}")
            print(result["systemctl_status"])
            print("main process:", *result["main_process"], sep="\n  ")
            print_task(result)
    finally:
        buildah(args.storage_driver, "rm", container)
    print(f"wrote {write_result('systemd_task', results)}")
    return 0 if all(task_ok(results[name]) for name in names) else 1


if __name__ == "__main__":
    sys.exit(main())
