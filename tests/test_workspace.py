"""Workspace tests against real git and real bare repositories used as the remote."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from bot.workspace import GitError, Prepared, Workspace, run_command

TOKEN = "s3cr3t-token-value"
OTHER_SECRET = "hunter2-webhook-secret"
AUTHOR_NAME = "Kugetsu Bot"
AUTHOR_EMAIL = "bot@kugetsu.example"
REPO = "acme/widget"
BRANCH = "kugetsu/issue-7"


# ---------------------------------------------------------------------- helpers


def git(*args: str, cwd: Path | None = None, check: bool = True) -> str:
    """git for the test's own setup: no host config, an explicit identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        LC_ALL="C",
        GIT_AUTHOR_NAME="Upstream Dev",
        GIT_AUTHOR_EMAIL="dev@upstream.example",
        GIT_COMMITTER_NAME="Upstream Dev",
        GIT_COMMITTER_EMAIL="dev@upstream.example",
    )
    cp = subprocess.run(
        ["git", "-c", "init.defaultBranch=main", "-c", "advice.detachedHead=false", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if check and cp.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {cp.stderr}")
    return cp.stdout.strip()


class Remote:
    """A bare repository standing in for Gitea, plus a way for "someone else" to push."""

    def __init__(self, root: Path, repo: str, default: str = "main") -> None:
        self.root = root
        self.path = root / f"{repo}.git"
        self.default = default
        git("init", "--bare", "--quiet", f"--initial-branch={default}", str(self.path))
        seed = self._scratch()
        git("init", "--quiet", f"--initial-branch={default}", str(seed))
        (seed / "README.md").write_text("# widget\n")
        (seed / ".gitignore").write_text("*.log\n")
        (seed / "docs").mkdir()
        (seed / "docs" / "old.txt").write_text("old\n")
        git("add", "--all", cwd=seed)
        git("commit", "--quiet", "-m", "initial", cwd=seed)
        git("push", "--quiet", str(self.path), f"HEAD:refs/heads/{default}", cwd=seed)

    def _scratch(self) -> Path:
        path = self.root / "_scratch" / uuid.uuid4().hex
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def sha(self, branch: str) -> str | None:
        out = git(
            f"--git-dir={self.path}",
            "rev-parse",
            "--quiet",
            "--verify",
            f"refs/heads/{branch}",
            check=False,
        )
        return out or None

    def commit(self, branch: str, files: dict[str, str], message: str = "upstream change") -> str:
        clone = self._scratch()
        git("clone", "--quiet", str(self.path), str(clone))
        if self.sha(branch):
            git("checkout", "--quiet", "-B", branch, f"origin/{branch}", cwd=clone)
        for name, content in files.items():
            target = clone / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        git("add", "--all", cwd=clone)
        git("commit", "--quiet", "-m", message, cwd=clone)
        git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=clone)
        return git("rev-parse", "HEAD", cwd=clone)


class Recorder:
    """Runner that records argv and environment, then runs the real command."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def __call__(self, args, **kwargs):
        self.calls.append((list(args), dict(kwargs.get("env") or {})))
        return run_command(args, **kwargs)


def head(path: Path) -> str:
    return git("rev-parse", "HEAD", cwd=path)


def age(wt: Path, seconds: float) -> None:
    """Set the mtime of a worktree and its admin files in the mirror to `seconds` ago."""
    when = time.time() - seconds
    gitdir = Path((wt / ".git").read_text().split(":", 1)[1].strip())
    for top in (wt, gitdir):
        for root, dirs, files in os.walk(top):
            for entry in dirs + files:
                os.utime(os.path.join(root, entry), (when, when), follow_symlinks=False)
        os.utime(top, (when, when))


def all_bytes_under(root: Path) -> list[tuple[Path, bytes]]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if not path.is_symlink():
                found.append((path, path.read_bytes()))
    return found


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def empty_home(tmp_path, monkeypatch):
    """As in a container: no git configuration anywhere."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for key in list(os.environ):
        if key.startswith("GIT_"):
            monkeypatch.delenv(key)
    return home


@pytest.fixture
def remotes(tmp_path) -> Path:
    return tmp_path / "remotes"


@pytest.fixture
def remote(remotes) -> Remote:
    return Remote(remotes, REPO)


@pytest.fixture
def data(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_ws(data, remotes, recorder):
    def make(**overrides) -> Workspace:
        options = dict(
            mirrors_dir=data / "mirrors",
            worktrees_dir=data / "worktrees",
            remote_url=lambda repo: str(remotes / f"{repo}.git"),
            token=TOKEN,
            author_name=AUTHOR_NAME,
            author_email=AUTHOR_EMAIL,
            timeout=60.0,
            runner=recorder,
        )
        options.update(overrides)
        return Workspace(**options)

    return make


@pytest.fixture
def ws(make_ws) -> Workspace:
    return make_ws()


# ---------------------------------------------------------------------- prepare


def test_constructor_does_no_io(tmp_path, recorder):
    Workspace(
        mirrors_dir=tmp_path / "d" / "mirrors",
        worktrees_dir=tmp_path / "d" / "worktrees",
        remote_url=lambda repo: "unused",
        runner=recorder,
    )
    assert not (tmp_path / "d").exists()
    assert recorder.calls == []


def test_first_prepare_creates_mirror_and_worktree_on_new_branch(ws, remote, data):
    p = ws.prepare(REPO, 7, BRANCH)

    assert isinstance(p, Prepared)
    assert p.path == data / "worktrees" / "acme" / "widget" / "7"
    assert p.branch == BRANCH
    assert p.base_branch == "main"
    assert p.base_sha == remote.sha("main")
    assert p.reused is False
    assert git("symbolic-ref", "HEAD", cwd=p.path) == f"refs/heads/{BRANCH}"
    assert head(p.path) == remote.sha("main")
    assert ws.head(p.path) == remote.sha("main")
    # only the project's files: the .git entry is a file pointing into the mirror
    assert sorted(os.listdir(p.path)) == [".git", ".gitignore", "README.md", "docs"]
    assert (p.path / ".git").is_file()

    mirror = data / "mirrors" / "acme" / "widget.git"
    assert git(f"--git-dir={mirror}", "rev-parse", "--is-bare-repository") == "true"
    assert git(f"--git-dir={mirror}", "rev-parse", "refs/remotes/origin/main") == remote.sha("main")
    # remote branches are never fetched into refs/heads
    heads = git(f"--git-dir={mirror}", "for-each-ref", "--format=%(refname)", "refs/heads")
    assert heads.splitlines() == [f"refs/heads/{BRANCH}"]
    assert remote.sha(BRANCH) is None


def test_second_prepare_reuses_worktree_untouched(ws, remote):
    first = ws.prepare(REPO, 7, BRANCH)
    (first.path / "notes.txt").write_text("work in progress\n")
    (first.path / "README.md").write_text("edited, not committed\n")
    git("add", "notes.txt", cwd=first.path)
    git("commit", "--quiet", "-m", "agent commit", cwd=first.path)
    (first.path / "scratch.txt").write_text("uncommitted\n")
    before = head(first.path)

    second = ws.prepare(REPO, 7, BRANCH)

    assert second.reused is True
    assert second.path == first.path
    assert head(second.path) == before
    assert (second.path / "scratch.txt").read_text() == "uncommitted\n"
    assert (second.path / "README.md").read_text() == "edited, not committed\n"
    assert second.base_sha == remote.sha("main")


def test_prepare_after_worktree_deleted_recreates_from_pushed_branch(ws, remote):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "feature.py").write_text("print('hi')\n")
    assert ws.commit_all(p.path, "Add feature") is True
    pushed = ws.push(p.path, BRANCH)
    shutil.rmtree(p.path)  # e.g. a restart wiped the worktrees; the registration is stale

    again = ws.prepare(REPO, 7, BRANCH)

    assert again.reused is False
    assert head(again.path) == pushed
    assert (again.path / "feature.py").read_text() == "print('hi')\n"
    assert again.base_sha == remote.sha("main")
    assert git("symbolic-ref", "HEAD", cwd=again.path) == f"refs/heads/{BRANCH}"


def test_prepare_after_worktree_deleted_without_push_starts_again_from_default(ws, remote):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "lost.txt").write_text("never pushed\n")
    ws.commit_all(p.path, "unpushed")
    shutil.rmtree(p.path)

    again = ws.prepare(REPO, 7, BRANCH)

    assert again.reused is False
    assert head(again.path) == remote.sha("main")
    assert not (again.path / "lost.txt").exists()


