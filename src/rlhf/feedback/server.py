"""The web app: a FastAPI server for the annotation page, its JSON API and the admin page.

Security model (the page shows untrusted text, model output and prompts, to people with accounts):

- Every /api route needs a session, except the two that create one; /admin needs an admin session.
  The public routes serve only the page shell and its static files, which hold no data.
- State-changing requests are POSTs that must carry the session's CSRF token in ``X-CSRF-Token`` (and,
  when the browser sends an Origin, our own origin). Cookies are HttpOnly and SameSite=Strict.
- Logins are rate-limited per name and per address; API requests per user; request bodies and
  demonstration texts have size limits with messages that say what the limit is.
- The page renders every string with ``textContent`` and the Content-Security-Policy allows scripts
  and styles from our own static files only (no inline code), so a response containing
  ``<script>`` or ``<img onerror=...>`` is shown as the text it is and can run nothing.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhf.feedback import auth, queue
from rlhf.feedback.config import AnnotateConfig
from rlhf.feedback.stats import admin_stats
from rlhf.feedback.store import Store

log = logging.getLogger("rlhf.annotate")

SESSION_COOKIE = "rlhf_session"
LOGIN_COOKIE = "rlhf_login_csrf"
CSRF_HEADER = "x-csrf-token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
                ".html": "text/html; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
PUBLIC_PATHS = {"/", "/admin", "/api/login-csrf", "/api/login"}  # plus /static/*: the tests check that nothing else is


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with the given status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _static_files() -> dict[str, bytes]:
    """The page's files, read once: the server never serves anything from disk by a name from a request."""
    folder = resources.files("rlhf.feedback") / "static"
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and f.name.rsplit(".", 1)[-1] in
            {s.lstrip(".") for s in STATIC_TYPES}}


