#!/usr/bin/env python3
"""The lab's shop: one service (or the load generator) per OS process, loopback only.

    python labshop/shop.py catalogue --port 8102 --db /tmp/run/catalogue.sqlite --cpu 1
    python labshop/shop.py payment   --port 8103 --cpu 0
    python labshop/shop.py front-end --port 8101 --catalogue http://127.0.0.1:8102 \
        --payment http://127.0.0.1:8103
    python labshop/shop.py loadgen   --target http://127.0.0.1:8101 --rate 10 --period 300 --seed 1

Services (HTTP/1.0, one thread per request):
  front-end  GET /      browse: catalogue /items                 (70 % of the load)
             GET /buy   catalogue /item/<id>, catalogue /reserve/<id>, payment /pay
             An upstream that fails or takes longer than --upstream_timeout makes it answer 502.
  catalogue  GET /items?tag=T&limit=N, GET /item/<id>, POST /reserve/<id>, over a SQLite file
             (a connection per request, WAL mode, seeded with --items rows on first start).
  payment    POST /pay  a salted PBKDF2 hash of the card (about a millisecond of CPU), 3 %
             declined (402, not an error).
Every service also serves
  GET  /metrics               Prometheus text format (below)
  GET  /health                200 "ok"
  POST /admin/delay?ms=N      add N ms (+-20 %) before every answer: the lab's network-delay
                              fault when tc netem is not used (0 switches it off)
  POST /admin/attach?pgid=N   count the CPU and memory of process group N as part of this
                              service's "pod" (the lab attaches the stress-ng it injects)
  POST /admin/detach?pgid=N   stop counting the memory of group N (its CPU stays counted: the
                              pod CPU counter never goes down)
Metrics (the `service` label is added by Prometheus' scrape config):
  shop_requests_total{route,code}        counter
  shop_errors_total{route}               counter, answers >= 500 (always present, from 0)
  shop_request_duration_seconds{route}   histogram
  process_*                              prometheus_client's process collector (CPU seconds,
                                         resident memory, open fds, ...)
  process_threads                        OS threads of the service process
  pod_cpu_seconds_total                  this process + attached process groups (like a
                                         container's cgroup, which holds chaos stress processes)
  pod_memory_bytes                       resident memory of the same set of processes
The load generator sends a request rate that follows a slow sine (--period) times a slowly
wandering random factor, so normal traffic is not flat.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import signal
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")  # no *_created series
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ROLES = ("front-end", "catalogue", "payment", "loadgen")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TAGS = ("socks", "shoes", "hats", "bags", "gloves", "scarves")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

REQUESTS = Counter("shop_requests", "Requests answered", ["route", "code"])
ERRORS = Counter("shop_errors", "Requests answered with a 5xx status", ["route"])
LATENCY = Histogram("shop_request_duration_seconds", "Time to answer a request", ["route"],
                    buckets=BUCKETS)


def _proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _threads() -> float:
    fields = _proc_stat("self")
    return float(fields[17]) if fields else float("nan")


Gauge("process_threads", "OS threads of this process").set_function(_threads)


class PodCollector:
    """pod_cpu_seconds_total and pod_memory_bytes: this process plus attached process groups."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pgids: set[int] = set()
        self.cpu_seen: dict[int, float] = {}  # pid -> last seen CPU seconds (kept after exit)

    def attach(self, pgid: int) -> None:
        with self.lock:
            self.pgids.add(pgid)

    def detach(self, pgid: int) -> None:
        self.collect_values()  # account its CPU up to now
        with self.lock:
            self.pgids.discard(pgid)

    def collect_values(self) -> tuple[float, float]:
        own = os.times()
        cpu = own.user + own.system
        fields = _proc_stat("self")
        memory = float(fields[21]) * PAGE_SIZE if fields else 0.0
        with self.lock:
            if self.pgids:
                for name in os.listdir("/proc"):
                    if not name.isdigit():
                        continue
                    fields = _proc_stat(name)
                    if fields and int(fields[2]) in self.pgids:
                        self.cpu_seen[int(name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
                        memory += float(fields[21]) * PAGE_SIZE
            cpu += sum(self.cpu_seen.values())
        return cpu, memory

    def collect(self):
        cpu, memory = self.collect_values()
        yield CounterMetricFamily("pod_cpu_seconds", "CPU of the service and of the processes "
                                  "attached to its pod", value=cpu)
        yield GaugeMetricFamily("pod_memory_bytes", "Resident memory of the service and of the "
                                "processes attached to its pod", value=memory)


POD = PodCollector()
REGISTRY.register(POD)


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the role's function; records metrics for non-admin routes."""
    server_version = "puad-lab"
    role = ""
    options: argparse.Namespace
    delay_ms = 0.0
    routes: dict = {}

    def log_message(self, format: str, *args) -> None:  # keep the logs quiet
        pass

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self.dispatch("POST")

    def send(self, code: int, body: bytes | str, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = [p for p in url.path.split("/") if p]
        if method == "GET" and parts == ["metrics"]:
            return self.send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        if method == "GET" and parts == ["health"]:
            return self.send(200, "ok", "text/plain")
        if method == "POST" and len(parts) == 2 and parts[0] == "admin":
            return self.admin(parts[1], query)
        route = (method, parts[0] if parts else "")
        function = self.routes.get(route)
        if function is None:
            return self.send(404, '{"error": "no such route"}')
        began = time.perf_counter()
        try:
            code, answer = function(self, parts[1:], query)
        except Exception as e:  # a bug or a broken store: answer 500 and count it
            code, answer = 500, {"error": f"{type(e).__name__}: {e}"}
        if Handler.delay_ms > 0:
            time.sleep(Handler.delay_ms * random.uniform(0.8, 1.2) / 1000)
        name = "/" + route[1]
        try:
            self.send(code, json.dumps(answer))
        finally:
            LATENCY.labels(name).observe(time.perf_counter() - began)
            REQUESTS.labels(name, str(code)).inc()
            if code >= 500:
                ERRORS.labels(name).inc()

    def admin(self, action: str, query: dict) -> None:
        try:
            if action == "delay":
                Handler.delay_ms = max(0.0, float(query.get("ms", 0)))
            elif action == "attach":
                POD.attach(int(query["pgid"]))
            elif action == "detach":
                POD.detach(int(query["pgid"]))
            else:
                return self.send(404, '{"error": "no such admin action"}')
        except (KeyError, ValueError):
            return self.send(400, '{"error": "bad admin parameters"}')
        self.send(200, '{"ok": true}')


# ---------------------------------------------------------------- catalogue

def _db() -> sqlite3.Connection:
    """A connection for one request (closed by the caller): no per-thread leftovers."""
    return sqlite3.connect(Handler.options.db, timeout=5)


def init_catalogue(path: str, items: int, seed: int) -> None:
    db = sqlite3.connect(path, timeout=5)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, tag TEXT, "
               "price REAL, stock INTEGER, description TEXT)")
    if db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0:
        rng = random.Random(seed)
        db.executemany("INSERT INTO items (name, tag, price, stock, description) VALUES (?,?,?,?,?)",
                       [(f"item-{i}", rng.choice(TAGS), round(rng.uniform(2, 200), 2),
                         rng.randint(10_000, 100_000), "x" * rng.randint(50, 400))
                        for i in range(items)])
    db.commit()
    db.close()


def catalogue_items(handler: Handler, args: list[str], query: dict) -> tuple[int, object]:
    tag = query.get("tag", "socks")
    limit = max(1, min(100, int(query.get("limit", 20))))
    with closing(_db()) as db:
        rows = db.execute("SELECT id, name, price, length(description) FROM items WHERE tag = ? "
                          "ORDER BY price DESC LIMIT ?", (tag, limit)).fetchall()
    return 200, [{"id": r[0], "name": r[1], "price": r[2]} for r in rows]


def catalogue_item(handler: Handler, args: list[str], query: dict) -> tuple[int, object]:
    with closing(_db()) as db:
        row = db.execute("SELECT id, name, price, stock FROM items WHERE id = ?",
                         (int(args[0]),)).fetchone()
    if row is None:
        return 404, {"error": "no such item"}
    return 200, {"id": row[0], "name": row[1], "price": row[2], "stock": row[3]}


def catalogue_reserve(handler: Handler, args: list[str], query: dict) -> tuple[int, object]:
    with closing(_db()) as db, db:
        changed = db.execute("UPDATE items SET stock = stock - 1 WHERE id = ? AND stock > 0",
                             (int(args[0]),)).rowcount
    return (200, {"reserved": True}) if changed else (409, {"reserved": False})


# ---------------------------------------------------------------- payment

def payment_pay(handler: Handler, args: list[str], query: dict) -> tuple[int, object]:
    order = json.loads(handler.body or b"{}")
    card = str(order.get("card", "4111111111111111")).encode()
    digest = hashlib.pbkdf2_hmac("sha256", card, os.urandom(16), 3000)
    if random.random() < 0.03:
        return 402, {"authorised": False}
    return 200, {"authorised": True, "reference": digest.hex()[:16]}


# ---------------------------------------------------------------- front-end

def _call(url: str, data: dict | None = None) -> object:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=Handler.options.upstream_timeout) as response:
        return json.loads(response.read())


def front_browse(handler: Handler, args: list[str], query: dict) -> tuple[int, object]:
    tag = random.choice(TAGS)
    try:
        items = _call(f"{Handler.options.catalogue}/items?tag={tag}&limit={random.randint(5, 40)}")
    except (OSError, ValueError) as e:  # URLError, timeout, refused, bad JSON
        return 502, {"error": f"catalogue: {e}"}
    return 200, {"tag": tag, "items": len(items)}


def front_buy(handler: Handler, args: list[str], query: dict) -> tuple[int, object]:
    item = random.randint(1, Handler.options.items)
    try:
        found = _call(f"{Handler.options.catalogue}/item/{item}")
        _call(f"{Handler.options.catalogue}/reserve/{item}", {})
    except urllib.error.HTTPError as e:
        if e.code < 500:
            return e.code, {"error": f"catalogue: {e.code}"}
        return 502, {"error": f"catalogue: {e}"}
    except (OSError, ValueError) as e:
        return 502, {"error": f"catalogue: {e}"}
    try:
        paid = _call(f"{Handler.options.payment}/pay", {"amount": found["price"],
                                                        "card": str(random.getrandbits(52))})
    except urllib.error.HTTPError as e:
        if e.code == 402:
            return 402, {"error": "declined"}
        return 502, {"error": f"payment: {e}"}
    except (OSError, ValueError) as e:
        return 502, {"error": f"payment: {e}"}
    return 200, {"item": item, "payment": paid}


ROUTES = {
    "catalogue": {("GET", "items"): catalogue_items, ("GET", "item"): catalogue_item,
                  ("POST", "reserve"): catalogue_reserve},
    "payment": {("POST", "pay"): payment_pay},
    "front-end": {("GET", ""): front_browse, ("GET", "buy"): front_buy},
}


def serve(options: argparse.Namespace) -> None:
    if options.cpu is not None:
        os.sched_setaffinity(0, {options.cpu})
    if options.role == "catalogue":
        init_catalogue(options.db, options.items, options.seed)
    Handler.role, Handler.options, Handler.routes = options.role, options, ROUTES[options.role]
    for (method, route) in Handler.routes:  # error series exist from the start, at 0
        ERRORS.labels("/" + route)
    server = ThreadingHTTPServer(("127.0.0.1", options.port), Handler)
    server.daemon_threads = True
    server.request_queue_size = 128
    print(f"{options.role}: listening on 127.0.0.1:{options.port} (pid {os.getpid()})", flush=True)
    server.serve_forever(poll_interval=0.2)


# ---------------------------------------------------------------- load generator

def loadgen(options: argparse.Namespace) -> None:
    """Open-ish loop: `workers` threads each wait an exponential time with mean
    workers / rate(t), then send one request (browse 70 %, buy 30 %)."""
    rng = random.Random(options.seed)
    began = time.monotonic()
    wander = [1.0]  # slowly wandering factor (mean-reverting random walk, updated each second)
    stop = threading.Event()

    def rate(now: float) -> float:
        cycle = 1 + 0.5 * math.sin(2 * math.pi * (now - began) / options.period)
        return max(0.2 * options.rate, options.rate * cycle * wander[0])

    def worker(seed: int) -> None:
        local = random.Random(seed)
        while not stop.is_set():
            time.sleep(local.expovariate(rate(time.monotonic()) / options.workers))
            path = "/buy" if local.random() < 0.3 else "/"
            try:
                with urllib.request.urlopen(options.target + path, timeout=options.timeout) as r:
                    r.read()
            except (OSError, ValueError):
                pass  # errors are the front-end's to count

    for i in range(options.workers):
        threading.Thread(target=worker, args=(rng.random(),), daemon=True).start()
    print(f"loadgen: {options.rate} req/s around a {options.period:.0f}s cycle -> "
          f"{options.target} (pid {os.getpid()})", flush=True)
    while True:
        time.sleep(1)
        wander[0] += 0.15 * (1 - wander[0]) + rng.gauss(0, 0.06)
        wander[0] = min(1.6, max(0.5, wander[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, help="pin the process to this core")
    parser.add_argument("--db", default="catalogue.sqlite", help="catalogue's SQLite file")
    parser.add_argument("--items", type=int, default=5000, help="catalogue size")
    parser.add_argument("--catalogue", default="http://127.0.0.1:8102")
    parser.add_argument("--payment", default="http://127.0.0.1:8103")
    parser.add_argument("--upstream_timeout", type=float, default=1.0)
    parser.add_argument("--target", default="http://127.0.0.1:8101", help="loadgen: front-end URL")
    parser.add_argument("--rate", type=float, default=10.0, help="loadgen: mean requests/s")
    parser.add_argument("--period", type=float, default=300.0, help="loadgen: cycle in seconds")
    parser.add_argument("--workers", type=int, default=8, help="loadgen: threads")
    parser.add_argument("--timeout", type=float, default=5.0, help="loadgen: request timeout")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    random.seed(options.seed)
    try:
        loadgen(options) if options.role == "loadgen" else serve(options)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
