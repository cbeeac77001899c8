"""A real HTTP server on 127.0.0.1 that answers ``huggingface_hub``'s file downloads for one repository.

``hf_hub_download`` (with ``HF_ENDPOINT`` pointing here) sends ``HEAD`` then ``GET`` to
``/{repo_id}/resolve/{revision}/{filename}`` and needs ``X-Repo-Commit``, ``ETag`` and
``Content-Length`` (``huggingface_hub.file_download.get_hf_file_metadata``); a missing file is a 404
with ``X-Error-Code: EntryNotFound``. Every request is recorded, so a test can say exactly which files
a command downloaded.
"""

from __future__ import annotations

import http.server
import os
import threading
import urllib.parse

from hub_layout import snapshot_of


class FakeHub:
    """``with FakeHub(model_dir, "org/name") as hub:`` then ``HF_ENDPOINT=hub.url``; ``hub.gets`` lists
    the files whose content was sent."""

    def __init__(self, source_dir: str, repo_id: str):
        self.source_dir, self.repo_id = source_dir, repo_id
        self.commit, self.etags = snapshot_of(source_dir)
        self.gets: list[str] = []
        self.heads: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _resolve(self) -> str | None:
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                prefix = f"/{hub.repo_id}/resolve/"
                if not path.startswith(prefix):
                    return None
                _revision, _, filename = path[len(prefix):].partition("/")
                return filename if filename in hub.etags else None

            def _answer(self, send_body: bool) -> None:
                filename = self._resolve()
                if filename is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with open(os.path.join(hub.source_dir, filename), "rb") as f:
                    body = f.read()
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{hub.etags[filename]}"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                (hub.gets if send_body else hub.heads).append(filename)
                if send_body:
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
