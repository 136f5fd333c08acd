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
#
# Layout: three build stages install the agent CLIs, aider and kugetsu, each
# into its own directory under /opt; the final stage copies those directories
# and nothing else from them. npm, pip's build tools, the npm cache and the
# per-platform builds the agent packages download stay behind in the build
# stages.

# Space-separated npm package specs installed with `npm install -g`.
# Pin exact versions: agent CLIs change their flags and output often, and
# kugetsu's presets were tested with these. Empty means no agent CLI and no
# Node.js in the image.
ARG AGENT_PACKAGES="opencode-ai@1.18.33"

# aider version to install from PyPI (e.g. 0.86.2). Empty means no aider.
ARG AIDER_VERSION=""

# ---------------------------------------------------------------------------
# Agent CLIs from npm, into /opt/agents (commands in /opt/agents/bin).
FROM python:3.11-slim-bookworm AS agents
ARG AGENT_PACKAGES
# opencode and claude code ship their program as a native executable: their
# install script copies the build for this machine (for opencode, the AVX2 or
# the baseline build, whichever this CPU runs) from a per-platform package in
# their own node_modules over the command's file. That node_modules is then
# unused at run time, and for opencode it holds both x64 builds (185 MB each).
# So a package whose commands are all native executables keeps only its own
# files. A package whose command is a Node.js script (codex) keeps everything:
# the script finds its binary there at run time.
# The install is made readable and executable by every uid (o+rX) and writable
# by root only (go-w): agents may run as other users, and none may change a
# program another one runs.
RUN set -eux; \
    mkdir -p /opt/agents; \
    if [ -n "$AGENT_PACKAGES" ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends nodejs npm; \
        npm install -g --prefix /opt/agents --no-audit --no-fund $AGENT_PACKAGES; \
        cd /opt/agents/lib/node_modules; \
        for pkg in $(ls -d */ @*/*/ 2>/dev/null); do \
            pkg=${pkg%/}; \
            [ -d "$pkg/node_modules" ] || continue; \
            native=""; \
            for cmd in $(find /opt/agents/bin -lname "*/node_modules/$pkg/*"); do \
                if [ "$(od -An -tx1 -N4 "$cmd" | tr -d ' \n')" = 7f454c46 ]; then \
                    native=${native:-yes}; \
                else \
                    native=no; \
                fi; \
            done; \
            if [ "$native" = yes ]; then \
                echo "$pkg: its commands are native executables; dropping its node_modules"; \
                rm -rf "$pkg/node_modules"; \
            fi; \
        done; \
        chmod -R o+rX,go-w /opt/agents; \
    fi

# ---------------------------------------------------------------------------
# aider in a virtualenv of its own, so its many pinned dependencies cannot
# clash with kugetsu's.
FROM python:3.11-slim-bookworm AS aider
ARG AIDER_VERSION
RUN set -eux; \
    mkdir -p /opt/aider; \
    if [ -n "$AIDER_VERSION" ]; then \
        python -m venv /opt/aider; \
        /opt/aider/bin/pip install --no-cache-dir --disable-pip-version-check "aider-chat==$AIDER_VERSION"; \
        chmod -R o+rX,go-w /opt/aider; \
    fi

# ---------------------------------------------------------------------------
# kugetsu itself: built as a wheel and installed into a virtualenv without
# pip or setuptools. .dockerignore limits the build context to what the
# package needs (pyproject.toml, README, the bot/ package), so local data,
# virtualenvs and secrets such as .env never end up in the image.
# KUGETSU_EXTRAS: optional extras of the package, e.g. "postgres" for the PostgreSQL
# store (several machines on one queue: README, "Running on several machines").
FROM python:3.11-slim-bookworm AS kugetsu
ARG KUGETSU_EXTRAS=""
COPY . /tmp/kugetsu-src
RUN set -eux; \
    pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /tmp/wheels /tmp/kugetsu-src; \
    python -m venv /opt/kugetsu; \
    wheel="$(ls /tmp/wheels/kugetsu-*.whl)"; \
    /opt/kugetsu/bin/pip install --no-cache-dir --disable-pip-version-check "$wheel${KUGETSU_EXTRAS:+[$KUGETSU_EXTRAS]}"; \
    /opt/kugetsu/bin/pip uninstall --yes --disable-pip-version-check pip setuptools; \
    chmod -R o+rX,go-w /opt/kugetsu

# ---------------------------------------------------------------------------
# The image.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

COPY --from=agents /opt/agents /opt/agents
COPY --from=aider /opt/aider /opt/aider

# System packages:
#   git              kugetsu clones, makes worktrees, commits and pushes
#   ca-certificates  HTTPS to Gitea and to the LLM providers
#   tini             a tiny init as PID 1: forwards signals to kugetsu and
#                    reaps the orphaned processes agents leave behind
#                    (`docker run --init` would do the same; tini is already
#                    the ENTRYPOINT here, so there is no need for both)
#   ripgrep          opencode's glob and grep tools call `rg`; without it they
#                    try to download ripgrep at run time and fail
#   nodejs           only when an agent command is a Node.js script rather
#                    than a native executable (codex: bin/codex.js starts its
#                    binary through Node.js). opencode and claude code are
#                    native executables and run without it. npm is never in
#                    the image.
# `apt-get clean` drops the downloaded .deb files and apt's package cache; the
# official base image's apt config already does that, a base without it would
# keep them in the image. The agent commands and aider are linked onto PATH
# (/usr/local/bin).
RUN set -eux; \
    node=""; \
    for cmd in /opt/agents/bin/*; do \
        [ -e "$cmd" ] || continue; \
        if [ "$(od -An -tx1 -N4 "$cmd" | tr -d ' \n')" != 7f454c46 ]; then \
            echo "$(basename "$cmd") is not a native executable: keeping Node.js"; \
            node=nodejs; \
        fi; \
    done; \
    apt-get update; \
    apt-get install -y --no-install-recommends git ca-certificates tini ripgrep $node; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*; \
    for cmd in /opt/agents/bin/* /opt/aider/bin/aider; do \
        if [ -e "$cmd" ]; then ln -s "$cmd" /usr/local/bin/; fi; \
    done; \
    rmdir --ignore-fail-on-non-empty /opt/agents /opt/aider

# Every installed agent CLI must start, as a uid that is neither root nor
# kugetsu's (nobody, 65534): this checks that the install is complete after
# the pruning above and that other users can read and run it. (The home is
# outside /tmp because codex warns about helper files in a temporary dir.)
RUN set -eux; \
    closed=$(find /opt -mindepth 1 \( ! -perm -o+r -o -type d ! -perm -o+x \) -print -quit); \
    if [ -n "$closed" ]; then echo "not readable by other users: $closed"; exit 1; fi; \
    home=$(mktemp -d /var/tmp/agent-check.XXXXXX); chown 65534:65534 "$home"; \
    for cmd in opencode claude codex aider; do \
        if command -v "$cmd" > /dev/null; then \
            setpriv --reuid=65534 --regid=65534 --clear-groups \
                env HOME="$home" "$cmd" --version < /dev/null; \
        fi; \
    done; \
    rm -rf "$home"

# The sandbox (README, "Agents in a sandbox"): the container starts as root,
# kugetsu drops to the unprivileged user kugetsu (uid/gid 1000) for everything
# it does, and each concurrency slot's agent runs as a uid of its own (20000,
# 20001, ...; they need no account). Docker's default capabilities are enough.
# sandbox.mode = "auto": where the container cannot start as root (a rootless
# runtime without those capabilities, Kubernetes runAsNonRoot with uid 1000),
# kugetsu runs without the sandbox and warns at start, in /healthz and in
# `kugetsu doctor`. Each agent run still gets its own HOME under /data/homes.
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
        '' \
        '[sandbox]' \
        'mode = "auto"' \
        'user = "kugetsu"' \
        > /etc/kugetsu/config.toml; \
    chmod 644 /etc/kugetsu/config.toml; \
    chown kugetsu:kugetsu /data; \
    chmod 700 /data

# Last, since it changes most often: kugetsu's virtualenv, with the
# `kugetsu` command linked onto PATH.
COPY --from=kugetsu /opt/kugetsu /opt/kugetsu
RUN set -eux; \
    ln -s /opt/kugetsu/bin/kugetsu /usr/local/bin/kugetsu; \
    kugetsu --help > /dev/null

ENV KUGETSU_CONFIG=/etc/kugetsu/config.toml \
    KUGETSU_DATA_DIR=/data

# Database, logs, mirrors, worktrees and agent homes. Keep it on a volume:
# it is the only state kugetsu has.
VOLUME /data

# No USER: kugetsu starts as root and drops to kugetsu (uid 1000) itself.
WORKDIR /home/kugetsu

# POST /webhook for Gitea, GET /healthz for health checks.
EXPOSE 8080

# The slim image has no curl, so Python does the probe. urlopen raises (and
# the command exits non-zero) on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["kugetsu", "serve"]
