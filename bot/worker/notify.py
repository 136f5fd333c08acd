"""The notification lane: sends `[[notify]]` events, in order per endpoint, off the tick.

The store writes a notification as an outbox row for each endpoint that wants the event,
in the transaction that changes the task (`Store._changed`). Here each endpoint has a
thread of its own that sends its rows in the order they were written: the first one not
yet sent holds the ones behind it, so an endpoint gets every task's events in order. An
endpoint that fails (no answer, not 2xx) has that row tried again after a wait that
doubles from RETRY_FIRST_SECONDS up to RETRY_MOST_SECONDS; a row not taken within the
endpoint's `retry_hours` of being written is dropped with an error in the log. Nothing
here runs in the tick or a runner, so an endpoint that is slow or down never delays a
task, nor another endpoint.

With several workers on one database, the holder of an endpoint's lease sends for it.
A crash between an endpoint's answer and the row's mark sends that event again, with the
same `X-Kugetsu-Delivery` id, so a receiver can tell.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from bot.config import Config, NotifyConfig
from bot.core.tasks import doubling
from bot.notify import NotSent
from bot.store import DATABASE_ERRORS, Store
from bot.worker.outbox import HANDLERS, Outbox

log = logging.getLogger(__name__)

#: rows read per look at an endpoint's queue
BATCH = 50
#: how often an endpoint's thread looks at its queue when nothing wakes it
POLL_SECONDS = 5.0
RETRY_FIRST_SECONDS = 2.0
RETRY_MOST_SECONDS = 300.0
LEASE_SECONDS = 120.0


class NotifyLane:
    """One thread per configured endpoint; `wake()` after the queue changed."""

    def __init__(
        self,
        config: Config,
        store: Store,
        outbox: Outbox,
        owner: str,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self.config, self.store, self.outbox, self.owner = config, store, outbox, owner
        self.clock = clock
        self._stop = threading.Event()
        self._wakes = {n.id: threading.Event() for n in config.notify}
        self._threads: list[threading.Thread] = []
        self._lease_until: dict[str, float] = {}

    def start(self) -> None:
        self.drop_unknown()
        for endpoint in self.config.notify:
            thread = threading.Thread(
                target=self._loop, args=(endpoint,), name=f"notify-{endpoint.shown}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def wake(self) -> None:
        for event in self._wakes.values():
            event.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout)
        # the leases go with the owner's others (Worker.shutdown, Store.unregister_worker)

    def drop_unknown(self) -> int:
        """Notifications for endpoints no longer in the config are dropped, with the reason."""
        known = {n.id for n in self.config.notify}
        dropped = 0
        for endpoint in self.store.notify_endpoints():
            if endpoint not in known:
                count = self.store.drop_notifications(endpoint, "endpoint no longer configured")
                log.warning(
                    "notifications dropped: endpoint no longer configured",
                    extra={"endpoint": endpoint, "count": count},
                )
                dropped += count
        return dropped

    def _loop(self, endpoint: NotifyConfig) -> None:
        wake = self._wakes[endpoint.id]
        while not self._stop.is_set():
            wake.clear()
            try:
                self.work(endpoint)
            except DATABASE_ERRORS as exc:
                log.error(
                    "notification pass failed",
                    extra={"endpoint": endpoint.shown, "error": str(exc)},
                )
            except Exception:
                log.exception("notification pass failed", extra={"endpoint": endpoint.shown})
            wake.wait(POLL_SECONDS)

    @staticmethod
    def _lease_name(endpoint: NotifyConfig) -> str:
        return f"notify:{endpoint.id}"

    def _leased(self, endpoint: NotifyConfig) -> bool:
        """Hold the endpoint's lease (renewed when half of it is used up)."""
        now = self.clock()
        if now < self._lease_until.get(endpoint.id, float("-inf")) - LEASE_SECONDS / 2:
            return True
        if self.store.try_lease(self._lease_name(endpoint), self.owner, LEASE_SECONDS):
            self._lease_until[endpoint.id] = now + LEASE_SECONDS
            return True
        self._lease_until.pop(endpoint.id, None)
        return False

    def work(self, endpoint: NotifyConfig) -> int:
        """Send what is due to `endpoint`, in order, until one is not taken or none is left;
        returns how many were sent."""
        sent = 0
        while not self._stop.is_set() and self._leased(endpoint):
            items = self.store.notify_queue(endpoint.id, BATCH)
            if not items:
                return sent
            for item in items:
                now = self.clock()
                if now - item.created_at > endpoint.retry_seconds:
                    reason = f"not taken within {endpoint.retry_hours:g} hours: {item.error}"
                    self.store.outbox_done(item.id, error=reason[:1000])
                    log.error(
                        "notification dropped",
                        extra={"endpoint": endpoint.shown, "item": item.id, "task": item.target},
                    )
                    continue
                if item.not_before > now:
                    return sent  # the first one waits, and those behind it with it
                try:
                    HANDLERS[item.kind].send(self.outbox, item)
                except NotSent as exc:
                    delay = doubling(RETRY_FIRST_SECONDS, item.attempts + 1, RETRY_MOST_SECONDS)
                    self.store.outbox_retry(item.id, delay, str(exc))
                    log.warning(
                        "notification not taken; will retry",
                        extra={"endpoint": endpoint.shown, "item": item.id, "in": delay},
                    )
                    return sent
                except Exception as exc:
                    # a row that cannot be sent at all (unreadable body): set aside
                    self.store.outbox_done(item.id, error=f"set aside: {exc!r}"[:500])
                    log.error(
                        "notification set aside",
                        extra={"endpoint": endpoint.shown, "item": item.id, "error": repr(exc)},
                    )
                    continue
                self.store.outbox_done(item.id)
                sent += 1
        return sent