def test_prepare_replaces_a_stale_directory(ws, remote, data):
    stale = data / "worktrees" / "acme" / "widget" / "7"
    (stale / "junk").mkdir(parents=True)
    (stale / "junk" / "file").write_text("left over\n")
    (stale / ".git").write_text("gitdir: /nonexistent/worktrees/7\n")

    p = ws.prepare(REPO, 7, BRANCH)

    assert p.reused is False
    assert not (p.path / "junk").exists()
    assert head(p.path) == remote.sha("main")


def test_prepare_recreates_a_worktree_on_another_branch(ws, remote):
    ws.prepare(REPO, 7, "kugetsu/old-name")
    p = ws.prepare(REPO, 7, BRANCH)
    assert p.reused is False
    assert git("symbolic-ref", "HEAD", cwd=p.path) == f"refs/heads/{BRANCH}"


def test_fetch_picks_up_new_commits_on_main_for_a_new_issue(ws, remote):
    first = ws.prepare(REPO, 1, "kugetsu/issue-1")
    old_main = remote.sha("main")
    new_main = remote.commit("main", {"CHANGELOG.md": "v2\n"})

    second = ws.prepare(REPO, 2, "kugetsu/issue-2")
    assert second.base_sha == new_main
    assert (second.path / "CHANGELOG.md").exists()

    # the existing worktree is reused as it is: its merge-base is still the old main
    again = ws.prepare(REPO, 1, "kugetsu/issue-1")
    assert again.reused is True
    assert again.base_sha == old_main
    assert not (first.path / "CHANGELOG.md").exists()


