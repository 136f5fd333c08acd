"""One item a tick step cannot process is set aside with a reason; the others go on.

Every step of the tick (recover, authorize, launch, outbox, tracking comments) works
through a list of tasks or outbox items. Without a guard, one item that raises (a row
no code path should have written, a bug met by one task only) raises on every tick,
forever, and nothing behind it gets done. `on_its_own` runs one item: if it raises,
the item is logged and set aside through the step's own `set_aside(reason)` (a task
fails or is rejected through the store's compare-and-set, an outbox item is marked done
with the error), so it leaves the step's work list for good.

Failures of what kugetsu stands on, rather than of one item, are not set aside: a
database that cannot be written or a Gitea that is away would set aside every item in
turn. They end the step as before, the tick fails, and /healthz reports a tick that
keeps failing. If setting an item aside fails too, that error ends the tick as well.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from bot.core.health import describe
from bot.gitea import ServerError, Unreachable
from bot.sandbox import SandboxError
from bot.store import OPERATIONAL_ERRORS, LeaseLost

log = logging.getLogger(__name__)

#: errors of the surroundings, not of one item: they propagate (a lost lease too: the
#: item is someone else's to do now; a launcher that cannot be reached, or a slot whose
#: processes survive SIGKILL, holds up every task alike)
SURROUNDINGS: tuple[type[BaseException], ...] = (
    *OPERATIONAL_ERRORS,
    ServerError,
    Unreachable,
    LeaseLost,
    SandboxError,
)


@contextmanager
def on_its_own(step: str, item: object, set_aside: Callable[[str], object]) -> Iterator[None]:
    """Run one item of a tick step; if it raises, set it aside with a reason and go on."""
    try:
        yield
    except SURROUNDINGS:
        raise
    except Exception as exc:
        reason = f"{step} failed: {describe(exc)}"
        log.exception("item set aside", extra={"step": step, "item": item})
        set_aside(reason)
