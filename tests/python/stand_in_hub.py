"""A loopback stand-in for the Hugging Face hub serving one folder as one repository, so that
the image recipe's hub path (`jhakaas-worker fetch`, then `fetch --list`) runs offline in CI.

Usage: python stand_in_hub.py FOLDER ORG/NAME PORT_FILE

Serves what `jhakaas-worker fetch` asks of the hub — the listing
`/api/models/ORG/NAME/revision/main` and the files `/ORG/NAME/resolve/main/PATH` (with the
etag, commit and range headers the HF client reads) — plus a README and a `.ckpt` a pipeline
does not need. Writes its port to PORT_FILE once listening; runs until killed.
"""
import http.server
import json
import pathlib
import sys

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def main(folder: str, repo: str, port_file: str) -> None:
    root = pathlib.Path(folder)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    files["README.md"] = b"# a model card the image does not need\n"
    files["model.ckpt"] = bytes(4096)

    class Hub(http.server.BaseHTTPRequestHandler):
        send_body = True

        def do_HEAD(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_body = False
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == f"/api/models/{repo}/revision/main":
                body = json.dumps({
                    "sha": COMMIT,
                    "siblings": [{"rfilename": n, "size": len(d)} for n, d in files.items()],
                }).encode()
                self.reply(200, body, {"content-type": "application/json"})
                return
            prefix = f"/{repo}/resolve/main/"
            data = files.get(path[len(prefix):]) if path.startswith(prefix) else None
            if data is None:
                self.reply(404, b"no such file", {})
                return
            start, end = 0, len(data) - 1
            ranged = self.headers.get("range", "")
            if ranged.startswith("bytes="):
                a, _, b = ranged[len("bytes="):].partition("-")
                start, end = int(a or 0), min(int(b) if b else end, end)
            self.reply(206, data[start:end + 1], {
                "etag": '"etag-%s"' % path[len(prefix):].replace("/", "-"),
                "x-repo-commit": COMMIT,
                "content-range": f"bytes {start}-{end}/{len(data)}",
            })

        def reply(self, status: int, body: bytes, headers: dict) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if self.send_body:
                self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    pathlib.Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