def test_default_branch_other_than_main(ws, remotes):
    trunk = Remote(remotes, "acme/trunky", default="trunk")
    p = ws.prepare("acme/trunky", 3, "kugetsu/issue-3")
    assert p.base_branch == "trunk"
    assert p.base_sha == trunk.sha("trunk")
    (p.path / "x.txt").write_text("x\n")
    assert ws.commit_all(p.path, "x")
    assert trunk.sha("kugetsu/issue-3") is None
    assert ws.push(p.path, "kugetsu/issue-3") == trunk.sha("kugetsu/issue-3")


def test_prepare_follows_a_changed_remote_url(make_ws, tmp_path, data, remote):
    main = remote.sha("main")
    make_ws().prepare(REPO, 1, "kugetsu/issue-1")
    moved = tmp_path / "moved" / "widget.git"
    moved.parent.mkdir()
    shutil.move(remote.path, moved)  # the old URL no longer works

    p = make_ws(remote_url=lambda repo: str(moved)).prepare(REPO, 2, "kugetsu/issue-2")

    mirror = data / "mirrors" / "acme" / "widget.git"
    assert git(f"--git-dir={mirror}", "config", "remote.origin.url") == str(moved)
    assert p.base_sha == main


@pytest.mark.parametrize("repo", ["../etc", "acme", "acme/widget/x", "acme/..", "", "a b/c"])
def test_invalid_repository_names_are_refused_before_any_io(make_ws, data, repo):
    ws = make_ws()
    with pytest.raises(GitError, match="invalid repository"):
        ws.prepare(repo, 1, BRANCH)
    assert not data.exists()


@pytest.mark.parametrize("branch", ["-x", "a..b", "a b", "a/", "x.lock", "a:b", "", "@"])
def test_invalid_branch_names_are_refused(ws, remote, branch):
    with pytest.raises(GitError, match="invalid branch"):
        ws.prepare(REPO, 1, branch)


