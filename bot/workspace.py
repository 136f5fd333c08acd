"""Git workspaces: one bare mirror per repository, one worktree per issue.

This is the only module that runs git. Layout:

    <mirrors_dir>/<owner>/<name>.git         bare mirror, remote "origin"; remote branches are
                                             fetched into refs/remotes/origin/*, never refs/heads/*
    <worktrees_dir>/<owner>/<name>/<issue>   git worktree of that mirror on the task's branch

Every git command runs with an environment that ignores the host's git configuration and
credentials (no system or global config, a private empty HOME, no prompts). The token reaches
git only through the environment form of config (`GIT_CONFIG_KEY_0=http.extraHeader`) and only
for commands that talk to the remote; it is never put in argv, a URL, a file or a message.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bot.core import names
from bot.redact import redact

log = logging.getLogger(__name__)

REMOTE = "origin"
#: where the mirror keeps the branches of forks it fetched or pushed (outside refs/remotes,
#: which a fetch prunes)
FORK_REFS = "refs/kugetsu/forks"
FETCH_REFSPEC = "+refs/heads/*:refs/remotes/origin/*"

#: Passed as `-c` to every command: nothing an agent writes into the shared mirror config
#: (hooks, signing, credential helpers) runs when kugetsu itself calls git.
_SAFE_CONFIG = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "commit.gpgSign=false",
    "tag.gpgSign=false",
    "credential.helper=",
    "gc.autoDetach=false",
    "advice.detachedHead=false",
    "init.defaultBranch=main",
)

#: Environment variables of the host kept for git (TLS and proxy settings); every other GIT_*
#: variable is dropped so an inherited GIT_DIR, GIT_CONFIG_* or trace setting changes nothing.
_KEEP_GIT_ENV_PREFIXES = ("GIT_SSL_", "GIT_HTTP_", "GIT_PROXY_SSL_")

_SHA_RE = re.compile(r"^[0-9a-fA-F]{4,64}$")
_MAX_ERROR_CHARS = 2000

Runner = Callable[..., "subprocess.CompletedProcess[bytes]"]


#: never committed, whatever the agent does: aider's repo-map cache and history files
AGENT_LITTER = (".aider*",)


class GitError(Exception):
    """A git step failed. The message names the step and carries git's stderr, scrubbed."""

    def __init__(self, message: str, *, step: str = "", returncode: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.returncode = returncode


@dataclass(frozen=True)
class Fetched:
    """The repository's mirror just fetched: its default branch and that branch's commit."""

    repo: str
    default_branch: str
    default_sha: str


@dataclass(frozen=True)
class RepoFile:
    """A file read from a commit in the mirror: its path, its blob's id, and its bytes,
    or why it could not be read (`problem`; the bytes are then empty)."""

    path: str
    blob: str
    data: bytes = b""
    problem: str | None = None


@dataclass(frozen=True)
class Prepared:
    path: Path
    branch: str
    base_branch: str
    base_sha: str
    reused: bool


def run_command(
    args: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    stdin: Any = None,
    stdout: Any = None,
    stderr: Any = None,
    timeout: float | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Like `subprocess.run`, but the command gets its own process group and a timeout kills
    the whole group, so helpers git spawns (git-remote-http, index-pack) cannot keep the
    pipes open after the timeout. It stays in the caller's session, where its inherited
    niceness counts (bot.priority)."""
    with subprocess.Popen(
        list(args),
        cwd=cwd,
        env=env,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        process_group=0,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(
                proc.args, timeout or 0.0, output=out, stderr=err
            ) from None
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        returncode = proc.poll()
    assert returncode is not None
    if check and returncode:
        raise subprocess.CalledProcessError(returncode, proc.args, out, err)
    return subprocess.CompletedProcess(proc.args, returncode, out, err)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class Workspace:
    def __init__(
        self,
        *,
        mirrors_dir: Path,
        worktrees_dir: Path,
        remote_url: Callable[[str], str],
        token: str = "",
        author_name: str = "kugetsu",
        author_email: str = "kugetsu@localhost",
        timeout: float = 600.0,
        secrets: Sequence[str] = (),
        runner: Runner | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._mirrors_dir = Path(os.path.abspath(mirrors_dir))
        self._worktrees_dir = Path(os.path.abspath(worktrees_dir))
        self._home = self._mirrors_dir.parent / ".git-home"
        self._remote_url_fn = remote_url
        self._token = token
        self._author_name = author_name
        self._author_email = author_email
        self._timeout = timeout
        self._secrets = tuple(s for s in (token, *secrets) if s)
        self._runner: Runner = runner or run_command
        self._clock = clock
        self._home_ready = False

    # ------------------------------------------------------------------ public API

    def fetch(self, repo: str) -> Fetched:
        """Fetch the repository's mirror (made if need be) from Gitea."""
        owner, name = _split_repo(repo)
        url = self._checked_remote_url(repo)
        with self._repo_lock(owner, name):
            return self._fetch(owner, name, url, repo)

    def _fetch(self, owner: str, name: str, url: str, repo: str) -> Fetched:
        mirror = self._ensure_mirror(owner, name, url, repo)
        head_symref = self._remote_head(mirror, url)
        self._git(
            ["fetch", "--prune", "--no-tags", "--quiet", REMOTE, FETCH_REFSPEC],
            git_dir=mirror,
            step="fetch",
            network=url,
        )
        log.info("mirror fetched", extra={"repo": repo})
        default = self._default_branch(mirror, head_symref)
        sha = self._ref_sha(f"refs/remotes/{REMOTE}/{default}", git_dir=mirror)
        assert sha is not None  # _default_branch found it
        return Fetched(repo, default, sha)

    def read_file(
        self, repo: str, commit: str, paths: Sequence[str], max_bytes: int
    ) -> RepoFile | None:
        """The first of `paths` that commit `commit` of the mirror holds, read with git
        (never from a worktree, where an agent could have changed it), or None when it
        holds none of them. A path that is not a regular file (a link, a folder, a
        submodule), or a file larger than `max_bytes`, is not read: its `problem` says so."""
        owner, name = _split_repo(repo)
        _check_sha(commit)
        mirror = self._mirror_path(owner, name)
        for path in paths:
            listed = self._git(
                ["--literal-pathspecs", "ls-tree", "-z", "--full-tree", "-l", commit, "--", path],
                git_dir=mirror,
                step="ls-tree",
            ).stdout
            entry = listed.split(b"\0", 1)[0]
            if not entry:
                continue
            meta, _, found = entry.partition(b"\t")
            mode, kind, blob, size = meta.decode().split()
            if os.fsdecode(found) != path:
                continue
            if kind != "blob" or mode not in ("100644", "100755"):
                return RepoFile(path, blob, problem="it is not a regular file")
            if int(size) > max_bytes:
                return RepoFile(path, blob, problem=f"it is larger than {max_bytes} bytes")
            data = self._git(["cat-file", "blob", blob], git_dir=mirror, step="cat-file").stdout
            return RepoFile(path, blob, data[:max_bytes])
        return None

    def prepare(
        self,
        repo: str,
        issue: int,
        branch: str,
        *,
        base: str | None = None,
        source: str | None = None,
        fetched: Fetched | None = None,
    ) -> Prepared:
        """Fetch the mirror (unless `fetched` says it was just fetched) and return the
        issue's worktree on `branch`, reusing it when valid.

        `base`: the branch the work is to be merged into (the default branch if None).
        `source`: the repository that holds `branch` when it is not `repo` itself (the fork
        of a pull request); its branch is fetched into the mirror beside `repo`'s."""
        owner, name = _split_repo(repo)
        _check_issue(issue)
        _check_branch(branch)
        if base is not None:
            _check_branch(base)
        url = self._checked_remote_url(repo)
        source_url = None
        if source is not None:
            _split_repo(source)
            source_url = self._checked_remote_url(source)
        tracking = self._tracking_ref(branch, source)
        wt = self._worktree_path(owner, name, issue)
        with self._repo_lock(owner, name):
            if fetched is None or fetched.repo != repo:
                fetched = self._fetch(owner, name, url, repo)
                mirror = self._mirror_path(owner, name)
            else:  # its config written again before use, as every use does
                mirror = self._ensure_mirror(owner, name, url, repo)
            if source_url is not None:
                self._git(
                    [
                        "fetch",
                        "--no-tags",
                        "--quiet",
                        source_url,
                        f"+refs/heads/{branch}:{tracking}",
                    ],
                    git_dir=mirror,
                    step="fetch fork",
                    network=source_url,
                )
            default = fetched.default_branch
            default_ref = f"refs/remotes/{REMOTE}/{default}"
            into = base or default
            base_ref = f"refs/remotes/{REMOTE}/{into}"
            if self._ref_sha(base_ref, git_dir=mirror) is None:
                raise GitError(f"the branch {into} is not on Gitea", step="fetch")

            reused = self._is_worktree_of(wt, mirror, branch)
            if reused:
                log.info("worktree reused", extra={"repo": repo, "issue": issue, "branch": branch})
                remote_sha = self._ref_sha(tracking, git_dir=mirror)
                if remote_sha and not self._is_ancestor(remote_sha, "HEAD", cwd=wt):
                    # someone pushed to the branch since (a fix on the pull request): the
                    # follow-up builds on those commits, and its push can never drop them
                    self._catch_up(wt, remote_sha, repo, issue, branch)
            else:
                self._create_worktree(mirror, wt, branch, default_ref, repo, issue, tracking)

            merged = self._git(
                ["merge-base", "HEAD", base_ref], cwd=wt, step="merge-base", ok=(0, 1)
            )
            base_sha = merged.stdout.decode().strip()
            if merged.returncode != 0 or not base_sha:
                raise GitError(
                    f"git merge-base failed: {branch} shares no history with {into}",
                    step="merge-base",
                    returncode=merged.returncode,
                )
            with contextlib.suppress(OSError):
                os.utime(wt)
        return Prepared(path=wt, branch=branch, base_branch=into, base_sha=base_sha, reused=reused)

    def worktree_path(self, repo: str, issue: int) -> Path:
        """Where the issue's worktree is (or will be)."""
        owner, name = _split_repo(repo)
        _check_issue(issue)
        return self._worktree_path(owner, name, issue)

    @contextlib.contextmanager
    def lent(self, path: Path) -> Iterator[None]:
        """While the worktree is lent to another uid (the sandbox), kugetsu's user cannot
        look into it, and `git worktree prune` for another issue would take its directory
        for gone and forget it. Locked, it is kept."""
        wt = self._checked_worktree(path)
        owner, name, _ = self._locate(wt)
        mirror = self._mirror_path(owner, name)
        # a lock still there is kugetsu's own, from a run it did not see end (it stopped)
        self._unlock(mirror, wt)
        self._git(
            ["worktree", "lock", "--reason", "lent to an agent's uid", str(wt)],
            git_dir=mirror,
            step="worktree lock",
        )
        try:
            yield
        finally:
            self._unlock(mirror, wt)

    def _unlock(self, mirror: Path, wt: Path) -> None:
        """The worktree's registration unlocked; 128: it was not locked."""
        self._git(
            ["worktree", "unlock", str(wt)], git_dir=mirror, step="worktree unlock", ok=(0, 128)
        )

    def commit_all(self, path: Path, message: str) -> bool:
        """Stage everything (respecting .gitignore) and commit as the configured author.
        Returns True when a commit was made, False when there was nothing to commit."""
        wt = self._checked_worktree(path)
        if not message.strip():
            raise GitError("git commit refused: empty commit message", step="commit")
        self._git(["add", "--all"], cwd=wt, step="add")
        staged = self._git(["diff", "--cached", "--quiet"], cwd=wt, step="diff", ok=(0, 1))
        if staged.returncode == 0:
            return False
        self._git(
            ["commit", "--quiet", "--no-verify", "--no-gpg-sign", "-m", message],
            cwd=wt,
            step="commit",
        )
        log.info("commit created", extra={"worktree": _rel_label(wt, self._worktrees_dir)})
        return True

    def changed_files(self, prepared_or_path: Prepared | Path | str, base_sha: str) -> list[str]:
        """Paths that differ between `base_sha` and HEAD (a rename lists both names)."""
        path = prepared_or_path.path if isinstance(prepared_or_path, Prepared) else prepared_or_path
        wt = self._checked_worktree(Path(path))
        _check_sha(base_sha)
        out = self._git(
            ["diff", "--name-only", "--no-renames", "-z", base_sha, "HEAD", "--"],
            cwd=wt,
            step="diff",
        ).stdout
        return sorted({os.fsdecode(p) for p in out.split(b"\0") if p})

    def head(self, path: Path) -> str:
        """The commit the worktree's HEAD points at."""
        wt = self._checked_worktree(Path(path))
        return (
            self._git(["rev-parse", "--verify", "HEAD^{commit}"], cwd=wt, step="rev-parse")
            .stdout.decode()
            .strip()
        )

    def has_new_commits(self, path: Path, base_sha: str) -> bool:
        wt = self._checked_worktree(path)
        _check_sha(base_sha)
        out = self._git(
            ["rev-list", "--count", f"{base_sha}..HEAD", "--"], cwd=wt, step="rev-list"
        ).stdout
        return int(out.decode().strip() or "0") > 0

    def contains(self, path: Path, sha: str) -> bool:
        """True if commit `sha` is the worktree's HEAD or one of its ancestors."""
        wt = self._checked_worktree(path)
        _check_sha(sha)
        return self._is_ancestor(sha, "HEAD", cwd=wt)

    def push(
        self, path: Path, branch: str, *, source: str | None = None, force: bool = True
    ) -> str:
        """Push HEAD to `refs/heads/<branch>` of the repository (or of `source`, the fork
        that holds the branch; see `prepare`). Returns the pushed sha.

        kugetsu's own branches are pushed with a lease on the last fetched remote sha;
        with `force` False (a branch a person owns) the push is a plain one, which Gitea
        takes only as a fast-forward: their commits are never rewritten."""
        _check_branch(branch)
        wt = self._checked_worktree(path)
        owner, name, issue = self._locate(wt)
        url = self._checked_remote_url(source or f"{owner}/{name}")
        tracking = self._tracking_ref(branch, source)
        with self._repo_lock(owner, name):
            head = (
                self._git(["rev-parse", "--verify", "HEAD^{commit}"], cwd=wt, step="rev-parse")
                .stdout.decode()
                .strip()
            )
            lease = self._ref_sha(tracking, cwd=wt) or ""
            how = [f"--force-with-lease=refs/heads/{branch}:{lease}"] if force else []
            self._git(
                [
                    "push",
                    "--quiet",
                    "--no-verify",
                    *how,
                    REMOTE if source is None else url,
                    f"{head}:refs/heads/{branch}",
                ],
                cwd=wt,
                step="push",
                network=url,
            )
            self._git(["update-ref", tracking, head], cwd=wt, step="update-ref")
        log.info(
            "branch pushed", extra={"repo": f"{owner}/{name}", "issue": issue, "branch": branch}
        )
        return head

    @staticmethod
    def _tracking_ref(branch: str, source: str | None) -> str:
        """Where the mirror keeps the last fetched sha of `branch`: of the repository
        itself, or of the fork `source` (outside refs/remotes, which fetch prunes)."""
        if source is None:
            return f"refs/remotes/{REMOTE}/{branch}"
        return f"{FORK_REFS}/{source}/{branch}"

    def remote_branch_sha(self, repo: str, branch: str) -> str | None:
        """The sha of `branch` on the remote now, or None when the remote has no such branch."""
        _split_repo(repo)
        _check_branch(branch)
        url = self._checked_remote_url(repo)
        ref = f"refs/heads/{branch}"
        out = self._git(
            ["ls-remote", url, ref], cwd=self._ensure_home(), step="ls-remote", network=url
        ).stdout.decode()
        for line in out.splitlines():
            sha, _, name = line.partition("\t")
            if name.strip() == ref:
                return sha.strip()
        return None

    def remove(self, repo: str, issue: int) -> None:
        """Remove the issue's worktree and prune its registration; the mirror stays."""
        owner, name = _split_repo(repo)
        _check_issue(issue)
        wt = self._worktree_path(owner, name, issue)
        with self._repo_lock(owner, name):
            self._remove_worktree(owner, name, wt)
        log.info("worktree removed", extra={"repo": repo, "issue": issue})

    def cleanup(self, older_than_seconds: float, *, keep: Collection[Path] = ()) -> list[Path]:
        """Remove worktrees not touched for `older_than_seconds`. Paths in `keep` (worktrees of
        running tasks) are never removed, nor is a worktree with commits that are not pushed
        (`unpushed_commits`; logged). Returns the removed paths."""
        kept = {os.path.realpath(p) for p in keep}
        removed: list[Path] = []
        for repo, issue, wt in self.worktrees():
            if os.path.realpath(wt) in kept or self.idle_seconds(wt) < older_than_seconds:
                continue
            if self.remove_if_idle(repo, issue, older_than_seconds)[0]:
                removed.append(wt)
        return removed

    def worktrees(self) -> list[tuple[str, int, Path]]:
        """(repository, issue, path) of each issue's worktree directory on disk."""
        found = []
        for owner_dir in _subdirs(self._worktrees_dir):
            for name_dir in _subdirs(owner_dir):
                owner, name = owner_dir.name, name_dir.name
                if _valid_name(owner) and _valid_name(name):
                    found += [
                        (f"{owner}/{name}", int(wt.name), wt)
                        for wt in _subdirs(name_dir)
                        if wt.name.isdigit()
                    ]
        return found

    def idle_seconds(self, wt: Path) -> float:
        """How long ago the worktree was last used (by kugetsu's git or the agent's)."""
        return self._clock() - _last_touched(wt)

    def unpushed_commits(self, path: Path, also: Sequence[str] = ()) -> int:
        """Commits of the worktree's HEAD that no branch of the remote holds, as the mirror
        last fetched them, nor a fork's branch it fetched or pushed, nor any commit in
        `also` (a pull request's head, which Gitea keeps after its branch is deleted). A
        commit named in `also` that is not here is left out. GitError if git cannot tell."""
        wt = self._checked_worktree(path)
        for sha in also:
            _check_sha(sha)
        out = self._git(
            [
                "rev-list",
                "--count",
                "--ignore-missing",
                "HEAD",
                "--not",
                f"--remotes={REMOTE}",
                f"--glob={FORK_REFS}/*",
                *also,
            ],
            cwd=wt,
            step="rev-list",
        ).stdout
        return int(out.decode().strip() or "0")

    def remove_if_idle(
        self, repo: str, issue: int, older_than_seconds: float
    ) -> tuple[bool, int | None]:
        """Remove the issue's worktree if it has not been used for `older_than_seconds` and
        every commit of it is pushed; checked under the repository's lock, so a task that
        has just taken it up keeps it. Returns (removed, commits not pushed: None when git
        cannot tell, which keeps it too)."""
        owner, name = _split_repo(repo)
        _check_issue(issue)
        wt = self._worktree_path(owner, name, issue)
        with self._repo_lock(owner, name):
            if not self._is_stale(wt, older_than_seconds):
                return False, 0
            try:
                unpushed = self.unpushed_commits(wt) if (wt / ".git").is_file() else 0
            except GitError as exc:
                log.warning(
                    "worktree kept: cannot tell what is pushed",
                    extra={"repo": repo, "issue": issue, "error": str(exc)},
                )
                return False, None
            if unpushed:
                log.warning(
                    "worktree kept: commits not pushed",
                    extra={"repo": repo, "issue": issue, "unpushed": unpushed},
                )
                return False, unpushed
            self._remove_worktree(owner, name, wt)
        log.info("worktree cleaned up", extra={"repo": repo, "issue": issue})
        return True, 0

    # ------------------------------------------------------------------ mirror and worktrees

    def _ensure_mirror(self, owner: str, name: str, url: str, repo: str) -> Path:
        mirror = self._mirror_path(owner, name)
        if not _looks_like_bare_repo(mirror):
            if mirror.exists() or mirror.is_symlink():
                log.warning("mirror is not a git repository, recreating", extra={"repo": repo})
                remove_tree(mirror)
            tmp = mirror.with_name(f".{mirror.name}.tmp-{uuid.uuid4().hex}")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._git(
                    ["init", "--bare", "--quiet", "--template=", str(tmp)],
                    cwd=tmp.parent,
                    step="init mirror",
                )
                tmp.rename(mirror)  # its config is written below
            except BaseException:
                remove_tree(tmp, missing_ok=True)
                raise
            log.info("mirror created", extra={"repo": repo})
        # every time: the configured URL may have changed, and an agent may have written
        # into the config its worktree shares
        self._reset_config(mirror, url)
        self._write_excludes(mirror)
        return mirror

    def _catch_up(self, wt: Path, remote_sha: str, repo: str, issue: int, branch: str) -> None:
        """Bring the worktree up to the branch on Gitea: a fast-forward, or a merge when it
        has commits of its own; a conflict is an error, with the worktree left as it was."""
        merge = self._git(
            ["merge", "--quiet", "--no-edit", remote_sha], cwd=wt, step="merge", ok=(0, 1, 128)
        )
        if merge.returncode != 0:
            self._git(["merge", "--abort"], cwd=wt, step="merge abort", ok=(0, 128))
            raise GitError(
                f"the branch {branch} on Gitea has commits that conflict with this "
                "worktree's; merge them by hand, then ask again",
                step="merge",
                returncode=merge.returncode,
            )
        log.info(
            "worktree caught up with the remote branch",
            extra={"repo": repo, "issue": issue, "branch": branch},
        )

    @staticmethod
    def _reset_config(mirror: Path, url: str) -> None:
        """Replace the mirror's config with kugetsu's own.

        Every worktree reads this file, and an agent can write it (`git config` in its
        worktree): a pushurl or insteadOf that sends kugetsu's push elsewhere, a filter or
        receivepack command that kugetsu's own git would run. Written whole before kugetsu
        uses the mirror (and atomically, since other worktrees read it meanwhile).
        """
        text = (
            "# written by kugetsu; replaced before every use\n"
            "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n"
            f'[remote "{REMOTE}"]\n\turl = {_config_value(url)}\n'
            f"\tfetch = {FETCH_REFSPEC}\n"
        )
        path = mirror / "config"
        tmp = mirror / f".config.tmp-{uuid.uuid4().hex}"
        tmp.write_text(text)
        os.replace(tmp, path)

    @staticmethod
    def _write_excludes(mirror: Path) -> None:
        """Files agents leave behind that must never be committed; shared by all worktrees."""
        exclude = mirror / "info" / "exclude"
        text = "# written by kugetsu: agent state that is not part of the change\n" + "".join(
            f"{pattern}\n" for pattern in AGENT_LITTER
        )
        if not exclude.exists() or exclude.read_text() != text:
            exclude.parent.mkdir(parents=True, exist_ok=True)
            exclude.write_text(text)

    def _remote_head(self, mirror: Path, url: str) -> str | None:
        out = self._git(
            ["ls-remote", "--symref", REMOTE, "HEAD"], git_dir=mirror, step="ls-remote", network=url
        ).stdout.decode()
        for line in out.splitlines():
            target, _, name = line.partition("\t")
            if name.strip() == "HEAD" and target.startswith("ref: refs/heads/"):
                return target[len("ref: refs/heads/") :].strip()
        return None

    def _default_branch(self, mirror: Path, head_symref: str | None) -> str:
        candidates = [head_symref] if head_symref else ["main", "master"]
        for candidate in candidates:
            if self._ref_sha(f"refs/remotes/{REMOTE}/{candidate}", git_dir=mirror):
                return candidate
        raise GitError(
            "remote has no default branch (is the repository empty?)", step="default branch"
        )

    def _create_worktree(
        self,
        mirror: Path,
        wt: Path,
        branch: str,
        default_ref: str,
        repo: str,
        issue: int,
        remote_ref: str,
    ) -> None:
        if wt.exists() or wt.is_symlink():
            log.warning("stale worktree directory replaced", extra={"repo": repo, "issue": issue})
            remove_tree(wt)
        # a registration of this path still locked (kugetsu stopped while it was lent) is
        # not pruned; it is this issue's own, so it is unlocked first
        self._unlock(mirror, wt)
        # forget registrations whose directory is gone, so the path and branch are free again
        self._git(["worktree", "prune"], git_dir=mirror, step="worktree prune")
        from_remote = self._ref_sha(remote_ref, git_dir=mirror) is not None
        start = remote_ref if from_remote else default_ref
        wt.parent.mkdir(parents=True, exist_ok=True)
        self._git(
            ["worktree", "add", "--quiet", "--no-track", "-B", branch, str(wt), start],
            git_dir=mirror,
            step="worktree add",
        )
        log.info(
            "worktree created",
            extra={
                "repo": repo,
                "issue": issue,
                "branch": branch,
                "from_remote_branch": from_remote,
            },
        )

    def _is_worktree_of(self, wt: Path, mirror: Path, branch: str) -> bool:
        if wt.is_symlink() or not (wt / ".git").is_file():
            return False
        try:
            info = self._worktree_info(wt)
        except GitError:
            return False
        return (
            info.get("common") == os.path.realpath(mirror)
            and info.get("toplevel") == os.path.realpath(wt)
            and info.get("head") == f"refs/heads/{branch}"
        )

    def _worktree_info(self, wt: Path) -> dict[str, str]:
        out = (
            self._git(
                [
                    "rev-parse",
                    "--path-format=absolute",
                    "--git-common-dir",
                    "--show-toplevel",
                    "--symbolic-full-name",
                    "HEAD",
                ],
                cwd=wt,
                step="inspect worktree",
            )
            .stdout.decode()
            .splitlines()
        )
        if len(out) < 3:
            raise GitError(
                "git inspect worktree failed: unexpected rev-parse output", step="inspect worktree"
            )
        return {
            "common": os.path.realpath(out[0]),
            "toplevel": os.path.realpath(out[1]),
            "head": out[2].strip(),
        }

    def _checked_worktree(self, path: Path) -> Path:
        """The absolute worktree path, after checking that it is the root of a worktree of
        the matching mirror; git never searches upwards into some other repository."""
        wt = Path(os.path.abspath(path))
        owner, name, _ = self._locate(wt)
        mirror = self._mirror_path(owner, name)
        if _looks_like_bare_repo(mirror):
            # before any git command here: the agent may have written the shared config
            self._reset_config(mirror, self._checked_remote_url(f"{owner}/{name}"))
        if wt.is_symlink() or not (wt / ".git").is_file():
            raise GitError(f"not a kugetsu worktree: {wt}", step="inspect worktree")
        info = self._worktree_info(wt)
        if info["common"] != os.path.realpath(self._mirror_path(owner, name)) or info[
            "toplevel"
        ] != os.path.realpath(wt):
            raise GitError(
                f"not a worktree of the {owner}/{name} mirror: {wt}", step="inspect worktree"
            )
        return wt

    def _locate(self, wt: Path) -> tuple[str, str, str]:
        try:
            rel = Path(os.path.realpath(wt)).relative_to(os.path.realpath(self._worktrees_dir))
        except ValueError:
            raise GitError(
                f"not under the worktrees directory: {wt}", step="inspect worktree"
            ) from None
        parts = rel.parts
        if (
            len(parts) != 3
            or not _valid_name(parts[0])
            or not _valid_name(parts[1])
            or not parts[2].isdigit()
        ):
            raise GitError(f"not a kugetsu worktree path: {wt}", step="inspect worktree")
        return parts[0], parts[1], parts[2]

    def _remove_worktree(self, owner: str, name: str, wt: Path) -> None:
        remove_tree(wt, missing_ok=True)
        mirror = self._mirror_path(owner, name)
        if _looks_like_bare_repo(mirror):
            self._git(["worktree", "prune"], git_dir=mirror, step="worktree prune")
        for parent in (wt.parent, wt.parent.parent):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only succeeds when empty

    def _is_stale(self, wt: Path, older_than_seconds: float) -> bool:
        return wt.exists() and self._clock() - _last_touched(wt) >= older_than_seconds

    # ------------------------------------------------------------------ git plumbing

    def _ref_sha(
        self, ref: str, *, git_dir: Path | None = None, cwd: Path | None = None
    ) -> str | None:
        cp = self._git(
            ["rev-parse", "--quiet", "--verify", f"{ref}^{{commit}}"],
            git_dir=git_dir,
            cwd=cwd,
            step="rev-parse",
            ok=(0, 1),
        )
        sha = cp.stdout.decode().strip()
        return sha if cp.returncode == 0 and sha else None

    def _is_ancestor(self, ancestor: str, descendant: str, *, cwd: Path) -> bool:
        # 1: not an ancestor; 128: no such commit here (as good as not an ancestor)
        cp = self._git(
            ["merge-base", "--is-ancestor", ancestor, descendant],
            cwd=cwd,
            step="merge-base",
            ok=(0, 1, 128),
        )
        return cp.returncode == 0

    def _git(
        self,
        args: Sequence[str],
        *,
        step: str,
        git_dir: Path | None = None,
        cwd: Path | None = None,
        network: str | None = None,
        ok: Collection[int] = (0,),
    ) -> subprocess.CompletedProcess[bytes]:
        argv = ["git"]
        for item in _SAFE_CONFIG:
            argv += ["-c", item]
        repository = git_dir if git_dir is not None else cwd
        if repository is not None:
            # git refuses a repository another user owns (a worktree a sandboxed agent
            # held); kugetsu's own git trusts the one it runs in, for this command only,
            # never through a global config
            argv += ["-c", f"safe.directory={os.path.abspath(repository)}"]
        if git_dir is not None:
            # explicit: a damaged mirror must fail, not make git search the parent directories
            argv.append(f"--git-dir={git_dir}")
        argv += list(args)
        run_in = (
            cwd if cwd is not None else (git_dir if git_dir is not None else self._ensure_home())
        )
        log.debug("git step", extra={"step": step})
        try:
            cp = self._runner(
                argv,
                cwd=str(run_in),
                env=self._env(network=network),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                timeout=self._timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise GitError(f"git {step} timed out after {self._timeout:g}s", step=step) from None
        except OSError as exc:
            raise GitError(self._scrub(f"git {step} could not start: {exc}"), step=step) from None
        if cp.returncode not in ok:
            detail = _trim(self._scrub(_text(cp.stderr) or _text(cp.stdout)))
            raise GitError(
                f"git {step} failed (exit {cp.returncode}): {detail}",
                step=step,
                returncode=cp.returncode,
            )
        return cp

    def _env(self, *, network: str | None) -> dict[str, str]:
        """git's environment; with `network` (the repository's URL) it carries the token,
        as a header git sends to that URL only: a push or fetch that config written by an
        agent sends somewhere else (pushurl, insteadOf) goes without it."""
        home = self._ensure_home()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GIT_") or k.startswith(_KEEP_GIT_ENV_PREFIXES)
        }
        env.update(
            {
                "HOME": str(home),
                "XDG_CONFIG_HOME": str(home / ".config"),
                "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_CONFIG_GLOBAL": os.devnull,
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_ASKPASS": "true",
                "SSH_ASKPASS": "true",
                "LC_ALL": "C",
                "GIT_CEILING_DIRECTORIES": os.pathsep.join(
                    os.path.realpath(p)
                    for p in (self._worktrees_dir, self._mirrors_dir, home.parent)
                ),
                "GIT_AUTHOR_NAME": self._author_name,
                "GIT_AUTHOR_EMAIL": self._author_email,
                "GIT_COMMITTER_NAME": self._author_name,
                "GIT_COMMITTER_EMAIL": self._author_email,
            }
        )
        if network and self._token:
            env.update(
                {
                    "GIT_CONFIG_COUNT": "1",
                    "GIT_CONFIG_KEY_0": f"http.{network}.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: token {self._token}",
                }
            )
        return env

    def _ensure_home(self) -> Path:
        if not self._home_ready:
            self._home.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._home_ready = True
        return self._home

    def _checked_remote_url(self, repo: str) -> str:
        try:
            url = os.fspath(self._remote_url_fn(repo))
        except Exception as exc:  # a bad callback must not leak through unscrubbed
            raise GitError(
                self._scrub(f"remote URL for {repo} unavailable: {exc}"), step="remote url"
            ) from None
        if not url or url.startswith("-") or any(c in url for c in "\r\n\0"):
            raise GitError(f"invalid remote URL for {repo}", step="remote url")
        has_credentials = any(s in url for s in self._secrets)
        if "://" in url:
            try:
                parts = urlsplit(url)
                has_credentials = (
                    has_credentials
                    or parts.password is not None
                    or (parts.username is not None and parts.scheme.lower() in ("http", "https"))
                )
            except ValueError:
                raise GitError(f"invalid remote URL for {repo}", step="remote url") from None
        if has_credentials:
            raise GitError(
                self._scrub(
                    f"remote URL for {repo} contains credentials ({url}); the token is sent as an "
                    "http.extraHeader instead"
                ),
                step="remote url",
            )
        return url

    def _scrub(self, text: str) -> str:
        return redact(text, self._secrets)

    # ------------------------------------------------------------------ paths and locks

    def _mirror_path(self, owner: str, name: str) -> Path:
        return self._mirrors_dir / owner / f"{name}.git"

    def _worktree_path(self, owner: str, name: str, issue: int) -> Path:
        return self._worktrees_dir / owner / name / str(issue)

    @contextlib.contextmanager
    def _repo_lock(self, owner: str, name: str) -> Iterator[None]:
        """Serialise mirror changes per repository, across threads and processes (flock)."""
        lock_path = self._mirrors_dir / owner / f"{name}.git.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- helpers


def _config_value(value: str) -> str:
    """A value quoted for a git config file (no line breaks: the URL was checked)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _valid_name(part: str) -> bool:
    """An owner's or a repository's directory: named by Gitea's rules, so never '..'."""
    return names.name_error(part, "name", names.MAX_REPO_NAME_LENGTH) is None


def _split_repo(repo: str) -> tuple[str, str]:
    try:
        return names.split_repo(repo)
    except ValueError as exc:
        raise GitError(f"invalid repository name: {exc}", step="validate") from None


def _check_issue(issue: int) -> None:
    if isinstance(issue, bool) or not isinstance(issue, int) or issue <= 0:
        raise GitError(f"invalid issue number: {issue!r}", step="validate")


def _check_branch(branch: str) -> None:
    """git's rules for a branch name (check-ref-format), plus no leading dash."""
    bad = (
        not isinstance(branch, str)
        or not branch
        or branch == "@"
        or branch.startswith(("-", "/"))
        or branch.endswith(("/", "."))
        or "//" in branch
        or ".." in branch
        or "@{" in branch
        or any(ord(c) < 0x20 or c == "\x7f" or c in " ~^:?*[\\" for c in branch)
        or any(part.startswith(".") or part.endswith(".lock") for part in branch.split("/"))
    )
    if bad:
        raise GitError(f"invalid branch name: {branch!r}", step="validate")


def _check_sha(sha: str) -> None:
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise GitError(f"invalid commit id: {sha!r}", step="validate")


def _looks_like_bare_repo(path: Path) -> bool:
    return (
        not path.is_symlink()
        and (path / "HEAD").is_file()
        and (path / "objects").is_dir()
        and (path / "refs").is_dir()
    )


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _last_touched(wt: Path) -> float:
    """Latest mtime of the worktree directory, its .git file and its admin files in the mirror
    (index, HEAD, reflog change with every git operation in the worktree)."""
    candidates = [wt, wt / ".git"]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = (wt / ".git").read_text().strip()
        if text.startswith("gitdir:"):
            admin = Path(text[len("gitdir:") :].strip())
            if not admin.is_absolute():
                admin = wt / admin
            candidates += [admin, admin / "index", admin / "HEAD", admin / "logs" / "HEAD"]
    latest = 0.0
    for path in candidates:
        with contextlib.suppress(OSError):
            latest = max(latest, path.lstat().st_mtime)
    return latest


def remove_tree(path: Path, *, missing_ok: bool = True) -> None:
    """Remove a directory tree, including read-only directories an agent may leave behind."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        if missing_ok:
            return
        raise FileNotFoundError(path)
    try:
        shutil.rmtree(path)
        return
    except OSError:
        pass
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IRWXU)
    for root, dirs, _files in os.walk(path):  # top-down: each directory is opened up first
        for d in dirs:
            sub = os.path.join(root, d)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, stat.S_IRWXU)
    try:
        shutil.rmtree(path)
    except OSError as exc:
        raise GitError(f"could not remove {path}: {exc.strerror or exc}", step="remove") from None


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="replace")
    return data.strip()


def _trim(text: str) -> str:
    if len(text) <= _MAX_ERROR_CHARS:
        return text
    return "..." + text[-_MAX_ERROR_CHARS:]


def _rel_label(wt: Path, root: Path) -> str:
    try:
        return str(wt.relative_to(root))
    except ValueError:
        return str(wt)
