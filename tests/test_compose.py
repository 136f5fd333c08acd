"""The compose examples agree with the image and with kugetsu: what each node runs, the
config it gets from its environment, the database it points at, and where its state lives.

No container engine runs here, so the files are not started; what starting them would
check first is checked instead: every build argument is one the Dockerfile takes, every
command is one `kugetsu` accepts, and every node's environment loads as kugetsu's config.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from bot.cli import build_parser
from bot.config import load

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
#: what the .env beside a compose file holds (its comments name them)
DOT_ENV = {
    "KUGETSU_GITEA_TOKEN": "token-from-env",
    "KUGETSU_WEBHOOK_SECRET": "secret-from-env",
    "KUGETSU_GITEA_URL": "http://gitea:3000",
    "POSTGRES_PASSWORD": "long-random-string",
}


def compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def expand(value: str) -> str:
    """Compose's ${VAR} and ${VAR:?message}, from DOT_ENV."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: DOT_ENV[m.group(1)], value)


def image_env() -> dict[str, str]:
    """The ENV lines of the Dockerfile's last stage that name kugetsu's settings."""
    found = dict(re.findall(r"\b(KUGETSU_\w+)=(\S+)", DOCKERFILE.rsplit("\nFROM ", 1)[1]))
    assert found, "the image sets kugetsu's config path and data directory"
    return found


def kugetsu_nodes(doc: dict) -> dict[str, dict]:
    return {name: s for name, s in doc["services"].items() if "kugetsu" in s.get("image", "")}


def node_config(node: dict, tmp_path: Path):
    """The config a node's `kugetsu serve` loads: the image's file (host 0.0.0.0, port
    8080), the image's environment, the .env file and the node's own environment."""
    image_config = tmp_path / "config.toml"
    image_config.write_text('[server]\nhost = "0.0.0.0"\nport = 8080\n')
    env = {**image_env(), **DOT_ENV}
    env.update({k: expand(str(v)) for k, v in (node.get("environment") or {}).items()})
    env["KUGETSU_CONFIG"] = str(image_config)
    return load(None, env)


@pytest.mark.parametrize(
    "name", ["docker-compose.example.yml", "docker-compose.cluster.example.yml"]
)
def test_each_node_builds_the_image_with_arguments_it_takes_and_keeps_state_in_its_volume(name):
    doc = compose(name)
    nodes = kugetsu_nodes(doc)
    assert nodes
    arguments = set(re.findall(r"^ARG (\w+)", DOCKERFILE, re.M))
    data_dir = image_env()["KUGETSU_DATA_DIR"]
    assert f"VOLUME {data_dir}" in DOCKERFILE
    volumes = []
    for node in nodes.values():
        assert set((node.get("build") or {}).get("args") or {}) <= arguments
        [mount] = [v for v in node["volumes"] if v.endswith(f":{data_dir}")]
        volumes.append(mount.split(":", 1)[0])
        assert mount.split(":", 1)[0] in doc["volumes"]
    # no two nodes share a data directory: mirrors, worktrees and homes are per machine
    assert len(set(volumes)) == len(volumes)


def test_the_cluster_example_is_one_receiver_and_two_workers_on_its_postgresql(tmp_path):
    doc = compose("docker-compose.cluster.example.yml")
    nodes = kugetsu_nodes(doc)
    roles = {}
    for name, node in nodes.items():
        command = node["command"]
        assert command[0] == "kugetsu"
        args = build_parser().parse_args(command[1:])
        roles[name] = (args.command, args.role)
    assert sorted(roles.values()) == [
        ("serve", "receiver"),
        ("serve", "worker"),
        ("serve", "worker"),
    ]
    # the image carries the PostgreSQL driver, and every node reaches the same database:
    # the compose service, with the user and database PostgreSQL is told to create
    postgres = doc["services"]["postgres"]
    urls = set()
    for name, node in nodes.items():
        assert "postgres" in node["build"]["args"]["KUGETSU_EXTRAS"].split()
        assert "postgres" in node["depends_on"]
        config = node_config(node, tmp_path)
        assert config.storage.database_url, name
        urls.add(config.storage.database_url)
        assert str(config.storage.data_dir) == image_env()["KUGETSU_DATA_DIR"]
        assert (config.server.host, config.server.port) == ("0.0.0.0", 8080)
    [url] = urls
    parts = urlsplit(url)
    assert parts.scheme == "postgresql" and parts.hostname == "postgres" and parts.port == 5432
    assert parts.username == postgres["environment"]["POSTGRES_USER"]
    assert parts.password == DOT_ENV["POSTGRES_PASSWORD"]
    assert parts.path.lstrip("/") == postgres["environment"]["POSTGRES_DB"]
    assert postgres["healthcheck"]["test"][-4:] == [
        "-U",
        parts.username,
        "-d",
        parts.path.lstrip("/"),
    ]
    # only the receiver takes Gitea's deliveries, on the port the image serves
    published = {name: node.get("ports") for name, node in nodes.items() if node.get("ports")}
    assert list(published) == [n for n, r in roles.items() if r[1] == "receiver"]
    assert published[next(iter(published))] == ["8080:8080"]