@pytest.mark.parametrize("issue", [0, -1, True, "7"])
def test_invalid_issue_numbers_are_refused(ws, remote, issue):
    with pytest.raises(GitError, match="invalid issue"):
        ws.prepare(REPO, issue, BRANCH)


def test_empty_remote_repository_is_an_error(ws, remotes):
    git("init", "--bare", "--quiet", str(remotes / "acme" / "empty.git"))
    with pytest.raises(GitError, match="no default branch"):
        ws.prepare("acme/empty", 1, BRANCH)


def test_concurrent_prepares_of_one_repository(ws, remote):
    results: dict[int, Prepared] = {}
    errors: list[BaseException] = []

    def run(issue: int) -> None:
        try:
            results[issue] = ws.prepare(REPO, issue, f"kugetsu/issue-{issue}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [1, 2, 3, 4]
    assert all(head(p.path) == remote.sha("main") for p in results.values())


# ---------------------------------------------------------------------- commits


def test_commit_all_without_changes_returns_false(ws, remote):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "debug.log").write_text("ignored by .gitignore\n")
    assert ws.commit_all(p.path, "nothing") is False
    assert head(p.path) == remote.sha("main")
    assert ws.has_new_commits(p.path, p.base_sha) is False
    assert ws.changed_files(p, p.base_sha) == []


def test_commit_all_commits_everything_as_the_configured_author(ws, remote):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "README.md").write_text("# widget, improved\n")
    (p.path / "docs" / "old.txt").unlink()
    (p.path / "new" / "dir").mkdir(parents=True)
    (p.path / "new" / "dir" / "file.py").write_text("x = 1\n")
    (p.path / "debug.log").write_text("junk the agent left\n")

    assert ws.commit_all(p.path, "Fix #7") is True

    log = git("log", "-1", "--format=%an <%ae>|%cn <%ce>|%s", cwd=p.path)
    assert log == f"{AUTHOR_NAME} <{AUTHOR_EMAIL}>|{AUTHOR_NAME} <{AUTHOR_EMAIL}>|Fix #7"
    assert git("status", "--porcelain", cwd=p.path) == ""
    assert "debug.log" not in git("ls-tree", "-r", "--name-only", "HEAD", cwd=p.path).split()
    assert ws.has_new_commits(p.path, p.base_sha) is True
    assert ws.changed_files(p, p.base_sha) == ["README.md", "docs/old.txt", "new/dir/file.py"]
    assert ws.changed_files(p.path, p.base_sha) == ws.changed_files(str(p.path), p.base_sha)
    assert ws.commit_all(p.path, "again") is False


def test_agent_commits_count_even_with_a_clean_tree(ws, remote):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "agent.txt").write_text("made by the agent\n")
    git("add", "agent.txt", cwd=p.path)
    git("commit", "--quiet", "-m", "agent's own commit", cwd=p.path)

    assert ws.commit_all(p.path, "kugetsu") is False
    assert ws.has_new_commits(p.path, p.base_sha) is True
    assert ws.changed_files(p, p.base_sha) == ["agent.txt"]


def test_commit_all_refuses_an_empty_message(ws, remote):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "a.txt").write_text("a\n")
    with pytest.raises(GitError, match="empty commit message"):
        ws.commit_all(p.path, "  ")


def test_paths_that_are_not_kugetsu_worktrees_are_refused(ws, remote, tmp_path, data):
    outer = tmp_path / "outer"
    (outer / "sub").mkdir(parents=True)
    git("init", "--quiet", str(outer))
    (outer / "sub" / "f.txt").write_text("f\n")
    with pytest.raises(GitError, match="not under the worktrees directory"):
        ws.commit_all(outer / "sub", "must not commit here")
    assert git("rev-list", "--all", cwd=outer) == ""

    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "docs" / "new.txt").write_text("n\n")
    with pytest.raises(GitError):
        ws.commit_all(p.path / "docs", "subdirectory")
    loose = data / "worktrees" / "acme" / "widget" / "8"
    loose.mkdir()
    with pytest.raises(GitError, match="not a kugetsu worktree"):
        ws.has_new_commits(loose, p.base_sha)
    with pytest.raises(GitError, match="invalid commit id"):
        ws.changed_files(p, "--output=x")


