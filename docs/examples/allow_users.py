#!/usr/bin/env python3
"""A server plugin for frps (or frp) that allows only listed users.

Usage:
    python3 allow_users.py --listen 127.0.0.1:9000 alice bob

and in frps.ini:
    [plugin.allow-users]
    addr = 127.0.0.1:9000
    path = /handler
    ops = Login, NewProxy, Ping, NewWorkConn, NewUserConn

`Login` carries the user as content.user; every other operation carries it as
content.user.user. A listed user is allowed with the content unchanged; any
other user is rejected with a reason that frpc prints (or, for NewUserConn,
that the API caller receives with a 403). Standard library only.

Not access control on its own: the user is what frpc declares (`--user`),
and any account holder can declare "alice". frps has already checked the
box's account (email and password, or its token); this example only sorts
boxes by a name their owners choose. To trust the name, have each box send
a secret too (`--meta token=...`, content.metas / content.user.metas) and
check it per user here.
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20


def user_of(op, content):
    """The user an operation is about."""
    if op == "Login":
        return content.get("user") or ""
    return (content.get("user") or {}).get("user") or ""


def decide(allowed, request):
    """The answer to one call, as frp's plugin protocol defines it."""
    op = request.get("op", "")
    content = request.get("content") or {}
    user = user_of(op, content)
    if user in allowed:
        return {"reject": False, "unchange": True}
    shown = user or "(no user: start frpc with --user NAME)"
    return {"reject": True, "reject_reason": f"user {shown} is not allowed"}


def handler_for(allowed, path):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            if self.path.split("?", 1)[0] != path:
                self.send_error(404)
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.send_error(413)
                return
            try:
                request = json.loads(self.rfile.read(length))
            except ValueError:
                self.send_error(400, "body is not JSON")
                return
            answer = json.dumps(decide(allowed, request)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, fmt, *args):
            reqid = self.headers.get("X-Frp-Reqid", "-") if self.headers else "-"
            sys.stderr.write(f"[{reqid}] {fmt % args}\n")

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("users", nargs="+", help="users to allow")
    parser.add_argument("--listen", default="127.0.0.1:9000", help="host:port")
    parser.add_argument("--path", default="/handler", help="path frps posts to")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), handler_for(set(args.users), args.path))
    print(f"allowing {sorted(set(args.users))} on http://{args.listen}{args.path}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
