"""A fake Gitea in a process of its own, so its work does not share a GIL with a client.

    python -m bench.gitea_process --root DIR --issues 500

Creates the test repository (with alice as a writer) and that many issues, prints one JSON
line {"url": ...} on stdout, and serves until its stdin is closed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, ROOT, TOKEN


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--issues", type=int, default=0)
    parser.add_argument(
        "--oauth-redirect", default="", help="register the dashboard's OAuth2 application"
    )
    args = parser.parse_args()

    from tests.fakegitea import FakeGitea

    with FakeGitea(args.root, token=TOKEN) as gitea:
        gitea.create_repo(REPO, files={"README.md": "# widget\n"})
        gitea.set_permission(REPO, "alice", "write")
        for i in range(args.issues):
            gitea.create_issue(REPO, f"Issue {i + 1}", "Something to do.")
        if args.oauth_redirect:
            from tests.dashboard import CLIENT_ID, CLIENT_SECRET

            gitea.register_oauth_app(CLIENT_ID, CLIENT_SECRET, args.oauth_redirect)
        print(json.dumps({"url": gitea.url}), flush=True)
        sys.stdin.read()  # until the parent closes the pipe
    return 0


class GiteaProcess:
    """Starts `bench.gitea_process` and stops it again; `url` once started."""

    def __init__(self, root: Path, issues: int = 0, oauth_redirect: str = ""):
        self.root, self.issues, self.oauth_redirect = root, issues, oauth_redirect
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> GiteaProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.gitea_process",
                "--root",
                str(self.root),
                "--issues",
                str(self.issues),
                "--oauth-redirect",
                self.oauth_redirect,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"fake Gitea process exited with {self.proc.returncode}")
        self.url = json.loads(line)["url"]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