def test_host_git_configuration_and_environment_are_ignored(
    ws, remote, tmp_path, empty_home, monkeypatch
):
    (empty_home / ".gitconfig").write_text("[user]\n\tname = Host User\n\temail = host@example\n")
    xdg = tmp_path / "xdg"
    (xdg / "git").mkdir(parents=True)
    (xdg / "git" / "ignore").write_text("*.txt\n")
    (xdg / "git" / "config").write_text("[core]\n\texcludesFile = ~/nothing\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    outer = tmp_path / "outer"
    git("init", "--quiet", str(outer))
    monkeypatch.setenv("GIT_DIR", str(outer / ".git"))
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Intruder")

    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "notes.txt").write_text("a txt file the host would ignore\n")
    assert ws.commit_all(p.path, "notes") is True

    assert git("log", "-1", "--format=%an <%ae>", cwd=p.path) == f"{AUTHOR_NAME} <{AUTHOR_EMAIL}>"
    assert ws.changed_files(p, p.base_sha) == ["notes.txt"]
    assert git("--git-dir", str(outer / ".git"), "rev-list", "--all") == ""


# ---------------------------------------------------------------------- push


def test_push_creates_fast_forwards_and_respects_the_lease(ws, remote, data):
    p = ws.prepare(REPO, 7, BRANCH)
    assert ws.remote_branch_sha(REPO, BRANCH) is None
    (p.path / "one.txt").write_text("1\n")
    ws.commit_all(p.path, "one")

    first = ws.push(p.path, BRANCH)
    assert first == head(p.path) == remote.sha(BRANCH)
    assert ws.remote_branch_sha(REPO, BRANCH) == first
    mirror = data / "mirrors" / "acme" / "widget.git"
    assert git(f"--git-dir={mirror}", "rev-parse", f"refs/remotes/origin/{BRANCH}") == first

    (p.path / "two.txt").write_text("2\n")
    ws.commit_all(p.path, "two")
    second = ws.push(p.path, BRANCH)
    assert second == remote.sha(BRANCH) != first
    git("merge-base", "--is-ancestor", first, second, cwd=p.path)  # raises unless a fast-forward

    theirs = remote.commit(BRANCH, {"theirs.txt": "someone else\n"})
    (p.path / "three.txt").write_text("3\n")
    ws.commit_all(p.path, "three")
    with pytest.raises(GitError, match="push"):
        ws.push(p.path, BRANCH)
    assert remote.sha(BRANCH) == theirs


def test_push_rewritten_history_over_our_own_branch(ws, remote):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "a.txt").write_text("a\n")
    ws.commit_all(p.path, "a")
    ws.push(p.path, BRANCH)
    git("commit", "--quiet", "--amend", "-m", "a, reworded", cwd=p.path)
    assert ws.push(p.path, BRANCH) == remote.sha(BRANCH) == head(p.path)


def test_push_after_the_remote_branch_was_deleted(ws, remote):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "a.txt").write_text("a\n")
    ws.commit_all(p.path, "a")
    ws.push(p.path, BRANCH)
    git(f"--git-dir={remote.path}", "branch", "-D", BRANCH)

    again = ws.prepare(REPO, 7, BRANCH)  # the fetch prunes the stale remote-tracking ref
    assert again.reused is True
    (again.path / "b.txt").write_text("b\n")
    ws.commit_all(again.path, "b")
    assert ws.push(again.path, BRANCH) == remote.sha(BRANCH)


# ---------------------------------------------------------------------- remove and cleanup


