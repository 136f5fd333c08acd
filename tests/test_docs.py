"""The examples in the README and the agent guide are real, loadable config."""

import re
from pathlib import Path

import pytest

from bot import agents
from bot.config import load

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "agents.md"]
BLOCK = re.compile(r"```toml\n(.*?)```", re.S)


SECTION = re.compile(r"^\[(server|gitea|storage|queue|triggers|agents|git|reconcile)[.\]]", re.M)
#: the first line of an example of a repository's own settings file
REPO_FILE = "# .kugetsu.toml\n"


def blocks(repo_files: bool = False):
    # blocks that are kugetsu config (other tools' files, such as codex's config.toml, are not);
    # or, with repo_files, examples of a repository's .kugetsu.toml
    for doc in DOCS:
        for i, block in enumerate(BLOCK.findall(doc.read_text())):
            if block.startswith(REPO_FILE) == repo_files and SECTION.search(block):
                yield pytest.param(block, id=f"{doc.name}-{i}")


@pytest.mark.parametrize("block", list(blocks(repo_files=True)))
def test_repository_settings_example_is_accepted(block):
    from bot.config import repo_settings

    settings = repo_settings(
        block.encode(),
        default_agent="opencode",
        known_agents=frozenset(agents.PRESETS),
        budget_of=lambda name: (None, None),
    )
    assert settings.agent and settings.instructions and settings.branch_template


@pytest.mark.parametrize("block", list(blocks()))
def test_toml_example_loads(block, tmp_path):
    path = tmp_path / "config.toml"
    # paths named in home_files need not exist for loading
    path.write_text(block)
    config = load(path, {"KUGETSU_WEBHOOK_SECRET": "x"})
    for name in config.agents.tables:
        agents.resolve(config.agents, name)


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", text, re.S)[:2]
    assert "kugetsu serve" in commands[0] and "pip install ." in commands[0]
    assert commands[1] == (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    )
    # CI runs the README's test command, one step a line, with the checks before the tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    steps = commands[1].split(" && ")
    assert all(step in ci for step in steps)
    checks = [".venv/bin/ruff check .", ".venv/bin/ruff format --check .", ".venv/bin/mypy bot"]
    assert all(check in ci for check in checks)
    order = [ci.index(line) for line in [*steps[:2], *checks, steps[2]]]
    assert order == sorted(order)
    assert "set -euo pipefail" in ci  # a failed check stops CI
