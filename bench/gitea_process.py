"""A fake Gitea in a process of its own, so its work does not share a GIL with a client.

    python -m bench.gitea_process --root DIR --issues 500 [--age SECONDS]

Creates the test repository (with alice as a writer) and that many issues (last updated
`--age` seconds ago), prints one JSON line {"url": ...} on stdout, and serves until its
stdin is closed. Meanwhile each JSON line on stdin acts as a person would, and is answered
with "ok": {"op": "comment", "number": N, "login": L, "body": TEXT} or {"op": "label",
"number": N, "login": L, "label": NAME}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
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
    parser.add_argument("--age", type=float, default=0.0, help="issues last updated so long ago")
    args = parser.parse_args()

    from tests.fakegitea import FakeGitea

    with FakeGitea(args.root, token=TOKEN) as gitea:
        gitea.create_repo(REPO, files={"README.md": "# widget\n"})
        gitea.set_permission(REPO, "alice", "write")
        old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - args.age))
        for i in range(args.issues):
            n = gitea.create_issue(REPO, f"Issue {i + 1}", "Something to do.")
            if args.age:
                gitea.issue(REPO, n).update(created_at=old, updated_at=old)
        if args.oauth_redirect:
            from tests.dashboard import CLIENT_ID, CLIENT_SECRET

            gitea.register_oauth_app(CLIENT_ID, CLIENT_SECRET, args.oauth_redirect)
        print(json.dumps({"url": gitea.url}), flush=True)
        for line in sys.stdin:  # until the parent closes the pipe
            op = json.loads(line)
            if op["op"] == "comment":
                gitea.add_comment(REPO, op["number"], op["body"], login=op["login"])
            elif op["op"] == "label":
                gitea.add_labels(REPO, op["number"], op["label"], login=op["login"])
            print("ok", flush=True)
    return 0


class GiteaProcess:
    """Starts `bench.gitea_process` and stops it again; `url` once started."""

    def __init__(self, root: Path, issues: int = 0, age: float = 0.0, oauth_redirect: str = ""):
        self.root, self.issues, self.age = root, issues, age
        self.oauth_redirect = oauth_redirect
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
                "--age",
                str(self.age),
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

    def act(self, **op: object) -> None:
        """Act on the fake Gitea as a person would (see the module's docstring)."""
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(op) + "\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "ok":
            raise RuntimeError(f"the fake Gitea did not do {op}")

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