def test_remove_keeps_the_mirror_and_forgets_the_worktree(ws, remote, data):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "uncommitted.txt").write_text("x\n")
    ro = p.path / "readonly"
    ro.mkdir()
    (ro / "f").write_text("f\n")
    ro.chmod(0o500)

    ws.remove(REPO, 7)

    mirror = data / "mirrors" / "acme" / "widget.git"
    assert not p.path.exists()
    assert git(f"--git-dir={mirror}", "rev-parse", "--is-bare-repository") == "true"
    assert str(p.path) not in git(f"--git-dir={mirror}", "worktree", "list", "--porcelain")
    ws.remove(REPO, 7)  # nothing left to remove is fine
    ws.remove(REPO, 99)
    assert ws.prepare(REPO, 7, BRANCH).reused is False


def test_cleanup_removes_only_old_worktrees(make_ws, remote, data):
    now = [time.time()]
    ws = make_ws(clock=lambda: now[0])
    old = ws.prepare(REPO, 1, "kugetsu/issue-1")
    fresh = ws.prepare(REPO, 2, "kugetsu/issue-2")
    running = ws.prepare(REPO, 3, "kugetsu/issue-3")
    age(old.path, 7200)
    age(running.path, 7200)

    removed = ws.cleanup(3600, keep=[running.path])

    assert removed == [old.path]
    assert not old.path.exists()
    assert fresh.path.exists() and running.path.exists()
    mirror = data / "mirrors" / "acme" / "widget.git"
    listing = git(f"--git-dir={mirror}", "worktree", "list", "--porcelain")
    assert str(old.path) not in listing and str(fresh.path) in listing

    now[0] += 10 * 86400
    assert sorted(ws.cleanup(3600)) == sorted([fresh.path, running.path])
    assert not (data / "worktrees" / "acme").exists()
    assert ws.cleanup(3600) == []


def test_cleanup_without_worktrees_dir(ws):
    assert ws.cleanup(0) == []


# ---------------------------------------------------------------------- secrets


def test_token_never_lands_in_files_argv_or_non_network_commands(
    ws, remote, remotes, data, recorder
):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "a.txt").write_text("a\n")
    ws.commit_all(p.path, "a")
    ws.push(p.path, BRANCH)
    ws.remote_branch_sha(REPO, BRANCH)
    ws.remove(REPO, 7)
    ws.prepare(REPO, 7, BRANCH)

    files = all_bytes_under(data)
    assert len(files) > 20
    assert [path for path, content in files if TOKEN.encode() in content] == []
    header = f"Authorization: token {TOKEN}"
    assert recorder.calls
    network_steps = {"fetch", "ls-remote", "push"}
    for argv, env in recorder.calls:
        assert TOKEN not in " ".join(argv)
        is_network = any(step in argv for step in network_steps)
        assert (env.get("GIT_CONFIG_VALUE_0") == header) is is_network, argv
        if is_network:
            # sent to the repository's own URL only, wherever else config may point git
            assert env["GIT_CONFIG_KEY_0"] == f"http.{remotes}/acme/widget.git.extraHeader"
            assert env["GIT_CONFIG_COUNT"] == "1"
        assert env["GIT_CONFIG_NOSYSTEM"] == "1"
        assert env["GIT_CONFIG_GLOBAL"] == os.devnull
        assert env["GIT_TERMINAL_PROMPT"] == "0"
        assert env["HOME"] == str(data / ".git-home")
    assert os.listdir(data / ".git-home") == []


