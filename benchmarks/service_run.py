"""The README's run against ``gdfo serve`` on the real model, three ways: plain, through an outage, and resumed.

Starts ``gdfo serve`` on the default teacher (SmolLM2-135M-Instruct, default limits, token from
the environment) as its own process, then runs ``gdfo run --task sst2 --method bbt --teacher URL
--budget 68 --seed 42`` with the README's pool settings (four teacher-query actors on a Ray started
for the run, half a CPU each, 20 calls/s, 8 in flight) as a user would, three times:

- **plain**: to the end, test set included (872 rows, more than the service's ``max_inputs``);
- **outage**: the service is killed (SIGKILL) after the first generation and started again on the
  same port ``--down-s`` seconds later; the run waits it out and ends by itself;
- **resume**: the driver is killed (SIGKILL) after the second generation, then continued with
  ``gdfo run --output-dir DIR --resume`` and no other flag.

It prints, per run: calls charged, the test accuracy of the manual and the tuned prompt, the
service's billed requests, the outage lines the run printed, and the wall time. The three must
agree on calls and accuracies.

    python benchmarks/service_run.py --out /tmp/service_run
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import requests

from gdfo_ray.serve import wait_until_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, model: str, port: int, token: str, threads: int):
        self.model, self.port, self.token, self.threads = model, port, token, threads
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self) -> None:
        env = {**os.environ, "GDFO_SERVE_TOKEN": self.token}
        self.proc = subprocess.Popen([sys.executable, "-m", "gdfo_ray.cli", "serve", "--model", self.model, "--port",
                                      str(self.port), "--threads", str(self.threads)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait_until_healthy(self.url, self.proc, timeout_s=600)

    def billed(self) -> int:
        stats = requests.get(self.url + "/v1/stats", headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        return int(stats.json().get("billed", 0))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def gdfo_run(args: list, token: str, on_line=None) -> tuple[int, list]:
    env = {**os.environ, "GDFO_TEACHER_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "gdfo_ray.cli", "run", *args], stderr=subprocess.PIPE,
                            text=True, env=env)
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip())
        print("    " + line.rstrip(), flush=True)
        if on_line is not None:
            on_line(line, proc)
    return proc.wait(), lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the three runs")
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--budget", type=int, default=68)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--down-s", type=float, default=20.0, help="how long the service stays down")
    parser.add_argument("--threads", type=int, default=0, help="the service's torch threads (0: all)")
    parser.add_argument("--extra", nargs="*", default=[], help="more gdfo run flags, e.g. --set task.max_test_examples=200")
    args = parser.parse_args()
    token = secrets.token_urlsafe(16)
    service = Service(args.model, free_port(), token, args.threads)
    service.start()
    # The README's service command: four teacher-query actors on Ray, rate-limited on the client side. They only
    # wait on HTTP, so half a CPU each lets the four fit a 2-core machine.
    common = ["--task", "sst2", "--method", "bbt", "--teacher", service.url, "--budget", str(args.budget),
              "--seed", str(args.seed), "--set", "pool.n_teacher_actors=4", "--set", "pool.calls_per_s=20",
              "--set", "pool.max_in_flight=8", "--set", "pool.teacher_num_cpus=0.5",
              "--set", "pool.ray_address=local", *args.extra]
    results = {}
    try:
        for name in ("plain", "outage", "resume"):
            out = os.path.join(args.out, name)
            print(f"== {name}", flush=True)
            before, started = service.billed(), time.monotonic()
            flags = [*common, "--output-dir", out, "--overwrite"]
            if name == "plain":
                rc, lines = gdfo_run(flags, token)
            elif name == "outage":
                state = {"killed": False}

                def restart() -> None:
                    time.sleep(args.down_s)
                    service.start()

                def on_line(line, proc):
                    if line.startswith("gen   1 ") and not state["killed"]:
                        state["killed"] = True
                        state["billed"] = service.billed() - before
                        service.kill()
                        threading.Thread(target=restart, daemon=True).start()

                rc, lines = gdfo_run(flags, token, on_line)
                before = -state["billed"]  # the restarted service counts from zero
            else:
                def on_line(line, proc):
                    if line.startswith("gen   2 "):
                        proc.send_signal(signal.SIGKILL)

                rc, lines = gdfo_run(flags, token, on_line)
                print(f"    (driver killed: exit {rc}); resuming with --output-dir and --resume alone", flush=True)
                rc, more = gdfo_run(["--output-dir", out, "--resume"], token)
                lines += more
            if rc != 0:
                raise SystemExit(f"{name}: gdfo run exited with {rc}")
            summary = json.load(open(os.path.join(out, "summary.json")))
            results[name] = {"calls": summary["calls"], "manual": summary["test"]["teacher_manual"],
                             "tuned": summary["test"]["teacher_tuned"], "billed": service.billed() - before,
                             "outage_lines": [x.strip() for x in lines if "not answering" in x or "is back" in x],
                             "wall_s": time.monotonic() - started}
    finally:
        service.kill()
    print("\n| run | calls | test manual | test tuned | billed requests | wall s |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['calls']} | {r['manual']:.4f} | {r['tuned']:.4f} | {r['billed']} | {r['wall_s']:.0f} |")
    for line in results.get("outage", {}).get("outage_lines", []):
        print("outage: " + line)
    same = len({(r["calls"], round(r["manual"], 6), round(r["tuned"], 6)) for r in results.values()}) == 1
    print(f"the three runs agree on calls and test accuracies: {same}")


if __name__ == "__main__":
    main()
