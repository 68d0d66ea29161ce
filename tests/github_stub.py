"""A local stand-in for the slice of GitHub's REST API that PyGithub uses to comment on PRs.

It listens on 127.0.0.1 (a real socket, ephemeral port) under an optional
path prefix, like GitHub Enterprise's `/api/v3`, and records every request.
Tokens decide who is calling:

- a personal token: `GET /user` answers with its login;
- an installation token (the workflow's GITHUB_TOKEN): `GET /user` is 403
  "Resource not accessible by integration" and comments appear as
  `github-actions[bot]`;
- a read-only token: every write is 403, as on a PR from a fork.

Endpoints (PyGithub 2.10's URLs): GET /repos/{o}/{r}, GET .../pulls/{n},
GET .../issues/{n}, GET and POST .../issues/{n}/comments (Link-header
pagination, `per_page` default 30, max 100), PATCH .../issues/comments/{id},
GET /user. A body over 65,536 characters is 422, as on GitHub.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 65_536
BOT_LOGIN = "github-actions[bot]"


@dataclass(frozen=True)
class Token:
    """Who a token authenticates as, and what it may do."""

    login: str
    installation: bool = False
    read_only: bool = False


@dataclass(frozen=True)
class Recorded:
    """One request as the stub saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    body: Any


@dataclass
class Comment:
    id: int
    issue: int
    login: str
    body: str
    created_at: str
    updated_at: str
    edits: int = 0


