"""A one-file HTTP server on 127.0.0.1 for the download tests.

    python archive_server.py ARCHIVE MODE REQUEST_LOG

Every GET is answered with ARCHIVE (whatever the path) and appended to REQUEST_LOG.
MODE says how the server behaves:
    ok     send the whole file;
    die    announce the whole file, send half of it, and exit (the server is gone);
    stall  announce the whole file, send half of it, and hang.
The port is printed on the first line of stdout once the server listens.
"""
import http.server
import os
import sys
import time


def main():
    archive, mode, request_log = sys.argv[1:4]
    with open(archive, "rb") as f:
        data = f.read()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            with open(request_log, "a") as log:
                log.write(self.path + "\n")
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if mode == "ok":
                self.wfile.write(data)
                return
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            if mode == "die":
                os._exit(0)
            time.sleep(600)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