class BodyLimit:
    """ASGI middleware: refuse a request body over the limit before reading it (413), or of unknown length (411)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            problem = None
            if length is None or not length.isdigit():
                problem = (411, "send a Content-Length header")
            elif int(length) > self.max_bytes:
                problem = (413, f"the request body is {int(length)} bytes; the limit is {self.max_bytes} bytes")
            if problem:
                response = JSONResponse({"error": problem[1]}, status_code=problem[0], headers=SECURITY_HEADERS)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _cookie(response: Response, name: str, value: str, cfg: AnnotateConfig, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict", secure=cfg.secure_cookies, path="/")


def _guidelines(cfg: AnnotateConfig, static: dict[str, bytes]) -> str:
    if cfg.guidelines:
        with open(cfg.guidelines, encoding="utf-8") as f:
            return f.read()
    return static["guidelines.txt"].decode()


class App:
    """The server's state (store, limits, files) and the checks every route shares."""

    def __init__(self, cfg: AnnotateConfig, store: Store):
        self.cfg, self.store = cfg, store
        self.static = _static_files()
        self.guidelines = _guidelines(cfg, self.static)
        self.api_limit = auth.RateLimiter(cfg.limits.requests_per_minute)
        self.login_limit = auth.RateLimiter(cfg.limits.logins_per_minute)

    async def session(self, request: Request, *, write: bool = True, admin: bool = False) -> auth.Session:
        """The caller's session, after the auth, CSRF, origin, rate and role checks; ApiError otherwise."""
        session = await run_in_threadpool(auth.find_session, self.store, request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise ApiError(401, "sign in first")
        if write:
            self.check_csrf(request, session.csrf)
        if not self.api_limit.allow(f"user:{session.user.id}"):
            raise ApiError(429, f"too many requests: the limit is {self.cfg.limits.requests_per_minute} per minute")
        if admin and not session.user.is_admin:
            raise ApiError(403, "this page is for admins")
        return session

    @staticmethod
    def check_csrf(request: Request, expected: str | None) -> None:
        sent = request.headers.get(CSRF_HEADER, "")
        if not expected or not secrets.compare_digest(sent.encode(), expected.encode()):
            raise ApiError(403, "missing or wrong CSRF token: reload the page")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host')}":
            raise ApiError(403, f"cross-origin request from {origin} refused")

    @staticmethod
    async def json_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def file(self, name: str) -> Response:
        suffix = "." + name.rsplit(".", 1)[-1]
        if name not in self.static or suffix not in STATIC_TYPES:
            raise ApiError(404, "not found")
        return Response(self.static[name], media_type=STATIC_TYPES[suffix])


def _routes(app: FastAPI, state: App) -> None:
    cfg, store = state.cfg, state.store

    @app.get("/")
    async def index() -> Response:
        return state.file("index.html")

    @app.get("/admin")
    async def admin_page(request: Request) -> Response:
        session = await run_in_threadpool(auth.find_session, store, request.cookies.get(SESSION_COOKIE))
        if session is None:
            return RedirectResponse("/", status_code=303)
        if not session.user.is_admin:
            raise ApiError(403, "this page is for admins")
        return state.file("admin.html")

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        return state.file(name)

    @app.get("/api/login-csrf")
    async def login_csrf() -> Response:
        token = secrets.token_urlsafe(32)
        response = JSONResponse({"csrf": token})
        _cookie(response, LOGIN_COOKIE, token, cfg, max_age=3600)
        return response

    @app.post("/api/login")
    async def login(request: Request) -> Response:
        # Login CSRF: the token from /api/login-csrf, echoed by the page and matched to its cookie.
        state.check_csrf(request, request.cookies.get(LOGIN_COOKIE))
        body = await state.json_body(request)
        name, password, token = body.get("name"), body.get("password"), body.get("token")
        if not isinstance(name, str) or not (isinstance(password, str) or isinstance(token, str)):
            raise ApiError(422, "give 'name' and a 'password' or one-time 'token'")
        client = request.client.host if request.client else "?"
        if not (state.login_limit.allow(f"name:{name}") and state.login_limit.allow(f"ip:{client}")):
            raise ApiError(429, f"too many login attempts: the limit is {cfg.limits.logins_per_minute} per minute")
        try:
            user = await run_in_threadpool(auth.authenticate, store, name, password=password if token is None else None, token=token)
        except auth.AuthError as e:
            raise ApiError(401, str(e)) from None
        cookie, csrf = await run_in_threadpool(auth.open_session, store, user, cfg.limits.session_hours)
        response = JSONResponse({"name": user.name, "role": user.role, "csrf": csrf})
        _cookie(response, SESSION_COOKIE, cookie, cfg, max_age=int(cfg.limits.session_hours * 3600))
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    @app.post("/api/logout")
    async def logout(request: Request) -> Response:
        await state.session(request)
        await run_in_threadpool(auth.close_session, store, request.cookies[SESSION_COOKIE])
        response = JSONResponse({"ok": True})
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/api/me")
    async def me(request: Request) -> dict:
        session = await state.session(request, write=False)
        return {"name": session.user.name, "role": session.user.role, "csrf": session.csrf, "guidelines": state.guidelines,
                "max_text_chars": cfg.limits.max_text_chars, "flags": list(queue.FLAGS)}

    @app.post("/api/next")
    async def next_item(request: Request) -> dict:
        session = await state.session(request)
        assignment = await run_in_threadpool(queue.next_assignment, store, session.user, cfg.queue)
        return {"assignment": assignment, "progress": await run_in_threadpool(queue.progress, store, session.user, cfg.queue)}

    @app.post("/api/labels")
    async def post_label(request: Request) -> dict:
        session = await state.session(request)
        body = await state.json_body(request)
        try:
            return await run_in_threadpool(queue.submit_label, store, session.user, body, cfg.limits.max_text_chars)
        except queue.LabelError as e:
            raise ApiError(e.status, str(e)) from None

    @app.get("/api/admin/stats")
    async def stats(request: Request) -> dict:
        await state.session(request, write=False, admin=True)
        return await run_in_threadpool(admin_stats, store)


def create_app(cfg: AnnotateConfig, store: Store) -> FastAPI:
    """The ASGI app for a config and an open store (tests drive it directly; `serve` runs it under uvicorn)."""
    app = FastAPI(title="rlhf annotate", docs_url=None, redoc_url=None, openapi_url=None)  # no unauthenticated API docs
    state = App(cfg, store)
    _routes(app, state)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> Response:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    app.add_middleware(BodyLimit, max_bytes=cfg.limits.max_body_bytes)
    return app


def serve(cfg: AnnotateConfig) -> None:
    """Open the database, load the configured items, and serve until interrupted."""
    import uvicorn

    from rlhf.feedback.sources import load_items

    store = Store(cfg.db)
    loaded = load_items(cfg, store)
    counts = queue.counts(store)
    print(f"rlhf annotate: {counts.items} items in {store.url} ({loaded['items_added']} new, {loaded['gold_added']} new gold), "
          f"{counts.labels} labels so far")
    if not auth.list_users(store):
        print(f"rlhf annotate: no accounts yet; create one with `rlhf annotate add-user --db {cfg.db} NAME`")
    print(f"rlhf annotate: open http://{cfg.host}:{cfg.port}/ (admin page: /admin); Ctrl+C stops", flush=True)
    uvicorn.run(create_app(cfg, store), host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