def test_error_for_a_bad_remote_names_the_step_without_the_token(make_ws, tmp_path):
    missing = tmp_path / "missing" / "widget.git"
    ws = make_ws(remote_url=lambda repo: str(missing))
    with pytest.raises(GitError) as info:
        ws.prepare(REPO, 7, BRANCH)
    message = str(info.value)
    assert message.startswith("git ls-remote failed")
    assert str(missing) in message
    assert TOKEN not in message


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{TOKEN}@gitea:3000/acme/widget.git",
        f"https://{TOKEN}@gitea:3000/acme/widget.git",
        f"http://oauth2:{TOKEN}@gitea:3000/acme/widget.git",
        f"http://gitea:3000/acme/widget.git?token={TOKEN}",
    ],
)
def test_urls_with_credentials_are_refused(make_ws, recorder, url):
    ws = make_ws(remote_url=lambda repo: url)
    with pytest.raises(GitError, match="credentials") as info:
        ws.prepare(REPO, 7, BRANCH)
    assert TOKEN not in str(info.value)
    with pytest.raises(GitError):
        ws.remote_branch_sha(REPO, BRANCH)
    assert recorder.calls == []


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.auth.append(self.headers.get("Authorization"))
        if self.server.hang.is_set():
            self.server.release.wait(30)
            return
        # a smart-HTTP error whose text git prints: it echoes the token back
        body = (
            _pkt("# service=git-upload-pack\n")
            + b"0000"
            + _pkt(f"ERR bad credentials {TOKEN} {OTHER_SECRET}\n")
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/x-git-upload-pack-advertisement")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _pkt(text: str) -> bytes:
    raw = text.encode()
    return b"%04x" % (len(raw) + 4) + raw


@pytest.fixture
def http_remote():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.auth = []
    server.hang = threading.Event()
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def test_git_sends_the_token_as_a_header_and_never_in_argv(make_ws, http_remote, recorder, data):
    port = http_remote.server_address[1]
    ws = make_ws(
        remote_url=lambda repo: f"http://127.0.0.1:{port}/{repo}.git", secrets=[OTHER_SECRET]
    )

    with pytest.raises(GitError) as info:
        ws.prepare(REPO, 7, BRANCH)

    assert http_remote.auth and http_remote.auth[0] == f"token {TOKEN}"
    message = str(info.value)
    assert "bad credentials [redacted] [redacted]" in message
    assert TOKEN not in message and OTHER_SECRET not in message
    with pytest.raises(GitError) as info:
        ws.remote_branch_sha(REPO, BRANCH)
    assert TOKEN not in str(info.value)
    assert len(http_remote.auth) == 2 and set(http_remote.auth) == {f"token {TOKEN}"}
    assert recorder.calls
    assert all(TOKEN not in arg for argv, _env in recorder.calls for arg in argv)
    assert [p for p, content in all_bytes_under(data) if TOKEN.encode() in content] == []


def test_a_hanging_remote_times_out(make_ws, http_remote):
    http_remote.hang.set()
    port = http_remote.server_address[1]
    ws = make_ws(remote_url=lambda repo: f"http://127.0.0.1:{port}/{repo}.git", timeout=1.0)
    with pytest.raises(GitError, match="timed out"):
        ws.prepare(REPO, 7, BRANCH)


def test_agent_litter_is_never_committed(ws, remote):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / ".aider.tags.cache.v4").mkdir()
    (p.path / ".aider.tags.cache.v4" / "cache.db").write_text("x")
    (p.path / ".aider.chat.history.md").write_text("x")
    assert ws.commit_all(p.path, "nothing real") is False
    (p.path / "real.txt").write_text("change\n")
    assert ws.commit_all(p.path, "a real change") is True
    assert ws.changed_files(p.path, p.base_sha) == ["real.txt"]


def test_config_an_agent_writes_cannot_redirect_the_push_or_run_commands(ws, remote, tmp_path):
    p = ws.prepare(REPO, 7, BRANCH)
    elsewhere = tmp_path / "elsewhere.git"
    git("init", "--bare", "--quiet", str(elsewhere))
    ran = tmp_path / "ran"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {ran}\ncat\n")
    script.chmod(0o755)
    # what an agent can do from its worktree: the config is the mirror's, shared by all
    for key, value in (
        ("remote.origin.pushurl", str(elsewhere)),
        (f"url.{elsewhere}.insteadOf", str(remote.path)),
        ("filter.evil.clean", str(script)),
        ("remote.origin.receivepack", str(script)),
    ):
        git("config", key, value, cwd=p.path)
    (p.path / ".gitattributes").write_text("* filter=evil\n")
    (p.path / "a.txt").write_text("a\n")

    assert ws.commit_all(p.path, "a")
    head = ws.push(p.path, BRANCH)
    assert remote.sha(BRANCH) == head  # pushed where kugetsu meant to
    assert git("--git-dir", str(elsewhere), "for-each-ref") == ""
    assert not ran.exists()
    # and the next prepare (a follow-up) starts from kugetsu's config again
    git("config", "remote.origin.uploadpack", str(script), cwd=p.path)
    ws.prepare(REPO, 7, BRANCH)
    assert not ran.exists()


