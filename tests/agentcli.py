"""Pinned real agent CLIs for tests, installed from npm once and cached between runs.

    path = ensure("opencode")      # .../opencode-ai@1.18.33/node_modules/.bin/opencode

The cache lives in $KUGETSU_TEST_CACHE, else ~/.cache/kugetsu-tests (as root, where the sandbox's
slot uids must run the CLIs: /var/cache/kugetsu-tests, not root's private home), one npm prefix per
package and version. `CLIUnavailable` means npm is missing or the registry cannot be reached; tests
skip on it
and on nothing else. aider is not installed here (a 77 s, 687 MB pip install); its parser is tested
on recorded output only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

#: name -> (npm package, version, executable name)
PINNED: dict[str, tuple[str, str, str]] = {
    "opencode": ("opencode-ai", "1.18.33", "opencode"),
    "codex": ("@openai/codex", "0.169.0", "codex"),
    "claude": ("@anthropic-ai/claude-code", "2.1.197", "claude"),
}

INSTALL_TIMEOUT = 600

# npm's messages when it cannot reach the registry (no network, DNS, proxy, offline cache miss)
_NETWORK_ERRORS = (
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ECONNRESET",
    "ETIMEDOUT",
    "ENETUNREACH",
    "EHOSTUNREACH",
    "network",
    "ENOTCACHED",
    "proxy",
    "socket hang up",
    "getaddrinfo",
)


class CLIUnavailable(RuntimeError):
    """The CLI cannot be installed here (no npm, or no registry); the reason says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def cache_dir() -> Path:
    root = os.environ.get("KUGETSU_TEST_CACHE")
    if root:
        return Path(root).expanduser()
    if os.geteuid() == 0:  # sandboxed agents run as other uids: not under root's 0700 home
        return Path("/var/cache/kugetsu-tests")
    return Path.home() / ".cache" / "kugetsu-tests"


def version(name: str) -> str:
    return PINNED[name][1]


def ensure(name: str) -> Path:
    """The path of the pinned CLI `name`, installing it into the cache first if needed."""
    if name not in PINNED:
        raise ValueError(f"no pinned CLI called {name!r}; known: {', '.join(sorted(PINNED))}")
    package, ver, exe = PINNED[name]
    prefix = cache_dir() / f"{package}@{ver}"
    binary = prefix / "node_modules" / ".bin" / exe
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise CLIUnavailable(f"npm is not on PATH, cannot install {package}@{ver}")
    prefix.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(prefix),
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                f"{package}@{ver}",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise CLIUnavailable(
            f"npm install {package}@{ver} did not finish in {INSTALL_TIMEOUT} s "
            f"(registry unreachable?)"
        ) from None
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        if any(marker.lower() in message.lower() for marker in _NETWORK_ERRORS):
            raise CLIUnavailable(
                f"npm registry unreachable installing {package}@{ver}: "
                f"{message.splitlines()[-1] if message else proc.returncode}"
            )
        raise RuntimeError(
            f"npm install {package}@{ver} failed ({proc.returncode}): {message[-2000:]}"
        )
    if not binary.exists():
        raise RuntimeError(f"npm installed {package}@{ver} but {binary} is missing")
    # readable and runnable by every uid (the sandbox's slots), whatever the umask was
    subprocess.run(["chmod", "-R", "o+rX", str(cache_dir())], check=True)
    return binary
