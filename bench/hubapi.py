"""The benchmarks' client of the hub's API (bench/job.sh, bench/hub-exports.sh): one keep-alive
HTTP connection with the admin token; a status of 300 or more ends the script naming the call."""
import http.client
import json
import sys


class Hub:
    def __init__(self, url, token_file, timeout=600):
        self.token = open(token_file).read().strip()
        self.conn = http.client.HTTPConnection(url.split("//")[1], timeout=timeout)

    def call(self, method, path, body=None):
        h = {"Authorization": "Bearer " + self.token}
        if body is not None:
            h["Content-Type"] = "application/json"
            body = json.dumps(body)
        self.conn.request(method, path, body, h)
        r = self.conn.getresponse()
        data = r.read()
        if r.status >= 300:
            sys.exit(f"{method} {path}: {r.status} {data[:500]!r}")
        return json.loads(data) if data else None
