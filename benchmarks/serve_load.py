"""Sustained load on ``gdfo serve`` with a rate limit: many concurrent clients, retries, idempotency keys.

Starts ``gdfo serve`` as its own process (a simulated black box by default, ``--model``
for a real one), then ``--clients`` threads each make calls through gdfo-ray's own
HTTP client (:class:`~gdfo_ray.teachers.http.HttpTeacher`: exponential backoff with
jitter, never sooner than ``Retry-After``, one ``Idempotency-Key`` per call). A share
of the calls are retried on purpose with the same key (a lost answer, ``--dup-share``),
and a share time out on the client before the service answers (``--timeout-share``),
so the service sees every attempt of those calls. It prints:

- calls/s billed per window against the limit, and their mean over the steady part;
- p50/p99 latency of a call (all its attempts and waits) and of an answered attempt;
- 429s the service sent and the retries the clients made;
- calls asked for (distinct keys answered) against calls billed: no double billing;
- the service's resident memory per window (flat once its bounded caches are full);
- with ``--hostile-clients``, what attackers sent beside the good calls (raw over sockets: malformed
  headers carrying the token, wrong tokens, lone surrogates, deep nesting, bad gzip, lying lengths,
  bodies of ``--hostile-mb`` MB of tiny JSON values), the statuses they got (never a 5xx), that no
  good call failed, the service's peak memory, and the health check's latency meanwhile.

Example::

    python benchmarks/serve_load.py --clients 64 --rate 40 --duration 120
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import requests

from gdfo_ray.serve import wait_until_healthy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(args, token: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "gdfo_ray.cli", "serve", "--port", str(port), "--rate-limit", str(args.rate),
           "--rate-burst", str(args.burst), "--idempotency-cache", str(args.idempotency_cache),
           "--max-queue", "100000", "--max-body-mb", str(args.max_body_mb)]
    cmd += ["--model", args.model, "--threads", "1"] if args.model else ["--simulate-latency", str(args.latency)]
    # Its log goes to a file: a pipe nobody reads fills up, and a service blocked writing its log answers no one.
    log = tempfile.NamedTemporaryFile("w+", prefix="gdfo-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env={**os.environ, "GDFO_SERVE_TOKEN": token}, stdout=subprocess.DEVNULL,
                            stderr=log, text=True)
    proc.log_path = log.name
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, timeout_s=120)
    except RuntimeError as e:
        proc.kill()
        with open(log.name) as f:
            raise RuntimeError(f"{e}: {f.read()[-2000:]}") from None
    return proc, url


def hostile_requests(token: str, mb: float) -> list[tuple[str, bytes]]:
    """What an attacker sends, as raw bytes: (name, request)."""
    import json

    def request(body: bytes, headers: bytes = b"", auth: bytes = b"Bearer " + token.encode(),
                length: "int | None" = None) -> bytes:
        length = len(body) if length is None else length
        return (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + auth + b"\r\n"
                + headers + b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + body)

    good = {"template": "{prompt} {text} It was {mask}", "verbalizer": ["bad", "great"],
            "prompt": {"dtype": "float32", "shape": [1, 1], "data": "AAAAAA=="}, "inputs": [{"text": "x"}]}
    n = int(mb * 2**20 // 3)
    return [
        ("token in a malformed header", b"GET /v1/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
         + token.encode() + b"\r\r\nConnection: close\r\n\r\n"),
        ("wrong token, not UTF-8", request(b"{}", auth=b"Bearer \xff\xfe")),
        ("lone surrogate", request(json.dumps({**good, "inputs": [{"text": "\ud800"}]}).encode())),
        ("nested 1,000 deep", request(b"[" * 1000 + b"]" * 1000)),
        ("unknown charset", request(b"{}", b"Content-Type: application/json; charset=klingon\r\n")),
        ("gzip that is not", request(b"plain", b"Content-Encoding: gzip\r\n")),
        ("a length that lies (10^12)", request(b"{}", length=10**12)),
        (f"{mb:g} MB of tiny values", request(b"[" + b"{}," * n + b"{}]")),
    ]


def send_raw(url: str, data: bytes, timeout: float = 60.0) -> int:
    """Send ``data`` over a socket; the status answered, or 0 if the connection closed without one."""
    from urllib.parse import urlparse

    where = urlparse(url)
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as sock:
        sock.sendall(data)
        head = sock.recv(64)
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0


def make_client(url: str, token: str, timeout_s: float):
    """gdfo-ray's own service client, with a retry budget sized for a saturated limit."""
    from gdfo_ray import GDFOConfig
    from gdfo_ray.teachers.http import HttpTeacher

    config = GDFOConfig.from_dict({"model": {"teacher": url}, "service": {
        "timeout_s": timeout_s, "max_retries": 200, "backoff_s": 0.05, "backoff_max_s": 2.0}})
    return HttpTeacher(config, data=None, token=token)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rate", type=float, default=40.0, help="the service's limit, calls/s")
    p.add_argument("--burst", type=int, default=4, help="calls the limit lets through at once (rate/10 here)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    p.add_argument("--window", type=float, default=10.0, help="seconds per reported window")
    p.add_argument("--latency", type=float, default=0.02, help="simulated service latency (s)")
    p.add_argument("--model", help="serve this model instead of a simulated one")
    p.add_argument("--inputs", type=int, default=32, help="inputs per call")
    p.add_argument("--dup-share", type=float, default=0.05, help="calls sent twice with the same key")
    p.add_argument("--timeout-share", type=float, default=0.02,
                   help="calls whose first attempt times out on the client (then retried with the same key)")
    p.add_argument("--idempotency-cache", type=int, default=1000,
                   help="the service's bound on remembered keys (small: the bound is reached during the run)")
    p.add_argument("--hostile-clients", type=int, default=0,
                   help="attacker threads sending hostile requests over raw sockets beside the good clients")
    p.add_argument("--hostile-mb", type=float, default=20.0, help="size of the attackers' bodies of tiny values")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="the service's --max-body-mb")
    args = p.parse_args(argv)
    token = secrets.token_urlsafe(16)
    proc, url = start_service(args, token)
    try:
        return _measure(args, token, proc, url)
    finally:  # a benchmark that fails midway leaves no service behind
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def _measure(args, token: str, proc, url: str) -> int:
    import psutil

    from gdfo_ray.wire import encode_array

    service = psutil.Process(proc.pid)
    headers = {"Authorization": f"Bearer {token}"}
    info = requests.get(url + "/v1/info", headers=headers, timeout=10).json()
    hidden = info["hidden_size"]
    words = "the movie was good bad great fine awful plot acting story fun dull it a".split()
    rng = np.random.default_rng(0)
    body_texts = [{"text": " ".join(rng.choice(words, 12))} for _ in range(args.inputs)]

    lock = threading.Lock()
    asked: list = []  # distinct keys that got their answer
    call_s: list = []
    stop = threading.Event()
    errors: list = []

    attempts: dict = {}  # key -> [(time sent, status, wait asked for)]

    def recorder(response, *a, **kw):
        key = response.request.headers.get("Idempotency-Key")
        if key is not None:
            from gdfo_ray.teachers.http import retry_after

            wait = retry_after(response.headers) if response.status_code == 429 else None
            sent = time.monotonic() - response.elapsed.total_seconds()
            with lock:
                attempts.setdefault(key, []).append((sent, time.monotonic(), response.status_code, wait))
        return response

    def worker(i: int) -> None:
        client = make_client(url, token, 30.0)
        client._session().hooks["response"].append(recorder)
        hasty = make_client(url, token, args.latency / 4)  # its first attempt times out before the answer
        hasty.settings = client.settings.__class__(**{**client.settings.__dict__, "timeout_s": args.latency / 4,
                                                      "max_retries": 0})
        r = random.Random(i)
        prompt = np.random.default_rng(i).normal(size=(4, hidden)).astype(np.float32)
        while not stop.is_set():
            key = uuid.uuid4().hex
            body = {"template": "{prompt} {text} It was {mask}", "verbalizer": ["bad", "great"],
                    "prompt": encode_array(prompt), "inputs": body_texts}
            t0 = time.monotonic()
            try:
                u = r.random()
                if u < args.timeout_share:
                    try:
                        hasty._request("POST", "/v1/score", body, key=key)
                    except Exception:  # the lost first attempt: retried below with the same key
                        pass
                client._request("POST", "/v1/score", body, key=key)
                if u > 1 - args.dup_share:  # an answer lost on the way back: sent again, same key
                    client._request("POST", "/v1/score", body, key=key)
            except Exception as e:  # reported at the end; the benchmark fails on any
                errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                asked.append(key)
                call_s.append(time.monotonic() - t0)

    hostile = hostile_requests(token, args.hostile_mb)
    hostile_status: dict = {}  # (name, status) -> count
    health_s: list = []
    peak = {"rss": service.memory_info().rss}

    def attacker(i: int) -> None:
        r = random.Random(1000 + i)
        while not stop.is_set():
            name, data = r.choice(hostile)
            try:
                status = send_raw(url, data)
            except OSError as e:  # the service may close on a refused body before it is all sent
                status = f"closed ({type(e).__name__})"
            with lock:
                hostile_status[(name, status)] = hostile_status.get((name, status), 0) + 1

    def watcher() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                requests.get(url + "/v1/health", timeout=30)
                health_s.append(time.monotonic() - t0)
            except requests.RequestException:
                health_s.append(float("inf"))
            peak["rss"] = max(peak["rss"], service.memory_info().rss)
            time.sleep(0.1)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
    threads += [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(args.hostile_clients)]
    threads.append(threading.Thread(target=watcher, daemon=True))
    stats0 = requests.get(url + "/v1/stats", headers=headers, timeout=10).json()
    t_start = time.monotonic()  # the windows count from here: starting 64 busy threads delays the main one
    last_billed, last_t = stats0.get("billed", 0), t_start
    for t in threads:
        t.start()
    windows = []
    print(f"gdfo serve ({info['model']}), limit {args.rate:g} calls/s (burst {args.burst}), {args.clients} clients, "
          f"{args.inputs} inputs per call, {args.duration:.0f} s", flush=True)
    print("| window (s) | calls/s billed | share of limit | 429s | service RSS (MB) |\n|---|---|---|---|---|", flush=True)
    last_429 = stats0.get("rate_limited", 0)
    while time.monotonic() - t_start < args.duration:
        time.sleep(args.window)
        stats = requests.get(url + "/v1/stats", headers=headers, timeout=10).json()
        now = time.monotonic()
        rate = (stats.get("billed", 0) - last_billed) / (now - last_t)
        rss = service.memory_info().rss / 2**20
        windows.append((now - t_start, rate, stats.get("rate_limited", 0) - last_429, rss))
        print(f"| {windows[-1][0]:.0f} | {rate:.2f} | {rate / args.rate:.1%} | {windows[-1][2]} | {rss:.1f} |",
              flush=True)
        last_billed, last_t, last_429 = stats.get("billed", 0), now, stats.get("rate_limited", 0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    stats = requests.get(url + "/v1/stats", headers=headers, timeout=10).json()
    proc.terminate()
    proc.wait(timeout=30)
    with open(proc.log_path) as f:
        log_lines = f.read().splitlines()
    if os.environ.get("GDFO_KEEP_SERVE_LOG") is None:
        os.remove(proc.log_path)

    honoured = violated = 0
    for tries in attempts.values():
        tries.sort()
        for (sent, answered, status, wait), (nxt, *_rest) in zip(tries, tries[1:]):
            if status == 429 and wait is not None:
                if nxt - answered >= wait - 1e-3:
                    honoured += 1
                else:
                    violated += 1
    steady = [w[1] for w in windows[1:]] or [w[1] for w in windows]
    billed = stats.get("billed", 0) - stats0.get("billed", 0)
    rss = [w[3] for w in windows]
    print()
    print(f"- calls/s billed over the steady windows: {np.mean(steady):.2f} against a limit of {args.rate:g} "
          f"({np.mean(steady) / args.rate:.1%}; windows from {min(steady):.2f} to {max(steady):.2f})")
    print(f"- call latency (all attempts and waits): p50 {np.percentile(call_s, 50) * 1e3:.0f} ms, "
          f"p99 {np.percentile(call_s, 99) * 1e3:.0f} ms over {len(call_s)} calls")
    print(f"- 429s sent: {stats.get('rate_limited', 0)}; replayed answers (same key): {stats.get('replayed', 0)}; "
          f"server errors: {stats.get('server_error', 0)}; client errors: {len(errors)}")
    print(f"- 429s followed by a retry: {honoured + violated}; the retry came no sooner than asked: {honoured} "
          f"(sooner: {violated})")
    print(f"- calls asked for (distinct keys answered): {len(set(asked))}; billed: {billed} "
          f"({'equal' if billed == len(set(asked)) else 'DIFFERENT'})")
    print(f"- service RSS: first window {rss[0]:.1f} MB, last {rss[-1]:.1f} MB, max {max(rss):.1f} MB")
    print(f"- service peak RSS (sampled every 0.1 s): {peak['rss'] / 2**20:.1f} MB; health check latency: p50 "
          f"{np.percentile(health_s, 50) * 1e3:.0f} ms, p99 {np.percentile(health_s, 99) * 1e3:.0f} ms, "
          f"max {max(health_s) * 1e3:.0f} ms over {len(health_s)} checks")
    server_errors = 0
    if args.hostile_clients:
        sent = sum(hostile_status.values())
        print(f"- hostile requests: {sent} from {args.hostile_clients} attackers beside the good calls; good calls "
              f"that failed: {len(errors)}")
        leaked = sum(token in line for line in log_lines)
        tracebacks = sum(line.startswith("Traceback") for line in log_lines)
        print(f"- the service's log: {len(log_lines)} lines, {tracebacks} tracebacks, {leaked} holding the token")
        print("  | hostile request | status | count |\n  |---|---|---|")
        for (name, status), count in sorted(hostile_status.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            print(f"  | {name} | {status} | {count} |")
            server_errors += isinstance(status, int) and status >= 500
    if errors:
        print("errors:", errors[:5])
    ok = (billed == len(set(asked)) and not errors and stats.get("server_error", 0) == 0 and not violated
          and not server_errors)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
