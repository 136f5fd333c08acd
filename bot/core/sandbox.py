"""Whether the sandbox can be had, and what to say when it cannot: from facts to a verdict.

With `sandbox.mode = "user"` each concurrency slot's agent runs as a uid of its own
(`first_uid + slot`), kugetsu itself runs as an unprivileged service user, and a small
launcher keeps the few capabilities that takes (bot/launcher.py). `assess()` turns the
facts gathered at start (`bot.sandbox.gather`) into the state `serve`, `/healthz` and
`kugetsu doctor` report: the mode in effect, the one line that stops `serve` when
`mode = "user"` cannot be had, and the warnings to print when it runs without it.

Pure: no I/O; the facts are gathered elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

#: what the launcher keeps, and so what kugetsu needs when it is not started as root:
#: switching to a slot's uid and gid, handing a worktree and home to it and back (chown,
#: and chmod of the files it leaves), and walking what it leaves without reading rights
LAUNCHER_CAPABILITIES = ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE")


@dataclass(frozen=True)
class SandboxFacts:
    """What `assess` needs to know, gathered at start."""

    #: sandbox.mode as configured: "none", "user" or "auto"
    mode: str
    #: the effective uid kugetsu was started as, and its effective capabilities by name
    euid: int
    capabilities: frozenset[str] = frozenset()
    #: sandbox.user as written, and its uid (None: there is no such user)
    service_user: str = "kugetsu"
    service_uid: int | None = None
    #: the slots' uids, first_uid + k for each concurrency slot
    slot_uids: tuple[int, ...] = ()
    #: slot uids or gids that belong to an account or group of this system, as "uid 20001 (bob)"
    taken: tuple[str, ...] = ()
    #: ids kugetsu needs (the service user's, the slots') that this user namespace cannot use
    unmapped: tuple[int, ...] = ()
    #: what the service user or the slots cannot reach, each as a phrase ("kugetsu's user
    #: (uid 1000) cannot read the config file /etc/kugetsu/config.toml")
    unreachable: tuple[str, ...] = ()
    #: a config file that holds the Gitea token and that other users can read
    readable_token_config: str | None = None


@dataclass(frozen=True)
class SandboxState:
    """The sandbox as kugetsu runs it."""

    #: as configured
    configured: str
    #: in effect: "user" or "none"
    mode: str
    #: why "user" cannot be had; empty when it can
    missing: tuple[str, ...] = ()
    #: with mode = "user" that cannot be had: the one line `serve` stops with
    error: str | None = None
    #: printed at start and listed by /healthz while kugetsu runs
    warnings: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.mode == "user"


def _ids(ids: tuple[int, ...]) -> str:
    if not ids:
        return "none"
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"


def missing(f: SandboxFacts) -> tuple[str, ...]:
    """Why agents cannot run as uids of their own here; empty when they can."""
    found: list[str] = []
    lacking = [c for c in LAUNCHER_CAPABILITIES if c not in f.capabilities]
    if lacking:
        who = "root" if f.euid == 0 else f"uid {f.euid}"
        found.append(
            f"kugetsu runs as {who} without {', '.join(lacking)} "
            "(start it as root, or give it those capabilities)"
        )
        return tuple(found)
    if f.service_uid is None:
        found.append(f"there is no user {f.service_user!r} (sandbox.user) for kugetsu to run as")
    elif f.service_uid == 0:
        found.append("sandbox.user is root; kugetsu needs an unprivileged user of its own")
    slots = _ids(f.slot_uids)
    clash = [u for u in f.slot_uids if u == 0 or u == f.service_uid]
    if clash:
        found.append(f"slot uids {slots} (sandbox.first_uid) include kugetsu's own uid {clash[0]}")
    for account in f.taken:
        found.append(f"{account} belongs to this system; slot uids {slots} must be unused")
    if f.unmapped:
        found.append(f"this user namespace does not map uids {_ids(f.unmapped)}")
    found += f.unreachable
    return tuple(found)


def assess(f: SandboxFacts) -> SandboxState:
    """The sandbox in effect, the error that stops `serve`, and the warnings to give."""
    why = missing(f)
    warnings: list[str] = []
    if f.readable_token_config:
        warnings.append(
            f"config: {f.readable_token_config} holds the Gitea token and other users can "
            "read it; chmod 600 it (640 with kugetsu's group)"
        )
    if f.mode == "user" and why:
        return SandboxState(
            configured=f.mode,
            mode="none",
            missing=why,
            error='sandbox.mode = "user" cannot be had: ' + "; ".join(why),
            warnings=tuple(warnings),
        )
    if f.mode in ("user", "auto") and not why:
        return SandboxState(configured=f.mode, mode="user", warnings=tuple(warnings))
    if f.mode == "auto":
        warnings.insert(
            0,
            "sandbox: off, agents run as kugetsu's own user and can read what it can, "
            f'its token included (sandbox.mode = "auto": {why[0]})',
        )
    elif f.euid == 0:
        warnings.insert(
            0,
            'sandbox: off while kugetsu runs as root (sandbox.mode = "none"): agents run as '
            'root, can read its token and signal it; set sandbox.mode = "user"',
        )
    return SandboxState(configured=f.mode, mode="none", missing=why, warnings=tuple(warnings))
