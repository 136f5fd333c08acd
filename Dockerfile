# kugetsu container image.
#
# Build (opencode only, the default):
#   docker build -t kugetsu .
# Build with other agent CLIs (space-separated npm package specs):
#   docker build -t kugetsu \
#     --build-arg AGENT_PACKAGES="opencode-ai@1.18.33 @anthropic-ai/claude-code@2.1.197 @openai/codex@0.169.0" .
# Build without any agent CLI (for a custom agent you add in a derived image):
#   docker build -t kugetsu --build-arg AGENT_PACKAGES="" .
# Build with aider as well (installed from PyPI into its own virtualenv):
#   docker build -t kugetsu --build-arg AIDER_VERSION=0.86.2 .
#
# Run:
#   docker run -d --name kugetsu -p 8080:8080 -v kugetsu-data:/data \
#     -e KUGETSU_GITEA_URL=http://gitea:3000 \
#     -e KUGETSU_GITEA_TOKEN=... -e KUGETSU_WEBHOOK_SECRET=... \
#     kugetsu
#
# Configuration inside the image:
#   The server binds to server.host, which defaults to 127.0.0.1 and would be
#   unreachable from outside the container. The image therefore ships a small
#   config file, /etc/kugetsu/config.toml, that sets host = "0.0.0.0" and
#   port = 8080, and sets KUGETSU_CONFIG to point at it. Everything else comes
#   from the KUGETSU_* environment variables and the built-in defaults.
#   To use your own config (agents, triggers, ...), either mount it over
#   /etc/kugetsu/config.toml or mount it elsewhere and set KUGETSU_CONFIG to
#   its path. Your file must keep [server] host = "0.0.0.0", and port = 8080
#   unless you also change EXPOSE, the port mapping and the HEALTHCHECK.
#   Keep secrets in the environment, not in the file.

FROM python:3.11-slim-bookworm

# Space-separated npm package specs installed with `npm install -g`.
# Pin exact versions: agent CLIs change their flags and output often, and
# kugetsu's presets were tested with these. Empty means no agent CLI and no
# Node.js in the image.
ARG AGENT_PACKAGES="opencode-ai@1.18.33"

# aider version to install from PyPI (e.g. 0.86.2). Empty means no aider.
ARG AIDER_VERSION=""

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# System packages:
#   git              kugetsu clones, makes worktrees, commits and pushes
#   ca-certificates  HTTPS to Gitea and to the LLM providers
#   tini             a tiny init as PID 1: forwards signals to kugetsu and
#                    reaps the orphaned processes agents leave behind
#                    (`docker run --init` would do the same; tini is already
#                    the ENTRYPOINT here, so there is no need for both)
#   ripgrep          opencode's glob and grep tools call `rg`; without it they
#                    try to download ripgrep at run time and fail
#   nodejs, npm      only when AGENT_PACKAGES is not empty; codex and claude
#                    code start through Node.js, so it stays in the image
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends git ca-certificates tini ripgrep; \
    if [ -n "$AGENT_PACKAGES" ]; then \
        apt-get install -y --no-install-recommends nodejs npm; \
    fi; \
    rm -rf /var/lib/apt/lists/*

# Agent CLIs from npm, installed globally into /usr/local (on PATH).
RUN set -eux; \
    if [ -n "$AGENT_PACKAGES" ]; then \
        npm install -g --no-audit --no-fund $AGENT_PACKAGES; \
        npm cache clean --force; \
        rm -rf /root/.npm; \
    fi

# aider in a virtualenv of its own, so its many pinned dependencies cannot
# clash with kugetsu's; the `aider` command is linked onto PATH.
RUN set -eux; \
    if [ -n "$AIDER_VERSION" ]; then \
        python -m venv /opt/aider; \
        /opt/aider/bin/pip install --no-cache-dir "aider-chat==$AIDER_VERSION"; \
        ln -s /opt/aider/bin/aider /usr/local/bin/aider; \
    fi

# kugetsu itself. .dockerignore limits the build context to what the package
# needs (pyproject.toml, README, the bot/ package), so local data, virtualenvs
# and secrets such as .env never end up in the image.
COPY . /tmp/kugetsu-src
RUN set -eux; \
    pip install --no-cache-dir /tmp/kugetsu-src; \
    rm -rf /tmp/kugetsu-src; \
    kugetsu --help > /dev/null

# A non-root user (uid/gid 1000) that runs kugetsu and the agents, the
# default config, and the data directory. Each agent run still gets its own
# HOME under /data/homes, so nothing is shared between issues.
RUN set -eux; \
    groupadd --gid 1000 kugetsu; \
    useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash kugetsu; \
    mkdir -p /etc/kugetsu /data; \
    printf '%s\n' \
        '# Baked into the kugetsu image. Replace this file, or set KUGETSU_CONFIG,' \
        '# to configure more; keep host = "0.0.0.0" so Gitea can reach the server.' \
        '[server]' \
        'host = "0.0.0.0"' \
        'port = 8080' \
        > /etc/kugetsu/config.toml; \
    chown kugetsu:kugetsu /data

ENV KUGETSU_CONFIG=/etc/kugetsu/config.toml \
    KUGETSU_DATA_DIR=/data

# Database, logs, mirrors, worktrees and agent homes. Keep it on a volume:
# it is the only state kugetsu has.
VOLUME /data

USER 1000:1000
WORKDIR /home/kugetsu

# POST /webhook for Gitea, GET /healthz for health checks.
EXPOSE 8080

# The slim image has no curl, so Python does the probe. urlopen raises (and
# the command exits non-zero) on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["kugetsu", "serve"]