@dataclass
class _State:
    owner: str
    repo: str
    pulls: set[int]
    tokens: dict[str, Token]
    comments: list[Comment] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    next_id: int = 1000


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class GitHubStub:
    """Run the stand-in in a background thread; use as a context manager."""

    def __init__(
        self,
        *,
        repository: str = "octo/widgets",
        pulls: tuple[int, ...] = (7,),
        prefix: str = "/api/v3",
        tokens: dict[str, Token] | None = None,
    ) -> None:
        owner, repo = repository.split("/")
        self.prefix = prefix.rstrip("/")
        self.state = _State(
            owner=owner,
            repo=repo,
            pulls=set(pulls),
            tokens=tokens
            if tokens is not None
            else {
                "pat-token": Token("octocat"),
                "installation-token": Token(BOT_LOGIN, installation=True),
                "read-only-token": Token(BOT_LOGIN, installation=True, read_only=True),
            },
        )
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def host(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        """What to put in GITHUB_API_URL."""
        return self.host + self.prefix

    def __enter__(self) -> GitHubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # --- seeding and inspection -------------------------------------------------
    def add_comment(self, issue: int, body: str, login: str) -> Comment:
        with self.lock:
            return self._create(issue, body, login)

    def comments(self, issue: int) -> list[Comment]:
        with self.lock:
            return [c for c in self.state.comments if c.issue == issue]

    def requests(self) -> list[Recorded]:
        with self.lock:
            return list(self.state.requests)

    # --- helpers used by the handler (lock held) --------------------------------
    def _create(self, issue: int, body: str, login: str) -> Comment:
        self.state.next_id += 1
        now = _now()
        comment = Comment(self.state.next_id, issue, login, body, now, now)
        self.state.comments.append(comment)
        return comment

    def _repo_path(self) -> str:
        return f"/repos/{self.state.owner}/{self.state.repo}"

    def _user_json(self, login: str) -> dict[str, Any]:
        bot = login.endswith("[bot]")
        return {
            "login": login,
            "id": abs(hash(login)) % 10_000_000,
            "type": "Bot" if bot else "User",
            "url": f"{self.api_url}/users/{urllib.parse.quote(login)}",
            "html_url": f"{self.host}/{login}",
        }

    def _comment_json(self, c: Comment) -> dict[str, Any]:
        repo = self._repo_path()
        return {
            "id": c.id,
            "node_id": f"IC_{c.id}",
            "url": f"{self.api_url}{repo}/issues/comments/{c.id}",
            "html_url": f"{self.host}/{self.state.owner}/{self.state.repo}/pull/{c.issue}"
            f"#issuecomment-{c.id}",
            "issue_url": f"{self.api_url}{repo}/issues/{c.issue}",
            "body": c.body,
            "user": self._user_json(c.login),
            "created_at": c.created_at,
            "updated_at": c.updated_at,
            "author_association": "NONE",
        }

    def _repo_json(self) -> dict[str, Any]:
        full = f"{self.state.owner}/{self.state.repo}"
        return {
            "id": 1,
            "name": self.state.repo,
            "full_name": full,
            "owner": self._user_json(self.state.owner),
            "private": False,
            "url": f"{self.api_url}/repos/{full}",
            "html_url": f"{self.host}/{full}",
        }

    def _issue_json(self, n: int) -> dict[str, Any]:
        full = f"{self.state.owner}/{self.state.repo}"
        data: dict[str, Any] = {
            "id": 10_000 + n,
            "number": n,
            "title": f"PR {n}",
            "state": "open",
            "url": f"{self.api_url}/repos/{full}/issues/{n}",
            "html_url": f"{self.host}/{full}/pull/{n}",
            "comments": len([c for c in self.state.comments if c.issue == n]),
            "user": self._user_json("octocat"),
        }
        if n in self.state.pulls:
            data["pull_request"] = {"url": f"{self.api_url}/repos/{full}/pulls/{n}"}
        return data

    def _pull_json(self, n: int) -> dict[str, Any]:
        full = f"{self.state.owner}/{self.state.repo}"
        return {
            "id": 20_000 + n,
            "number": n,
            "title": f"PR {n}",
            "state": "open",
            "url": f"{self.api_url}/repos/{full}/pulls/{n}",
            "html_url": f"{self.host}/{full}/pull/{n}",
            "issue_url": f"{self.api_url}/repos/{full}/issues/{n}",
            "user": self._user_json("octocat"),
        }


Response = tuple[int, Any, dict[str, str]]


def _error(status: int, message: str) -> Response:
    return status, {"message": message, "documentation_url": "https://docs.github.com/rest"}, {}


def _route(
    stub: GitHubStub,
    method: str,
    path: str,
    query: dict[str, list[str]],
    body: Any,
    token: Token | None,
) -> Response:
    if token is None:
        return _error(401, "Bad credentials")
    if not path.startswith(stub.prefix + "/"):
        return _error(404, "Not Found")
    path = path[len(stub.prefix) :]
    repo = stub._repo_path()
    if method in ("POST", "PATCH", "PUT", "DELETE") and token.read_only:
        return _error(403, "Resource not accessible by integration")
    if method == "GET" and path == "/user":
        if token.installation:
            return _error(403, "Resource not accessible by integration")
        return 200, stub._user_json(token.login), {}
    if method == "GET" and path == repo:
        return 200, stub._repo_json(), {}
    if m := re.fullmatch(re.escape(repo) + r"/pulls/(\d+)", path):
        n = int(m.group(1))
        if method == "GET" and n in stub.state.pulls:
            return 200, stub._pull_json(n), {}
        return _error(404, "Not Found")
    if m := re.fullmatch(re.escape(repo) + r"/issues/(\d+)", path):
        n = int(m.group(1))
        if method == "GET" and n in stub.state.pulls:
            return 200, stub._issue_json(n), {}
        return _error(404, "Not Found")
    if m := re.fullmatch(re.escape(repo) + r"/issues/(\d+)/comments", path):
        n = int(m.group(1))
        if n not in stub.state.pulls:
            return _error(404, "Not Found")
        if method == "GET":
            return _list_comments(stub, n, path, query)
        if method == "POST":
            text = body.get("body") if isinstance(body, dict) else None
            if not isinstance(text, str) or len(text) > MAX_BODY:
                return _error(422, f"Validation Failed: body is too long (maximum is {MAX_BODY})")
            return 201, stub._comment_json(stub._create(n, text, token.login)), {}
    if m := re.fullmatch(re.escape(repo) + r"/issues/comments/(\d+)", path):
        found = [c for c in stub.state.comments if c.id == int(m.group(1))]
        if not found:
            return _error(404, "Not Found")
        if method == "GET":
            return 200, stub._comment_json(found[0]), {}
        if method == "PATCH":
            text = body.get("body") if isinstance(body, dict) else None
            if not isinstance(text, str) or len(text) > MAX_BODY:
                return _error(422, f"Validation Failed: body is too long (maximum is {MAX_BODY})")
            found[0].body = text
            found[0].updated_at = _now()
            found[0].edits += 1
            return 200, stub._comment_json(found[0]), {}
    return _error(404, "Not Found")


def _list_comments(stub: GitHubStub, n: int, path: str, query: dict[str, list[str]]) -> Response:
    per_page = min(100, max(1, int(query.get("per_page", ["30"])[0])))
    page = max(1, int(query.get("page", ["1"])[0]))
    items = [c for c in stub.state.comments if c.issue == n]
    last = max(1, -(-len(items) // per_page))
    chunk = items[(page - 1) * per_page : page * per_page]

    def link(p: int) -> str:
        q = urllib.parse.urlencode({"per_page": per_page, "page": p})
        return f"{stub.api_url}{path}?{q}"

    rels = []
    if page < last:
        rels += [f'<{link(page + 1)}>; rel="next"', f'<{link(last)}>; rel="last"']
    if page > 1:
        rels += [f'<{link(1)}>; rel="first"', f'<{link(page - 1)}>; rel="prev"']
    headers = {"Link": ", ".join(rels)} if rels else {}
    return 200, [stub._comment_json(c) for c in chunk], headers


def _handler_for(stub: GitHubStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(parsed.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode("utf-8", "replace")
            auth = self.headers.get("Authorization")
            secret = auth.split(" ", 1)[1] if auth and " " in auth else None
            with stub.lock:
                stub.state.requests.append(Recorded(self.command, parsed.path, query, auth, body))
                token = stub.state.tokens.get(secret or "")
                status, payload, headers = _route(
                    stub, self.command, parsed.path, query, body, token
                )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

    return Handler