def test_a_follow_up_builds_on_commits_pushed_to_the_branch_meanwhile(ws, remote):
    p = ws.prepare(REPO, 7, BRANCH)
    (p.path / "a.txt").write_text("a\n")
    ws.commit_all(p.path, "a")
    ws.push(p.path, BRANCH)
    human = remote.commit(BRANCH, {"fix.txt": "by a person\n"}, "a fix on the PR")

    again = ws.prepare(REPO, 7, BRANCH)
    assert again.reused and (again.path / "fix.txt").read_text() == "by a person\n"
    (again.path / "b.txt").write_text("b\n")
    ws.commit_all(again.path, "b")
    pushed = ws.push(again.path, BRANCH)
    assert remote.sha(BRANCH) == pushed
    # the person's commit is still on the branch (git exits 1, and this raises, if not)
    git(f"--git-dir={remote.path}", "merge-base", "--is-ancestor", human, pushed)


# ---------------------------------------------------------------------- a person's branch


def test_a_persons_branch_gets_only_plain_pushes_that_add_to_it(ws, remote):
    theirs = remote.commit("feature/x", {"theirs.txt": "mine\n"}, message="their work")
    p = ws.prepare(REPO, 21, "feature/x")
    assert head(p.path) == theirs and p.base_branch == "main"
    (p.path / "ours.txt").write_text("ours\n")
    ws.commit_all(p.path, "ours")
    ours = ws.push(p.path, "feature/x", force=False)
    assert remote.sha("feature/x") == ours
    assert git("rev-parse", f"{ours}~1", cwd=p.path) == theirs

    # what kugetsu pushes never rewrites the person's commits: the same rewrite that a
    # push of kugetsu's own branch may make (test_push_rewritten_history_over_our_own_branch)
    git("commit", "--quiet", "--amend", "-m", "ours, reworded", cwd=p.path)
    with pytest.raises(GitError, match="push"):
        ws.push(p.path, "feature/x", force=False)
    assert remote.sha("feature/x") == ours
    # and their new commits are never dropped: the next prepare builds on them
    newer = remote.commit("feature/x", {"theirs.txt": "mine, again\n"}, message="more work")
    again = ws.prepare(REPO, 21, "feature/x")
    git("merge-base", "--is-ancestor", newer, "HEAD", cwd=again.path)


def test_a_forks_branch_is_fetched_from_the_fork_and_pushed_there(ws, remote, remotes):
    fork = remotes / "carol" / "widget.git"
    fork.parent.mkdir(parents=True)
    git("clone", "--quiet", "--bare", str(remote.path), str(fork))
    forked = Remote.__new__(Remote)
    forked.root, forked.path, forked.default = remotes, fork, "main"
    theirs = forked.commit("fix", {"fix.txt": "fixed\n"})

    p = ws.prepare(REPO, 22, "fix", base="main", source="carol/widget")
    assert head(p.path) == theirs and p.base_sha == remote.sha("main")
    (p.path / "ours.txt").write_text("ours\n")
    ws.commit_all(p.path, "ours")
    assert ws.remote_branch_sha("carol/widget", "fix") == theirs
    ours = ws.push(p.path, "fix", source="carol/widget", force=False)
    assert forked.sha("fix") == ours and remote.sha("fix") is None
    # what went to the fork counts as pushed: prune may remove the worktree once idle
    assert ws.unpushed_commits(p.path) == 0
    # a base that is not on the remote is an error, not a guess
    with pytest.raises(GitError, match="not on Gitea"):
        ws.prepare(REPO, 23, "fix", base="release", source="carol/widget")
