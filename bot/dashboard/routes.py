"""The dashboard's pages on the receiver's Flask app (see the package's docstring)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, Flask, Response, redirect, render_template, request, url_for
from markupsafe import Markup
from werkzeug.wrappers import Response as BaseResponse

from bot import tasklog
from bot.config import Config
from bot.core import events, render
from bot.core.tasks import TERMINAL_STATES, CancelResult, State, Task
from bot.dashboard import PAGE_SLOTS, charts, comment, logstream, views
from bot.dashboard.access import UNKNOWN, Access, SignedOut, Visible
from bot.dashboard.auth import LOGIN_COOKIE, OAUTH_SCOPE, SESSION_COOKIE, Session, Sessions
from bot.gitea import GiteaClient, GiteaError, GiteaOAuth, OAuthError
from bot.store import Store, TaskQuery

log = logging.getLogger(__name__)

#: pending tasks read to place each in the queue (the rest are counted)
QUEUE_SCAN = 1000
#: rows shown per list
QUEUE_SHOWN = 50
FINISHED_SHOWN = 25
#: bytes read from the end of a running task's log for its last line
TAIL_READ = 4096
#: bytes of the prompt an agent was given shown on its task page at most
PROMPT_SHOWN = 64 * 1024
#: charts are drawn again after this long
CHARTS_SECONDS = 60.0
CHART_DAYS = (7, 30, 90)
#: how long a browser told that every live log slot is taken waits before it asks again
BUSY_RETRY_MS = 10_000
#: the same security headers on every dashboard answer; no inline script or style runs
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self' {gitea}"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class _Stream:
    """A live log response whose slot is given back when waitress closes it, whether
    or not it was ever read (a generator's `finally` runs only once it has started)."""

    def __init__(self, events: Iterator[bytes], release: Callable[[], None]):
        self._events, self._release = events, release
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with suppress(Exception):
                self._events.close()  # type: ignore[attr-defined]
            self._release()


class Dashboard:
    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        wake: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config, self.store, self.wake, self.clock = config, store, wake, clock
        dash = config.dashboard
        self.secure = config.server.public_url.startswith("https://")
        self.redirect_uri = config.server.public_url + "/oauth/callback"
        self.sessions = Sessions(dash.session_hours * 3600.0, clock=clock)
        self.oauth = GiteaOAuth(
            config.gitea.url, dash.gitea_public_url, dash.oauth_client_id, dash.oauth_client_secret
        )
        self.access = Access(config, store.task_repos, self.sessions, self.oauth, clock=clock)
        self.pages = threading.BoundedSemaphore(PAGE_SLOTS)
        self.streams = threading.BoundedSemaphore(dash.max_log_streams)
        self._charts: dict[tuple[Any, ...], tuple[float, list[charts.Chart]]] = {}
        gitea_origin = "{0.scheme}://{0.netloc}".format(urlsplit(dash.gitea_public_url))
        self.headers = {
            **SECURITY_HEADERS,
            "Content-Security-Policy": SECURITY_HEADERS["Content-Security-Policy"].format(
                gitea=gitea_origin
            ),
        }

    # ------------------------------------------------------------------ wiring

    def register(self, app: Flask) -> None:
        bp = Blueprint(
            "dashboard",
            __name__,
            template_folder="templates",
            static_folder="static",
            static_url_path="/assets",
        )
        bp.add_url_rule("/", "overview", self.overview)
        bp.add_url_rule("/login", "login", self.login)
        bp.add_url_rule("/oauth/callback", "callback", self.callback)
        bp.add_url_rule("/logout", "logout", self.logout, methods=["POST"])
        bp.add_url_rule("/tasks/<int:task_id>", "task", self.task)
        bp.add_url_rule("/tasks/<int:task_id>/log", "log_part", self.log_part)
        bp.add_url_rule("/tasks/<int:task_id>/log.txt", "log_file", self.log_file)
        bp.add_url_rule("/tasks/<int:task_id>/log/stream", "log_stream", self.log_stream)
        bp.add_url_rule(
            "/tasks/<int:task_id>/<any(stop, retry):action>",
            "act",
            self.act,
            methods=["POST"],
        )
        bp.add_url_rule("/charts", "charts", self.charts)
        bp.after_request(self._secure)
        bp.app_template_filter("when")(_when)
        bp.app_template_filter("ago")(_ago)
        bp.app_template_filter("money")(_money)
        bp.app_template_filter("count")(_count)
        bp.app_template_global("duration")(views.duration)
        app.register_blueprint(bp)
        self._follow_log_links(app)

    def _follow_log_links(self, app: Flask) -> None:
        """The signed log link in a tracking comment opens the task page for people
        signed in who may read the task's repository, and stays the plain log for
        everyone else (and with `?plain`)."""
        plain = app.view_functions["task_log"]

        def task_log(task_id: int, token: str) -> Any:
            if "plain" not in request.args and events.equal_secrets(
                token, render.log_token(self.config, task_id)
            ):
                session = self._session()
                task = self.store.get(task_id) if session is not None else None
                if session is not None and task is not None:
                    with suppress(SignedOut):
                        if self._can_read(session, task.repo):
                            return redirect(url_for("dashboard.task", task_id=task_id), 303)
            return plain(task_id=task_id, token=token)

        app.view_functions["task_log"] = task_log

    def _secure(self, response: Response) -> BaseResponse:
        response.headers.update(self.headers)
        if not request.path.startswith("/assets/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    # ------------------------------------------------------------------ helpers

    def _session(self) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def _page(self, template: str, status: int = 200, **context: Any) -> BaseResponse:
        session = context.pop("session", None)
        body = render_template(
            template,
            session=session,
            config=self.config,
            gitea=self.config.dashboard.gitea_public_url,
            now=self.clock(),
            views=views,
            **context,
        )
        return Response(body, status=status, mimetype="text/html")

    def _signin(self, status: int = 401, message: str = "") -> BaseResponse:
        target = request.full_path if request.method == "GET" else "/"
        return self._page(
            "signin.html",
            status=status,
            next=target.rstrip("?"),
            message=message,
            signed_out="signed_out" in request.args,
        )

    def _busy(self) -> BaseResponse:
        response = self._page(
            "error.html",
            status=503,
            title="Busy",
            message="The dashboard is answering as many pages as it serves at once. "
            "Try again in a moment.",
        )
        response.headers["Retry-After"] = "2"
        return response

    def _can_read(self, session: Session, repo: str) -> bool:
        if session.is_admin:
            return True
        perm = self.access.permission(session, repo)
        return perm not in (UNKNOWN, "none")

    def _visible_task(self, session: Session, task_id: int) -> Task | None:
        task = self.store.get(task_id)
        if task is None or not self._can_read(session, task.repo):
            return None
        return task

    def _guarded(self, view: Callable[[Session], BaseResponse]) -> BaseResponse:
        """Run a page for a signed-in user in one of the page slots."""
        session = self._session()
        if session is None:
            return self._signin()
        if not self.pages.acquire(blocking=False):
            return self._busy()
        try:
            return view(session)
        except SignedOut:
            return self._signed_out()
        finally:
            self.pages.release()

    def _signed_out(self) -> BaseResponse:
        response = self._signin(message="Your sign-in has ended; sign in again.")
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def _not_found(self, session: Session) -> BaseResponse:
        # a task of a repository the user cannot read is answered as if it did not exist
        return self._page(
            "error.html", status=404, session=session, title="Not found", message="No such task."
        )

    def _forbidden(self, why: str, session: Session | None = None) -> BaseResponse:
        return self._page(
            "error.html", status=403, session=session, title="Not allowed", message=why
        )

    # ------------------------------------------------------------------ sign-in

    def login(self) -> BaseResponse:
        state, verifier = self.sessions.begin_login(request.args.get("next", "/"))
        from bot.dashboard.auth import pkce_challenge

        url = self.oauth.authorize_url(
            redirect_uri=self.redirect_uri,
            state=state,
            code_challenge=pkce_challenge(verifier),
            scope=OAUTH_SCOPE,
        )
        response = redirect(url, 302)
        response.set_cookie(
            LOGIN_COOKIE,
            self.sessions.signer.sign(state),
            max_age=600,
            path="/oauth",
            secure=self.secure,
            httponly=True,
            samesite="Lax",
        )
        return response

    def callback(self) -> BaseResponse:
        found = self.sessions.finish_login(
            request.args.get("state"), request.cookies.get(LOGIN_COOKIE)
        )
        if request.args.get("error"):
            return self._signin(403, "Gitea did not sign you in: " + request.args["error"][:100])
        if found is None or not request.args.get("code"):
            return self._signin(
                400, "That sign-in was not started in this browser, or has expired."
            )
        verifier, target = found
        try:
            tokens = self.oauth.exchange_code(
                code=request.args["code"], verifier=verifier, redirect_uri=self.redirect_uri
            )
            client = GiteaClient(
                self.config.gitea.url, tokens["access_token"], timeout=10, retries=0
            )
            user = client.get_user()
        except (OAuthError, GiteaError) as exc:
            log.warning("dashboard sign-in failed", extra={"error": str(exc)})
            return self._signin(502, "Gitea did not confirm the sign-in; try again.")
        session = self.sessions.create(
            str(user["login"]),
            bool(user.get("is_admin")),
            tokens["access_token"],
            str(tokens.get("refresh_token") or ""),
            float(tokens.get("expires_in") or 3600),
        )
        log.info("dashboard sign-in", extra={"user": session.login, "admin": session.is_admin})
        response = redirect(target, 303)
        response.set_cookie(
            SESSION_COOKIE,
            self.sessions.cookie(session),
            max_age=int(self.config.dashboard.session_hours * 3600),
            path="/",
            secure=self.secure,
            httponly=True,
            samesite="Lax",
        )
        response.delete_cookie(LOGIN_COOKIE, path="/oauth")
        return response

    def _same_origin(self) -> bool:
        """A form posted from this site: the browser's Origin (when it sends one) is ours."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # no Origin: not a cross-site form (browsers send it with those)
        ours = "{0.scheme}://{0.netloc}".format(urlsplit(self.config.server.public_url))
        return origin in (ours, request.host_url.rstrip("/"))

    def logout(self) -> BaseResponse:
        session = self._session()
        if session is not None:
            if not (self._same_origin() and session.csrf_ok(request.form.get("csrf"))):
                return self._forbidden("The form was not sent from this page.", session)
            self.sessions.drop(session)
            log.info("dashboard sign-out", extra={"user": session.login})
        response = redirect(url_for("dashboard.overview", signed_out=1), 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ------------------------------------------------------------------ the overview

    def overview(self) -> BaseResponse:
        if self._session() is None:
            # the page's own refresh reloads on 401, to the sign-in page, rather than
            # put that page inside the overview
            return self._signin(401 if request.args.get("fragment") == "live" else 200)
        return self._guarded(self._overview)

    def _filters(self, visible: Visible) -> tuple[dict[str, str], TaskQuery, str | None]:
        """The filters asked for (as shown in the form), the query they make, and an
        error about one that cannot be read."""
        args = request.args
        shown = {
            k: args.get(k, "").strip()[:200] for k in ("repo", "state", "agent", "requester", "q")
        }
        error = None
        repo = shown["repo"] or None
        number = None
        text = shown["q"].lstrip("#")
        if text:
            if "#" in text:
                repo, _, text = text.rpartition("#")
            if text.isdigit() and len(text) <= 18:
                number = int(text)
            else:
                error = "Search by issue number: 42, #42 or owner/repo#42."
        state = None
        if shown["state"]:
            try:
                state = State(shown["state"])
            except ValueError:
                error = f"There is no state {shown['state']!r}."
        repos = visible.query_repos
        if repo:
            repos = (repo,) if visible.can_read(repo) else ()
        query = TaskQuery(
            repos=repos,
            state=state,
            agent=shown["agent"] or None,
            requester=shown["requester"] or None,
            issue=number,
        )
        return shown, query, error

    def _overview(self, session: Session) -> BaseResponse:
        now = self.clock()
        visible = self.access.visible(session)
        shown, query, error = self._filters(visible)

        def matches(task: Task) -> bool:
            return (
                (query.repos is None or task.repo in query.repos)
                and (query.agent is None or task.agent == query.agent)
                and (query.requester is None or task.requested_by == query.requester)
                and (query.issue is None or task.issue == query.issue)
            )

        state = query.state
        all_running = self.store.running_tasks()
        running = [t for t in all_running if matches(t)] if state in (None, State.RUNNING) else []
        queue: list[views.QueueRow] = []
        pending_total = 0
        if state in (None, State.PENDING):
            rows = views.queue_rows(
                self.store.pending_positions(QUEUE_SCAN, unchecked=True),
                all_running,
                self.config.queue.max_concurrent_agents,
                now,
            )
            mine = [r for r in rows if matches(r.task)]
            pending_total = len(mine)
            queue = mine[:QUEUE_SHOWN]
        finished: list[Task] = []
        before = _before(request.args.get("before"))
        if state is None or state in TERMINAL_STATES:
            finished = self.store.finished_tasks(query, before=before, limit=FINISHED_SHOWN)
        older = None
        if len(finished) == FINISHED_SHOWN:
            last = finished[-1]
            params = {k: v for k, v in shown.items() if v}
            params["before"] = f"{last.finished_at or last.updated_at!r}:{last.id}"
            older = "?" + urlencode(params)
        titles = self.access.titles(session, [(t.repo, t.issue) for t in running])
        last_lines = {t.id: self._last_line(t.id) for t in running}
        context: dict[str, Any] = dict(
            session=session,
            visible=visible,
            repos=sorted(visible.repos) if not visible.everything else self.access.known_repos(),
            # those configured, and any other that tasks were given (a repository's own
            # .kugetsu.toml can name a preset)
            agents=sorted(
                {self.config.agents.default, *self.config.agents.fallback}
                | set(self.config.agents.tables)
                | set(self.store.task_agents())
            ),
            states=[s.value for s in State],
            shown=shown,
            filtered=any(shown.values()),
            error=error,
            running=running,
            titles=titles,
            last_lines=last_lines,
            queue=queue,
            pending_total=pending_total,
            scanned=QUEUE_SCAN,
            finished=finished,
            older=older,
            paged=before is not None,
            limit=self.config.queue.max_concurrent_agents,
            busy=len(all_running),
        )
        if request.args.get("fragment") == "live":
            return self._page("_live.html", **context)
        return self._page("overview.html", **context)

    def _last_line(self, task_id: int) -> str:
        return views.last_line(tasklog.tail(self.config, self.store, task_id, TAIL_READ))

    def _log_size(self, task_id: int) -> int | None:
        """How long a task's log is: this node's file, or the chunks a worker on another
        machine shipped (`bot.tasklog`, which every reader of the log goes through)."""
        return tasklog.size(self.config, self.store, task_id)

    def _log_read(self, task_id: int) -> logstream.Read:
        return lambda offset, limit: tasklog.read(self.config, self.store, task_id, offset, limit)

    # ------------------------------------------------------------------ a task

    def task(self, task_id: int) -> BaseResponse:
        return self._guarded(lambda session: self._task(session, task_id))

    def _task(self, session: Session, task_id: int) -> BaseResponse:
        task = self._visible_task(session, task_id)
        if task is None:
            return self._not_found(session)
        events_ = self.store.task_events(task_id)
        _, body = self.store.comment_state(task_id)
        allowed, why = self.access.may_act(session, task.repo)
        size = self._log_size(task_id) or 0
        title = self.access.titles(session, [(task.repo, task.issue)]).get((task.repo, task.issue))
        prompt, prompt_size = _head(self.config.storage.prompt_path(task_id), PROMPT_SHOWN)
        gitea = self.config.dashboard.gitea_public_url
        return self._page(
            "task.html",
            session=session,
            task=task,
            title=title,
            events=events_,
            attempts=views.attempts(events_),
            comment=Markup(comment.render(body)) if body else None,
            issue_url=f"{gitea}/{task.repo}/issues/{task.issue}",
            pr_url=f"{gitea}/{task.repo}/pulls/{task.pr_number}" if task.pr_number else None,
            may_act=allowed,
            why_not=why,
            can_stop=task.active,
            can_retry=task.state in (State.FAILED, State.CANCELLED),
            log_size=size,
            log_start=logstream.start_offset(size, self._log_read(task_id)),
            prompt=prompt,
            prompt_size=prompt_size,
            prompt_shown=PROMPT_SHOWN,
            done=request.args.get("done"),
            tokens=views.tokens(task),
            cost=views.cost(task),
        )

    def act(self, task_id: int, action: str) -> BaseResponse:
        """Stop or retry, for users with `triggers.min_permission` on the repository,
        asked of Gitea now; the form must come from this site with the session's CSRF
        token. Who acted is recorded on the task (its events and tracking comment)."""
        session = self._session()
        if session is None:
            return self._forbidden("Sign in first.")
        if not self._same_origin() or not session.csrf_ok(request.form.get("csrf")):
            log.warning(
                "dashboard action refused: no valid CSRF token",
                extra={"user": session.login, "task": task_id, "action": action},
            )
            return self._forbidden("The form was not sent from this page.", session)
        if not self.pages.acquire(blocking=False):
            return self._busy()
        try:
            task = self._visible_task(session, task_id)
            if task is None:
                return self._not_found(session)
            allowed, why = self.access.may_act(session, task.repo, fresh=True)
            if not allowed:
                log.warning(
                    "dashboard action refused",
                    extra={"user": session.login, "task": task_id, "action": action, "why": why},
                )
                return self._forbidden(f"You may not {action} this task: {why}.", session)
            done = self._do(session, task, action)
        except SignedOut:
            return self._signed_out()
        finally:
            self.pages.release()
        return redirect(url_for("dashboard.task", task_id=task_id, done=done), 303)

    def _do(self, session: Session, task: Task, action: str) -> str:
        via = "the dashboard"
        if action == "stop":
            result = self.store.request_cancel(task.id, session.login, via=via)
            done = {
                CancelResult.CANCELLED: "cancelled",
                CancelResult.STOPPING: "stopping",
                CancelResult.FINISHED: "finished",
            }[result]
        else:
            ok, blocker = self.store.try_requeue(task.id, session.login, via=via)
            done = "retried" if ok else ("blocked" if blocker is not None else "not-retried")
        log.info(
            "dashboard action",
            extra={"user": session.login, "task": task.id, "action": action, "result": done},
        )
        self.wake()
        return done

    # ------------------------------------------------------------------ the log

    def _log_task(self, task_id: int) -> Task | None:
        """The task, for a signed-in user who may read it."""
        session = self._session()
        if session is None:
            return None
        try:
            return self._visible_task(session, task_id)
        except SignedOut:
            return None

    def log_part(self, task_id: int) -> BaseResponse:
        """Up to logstream.TAIL_BYTES of the log before byte `end` (the page's "earlier")."""
        task = self._log_task(task_id)
        if task is None:
            return Response("not found\n", status=404, mimetype="text/plain")
        end = logstream.resume_offset(None, request.args.get("end"))
        start, text = logstream.read_slice(self._log_read(task_id), end)
        return Response(text, mimetype="text/plain", headers={"X-Log-Start": str(start)})

    def log_file(self, task_id: int) -> BaseResponse:
        """The whole log, never read whole (`tasklog.response`)."""
        task = self._log_task(task_id)
        whole = (
            tasklog.response(
                self.config, self.store, task_id, download_name=f"kugetsu-task-{task_id}.log"
            )
            if task is not None
            else None
        )
        if whole is None:
            return Response("not found\n", status=404, mimetype="text/plain")
        return whole

    def log_stream(self, task_id: int) -> BaseResponse:
        task = self._log_task(task_id)
        if task is None:
            return Response("not found\n", status=404, mimetype="text/plain")
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        if not self.streams.acquire(blocking=False):
            limit = self.config.dashboard.max_log_streams
            busy = f"retry: {BUSY_RETRY_MS}\n\n".encode() + logstream.event(
                "busy", {"limit": limit}
            )
            log.info("live log refused: every stream slot is taken", extra={"limit": limit})
            return Response(busy, mimetype="text/event-stream", headers=headers)
        offset = logstream.resume_offset(
            request.headers.get("Last-Event-ID"), request.args.get("from")
        )

        def active() -> bool:
            current = self.store.get(task_id)
            return current is not None and current.active

        stream = logstream.follow(
            lambda: self._log_size(task_id),
            self._log_read(task_id),
            offset,
            active=active,
            gone=request.environ.get("waitress.client_disconnected", lambda: False),
        )
        return Response(
            _Stream(stream, self.streams.release),
            mimetype="text/event-stream",
            headers=headers,
            direct_passthrough=True,
        )

    # ------------------------------------------------------------------ charts

    def charts(self) -> BaseResponse:
        return self._guarded(self._charts_page)

    def _charts_page(self, session: Session) -> BaseResponse:
        try:
            days = int(request.args.get("days", "30"))
        except ValueError:
            days = 30
        days = days if days in CHART_DAYS else 30
        visible = self.access.visible(session)
        key = (visible.query_repos, days)
        now = self.clock()
        cached = self._charts.get(key)
        if cached is None or now - cached[0] > CHARTS_SECONDS:
            since = (now // charts.DAY - days + 1) * charts.DAY
            rows = self.store.finished_since(since, visible.query_repos)
            labels = charts.days_between(since, now)
            drawn = [
                charts.outcomes_per_day(rows, labels),
                charts.times_per_day(rows, labels),
                charts.cost_per_day(rows, labels, "agent"),
                charts.cost_per_day(rows, labels, "repo"),
            ]
            self._charts[key] = cached = (now, drawn)
            while len(self._charts) > 64:
                self._charts.pop(next(iter(self._charts)))
        return self._page(
            "charts.html",
            session=session,
            charts=[(c, Markup(c.svg)) for c in cached[1]],
            days=days,
            choices=CHART_DAYS,
            visible=visible,
        )


# ---------------------------------------------------------------------- formatting


def _when(ts: float | None) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return ""
    return views.duration((now or time.time()) - ts)


def _money(value: float | None) -> str:
    return "" if value is None else f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def _count(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _head(path: Path, limit: int) -> tuple[str | None, int]:
    """(the first `limit` bytes of a file as text, its size), or (None, 0) without it."""
    try:
        with path.open("rb") as fh:
            data = fh.read(limit)
            size = fh.seek(0, os.SEEK_END)
    except OSError:
        return None, 0
    return data.decode("utf-8", "replace"), size


def _before(text: str | None) -> tuple[float, int] | None:
    """The `before` of a page of finished tasks: "<when it finished>:<id>"."""
    if not text or ":" not in text:
        return None
    when, _, task_id = text.partition(":")
    try:
        return float(when), int(task_id)
    except ValueError:
        return None
