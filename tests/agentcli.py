"""Pinned real agent CLIs for tests, installed from their registries once and cached between runs.

    path = ensure("opencode")      # .../opencode-ai@1.18.33/node_modules/.bin/opencode
    path = ensure("aider")         # .../aider-chat@0.86.2/bin/aider

The cache lives in $KUGETSU_TEST_CACHE, else ~/.cache/kugetsu-tests (as root, where the sandbox's
slot uids must run the CLIs: /var/cache/kugetsu-tests, not root's private home): one npm prefix
per npm package and version, one virtualenv per PyPI package and version. aider's virtualenv is
filled by uv (itself pinned, pip-installed into that virtualenv first; pip if uv fails): the same
packages pip resolves, several times faster than pip with nothing cached. `CLIUnavailable` means
the CLI cannot be installed here (no npm, an interpreter aider does not support, or no registry);
tests skip on it and on nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pin:
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    exe: str


PINNED: dict[str, Pin] = {
    "opencode": Pin("npm", "opencode-ai", "1.18.33", "opencode"),
    "codex": Pin("npm", "@openai/codex", "0.169.0", "codex"),
    "claude": Pin("npm", "@anthropic-ai/claude-code", "2.1.197", "claude"),
    "aider": Pin("pypi", "aider-chat", "0.86.2", "aider"),
}

#: the installer that fills a PyPI CLI's virtualenv
UV_VERSION = "0.13.8"
#: the Pythons aider-chat 0.86.2 declares (Requires-Python: >=3.10,<3.13)
PYPI_PYTHONS = {"aider-chat": ((3, 10), (3, 12))}
#: written into a virtualenv last: one without it is an interrupted install, made again
INSTALLED_MARK = ".kugetsu-installed"

INSTALL_TIMEOUT = 600

# what npm, pip and uv say when they cannot reach the registry (no network, DNS, proxy,
# offline cache miss)
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
    "dns error",
    "Failed to fetch",
    "error sending request",
    "Connection refused",
    "Temporary failure in name resolution",
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
    return PINNED[name].version


def ensure(name: str) -> Path:
    """The path of the pinned CLI `name`, installing it into the cache first if needed."""
    if name not in PINNED:
        raise ValueError(f"no pinned CLI called {name!r}; known: {', '.join(sorted(PINNED))}")
    pin = PINNED[name]
    prefix = cache_dir() / f"{pin.package}@{pin.version}"
    if pin.registry == "npm":
        binary = prefix / "node_modules" / ".bin" / pin.exe
        if not binary.exists():
            _npm_install(pin, prefix)
    else:
        binary = prefix / "bin" / pin.exe
        if not (prefix / INSTALLED_MARK).exists():
            _pypi_install(pin, prefix)
    if not binary.exists():
        raise RuntimeError(f"installed {pin.package}@{pin.version} but {binary} is missing")
    return binary


def _run(argv: list[str], what: str) -> None:
    """Run one install step; a registry that cannot be reached is `CLIUnavailable`."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise CLIUnavailable(
            f"{what} did not finish in {INSTALL_TIMEOUT} s (registry unreachable?)"
        ) from None
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        if any(marker.lower() in message.lower() for marker in _NETWORK_ERRORS):
            raise CLIUnavailable(
                f"registry unreachable for {what}: "
                f"{message.splitlines()[-1] if message else proc.returncode}"
            )
        raise RuntimeError(f"{what} failed ({proc.returncode}): {message[-2000:]}")


def _npm_install(pin: Pin, prefix: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise CLIUnavailable(f"npm is not on PATH, cannot install {pin.package}@{pin.version}")
    prefix.mkdir(parents=True, exist_ok=True)
    _run(
        [
            npm,
            "install",
            "--prefix",
            str(prefix),
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            f"{pin.package}@{pin.version}",
        ],
        f"npm install {pin.package}@{pin.version}",
    )
    _share()


def _pypi_install(pin: Pin, prefix: Path) -> None:
    """A virtualenv of its own, made with this interpreter's base Python (one the sandbox's uids
    can run where CI runs), and the package installed into it by uv; by pip where uv fails."""
    lowest, highest = PYPI_PYTHONS.get(pin.package, ((3, 0), (99, 0)))
    if not lowest <= sys.version_info[:2] <= highest:
        raise CLIUnavailable(
            f"{pin.package}@{pin.version} needs Python {lowest[0]}.{lowest[1]} to "
            f"{highest[0]}.{highest[1]}, this is {sys.version_info[0]}.{sys.version_info[1]}"
        )
    shutil.rmtree(prefix, ignore_errors=True)  # an interrupted install is made again
    prefix.parent.mkdir(parents=True, exist_ok=True)
    what = f"installing {pin.package}=={pin.version}"
    _run([sys.executable, "-m", "venv", str(prefix)], f"{what} (virtualenv)")
    python = str(prefix / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, f"uv=={UV_VERSION}"], f"{what} (pip install uv=={UV_VERSION})")
    uv = [str(prefix / "bin" / "uv"), "pip", "install", "--quiet", "--no-cache", "--python"]
    try:
        _run([*uv, python, f"{pin.package}=={pin.version}"], f"{what} with uv")
    except (CLIUnavailable, RuntimeError):
        # pip reached its index a moment ago; uv knows only PyPI and its own settings
        _run([*pip, f"{pin.package}=={pin.version}"], f"{what} with pip")
    _share()
    (prefix / INSTALLED_MARK).write_text(f"{pin.package}=={pin.version}\n")


def _share() -> None:
    """Readable and runnable by every uid (the sandbox's slots), whatever the umask was."""
    subprocess.run(["chmod", "-R", "o+rX", str(cache_dir())], check=True)
