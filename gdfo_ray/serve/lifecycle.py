"""Starting and stopping the service: its token, in a thread (tests, notebooks) or in the foreground."""

from __future__ import annotations

import asyncio
import collections
import os
import secrets
import signal
import threading

from gdfo_ray.exceptions import ConfigError
from gdfo_ray.serve.app import build_app, quiet_runner
from gdfo_ray.serve.scorers import make_scorer
from gdfo_ray.serve.settings import TOKEN_ENV, ServeConfig


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0"), is_loopback("::1")
    (True, True, False, True)
    """
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def resolve_token(config: ServeConfig) -> tuple[str, bool]:
    """The token to require, and whether it was generated here (then it must be shown once).

    A generated token is printed to the terminal, which is fine on loopback only: a service
    that others can reach must be given its token (``--token`` or ``$GDFO_SERVE_TOKEN``).
    """
    if config.token:
        return config.token, False
    if os.environ.get(TOKEN_ENV):
        if len(os.environ[TOKEN_ENV]) < 8:
            raise ConfigError(f"${TOKEN_ENV} must be at least 8 characters long.")
        return os.environ[TOKEN_ENV], False
    if not is_loopback(config.host):
        raise ConfigError(
            f"Refusing to listen on {config.host!r} without a token: every machine that reaches it could use the "
            f"model. Set ${TOKEN_ENV} (or pass --token) to a secret of at least 8 characters, or listen on "
            "127.0.0.1.")
    return secrets.token_urlsafe(24), True


class ServerHandle:
    """A service running in a background thread (tests, benchmarks, notebooks)."""

    def __init__(self, url: str, token: str, loop, runner, thread, shutdown_grace_s: float = 30.0):
        self.url, self.token = url, token
        self._loop, self._runner, self._thread = loop, runner, thread
        self._grace = shutdown_grace_s

    def stats(self) -> dict:
        import requests

        return requests.get(self.url + "/v1/stats", headers={"Authorization": f"Bearer {self.token}"},
                            timeout=10).json()

    def stop(self) -> None:
        # The grace for requests in flight, and as long again for the rest of the cleanup.
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=2 * self._grace + 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def _start(config: ServeConfig, scorer, token: str):
    from aiohttp import web

    counts: collections.Counter = collections.Counter()
    runner = quiet_runner(build_app(config, scorer, token, counts), counts, config.shutdown_grace_s)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://{config.host}:{port}"


def start_in_thread(config: ServeConfig, scorer=None) -> ServerHandle:
    """Start the service on its own event loop thread; returns once it accepts requests."""
    token, _ = resolve_token(config)
    scorer = scorer if scorer is not None else make_scorer(config)
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready = threading.Event()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["runner"], started["url"] = loop.run_until_complete(_start(config, scorer, token))
        except BaseException as e:  # reported to the caller below
            started["error"] = e
            ready.set()
            loop.close()
            return
        ready.set()
        loop.run_forever()
        # Stopped: join the loop's worker threads, so that none is left running at interpreter exit.
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    thread = threading.Thread(target=main, name="gdfo-serve", daemon=True)
    thread.start()
    ready.wait()
    if "error" in started:
        raise started["error"]
    return ServerHandle(started["url"], token, loop, started["runner"], thread, config.shutdown_grace_s)


def serve(config: ServeConfig, say=print) -> None:
    """Run the service in the foreground until SIGINT or SIGTERM.

    Both signals are handled here, whatever the process inherited: a shell that starts a
    command in the background without job control (``gdfo serve ... &`` in a script) makes it
    ignore SIGINT, and SIGTERM is what service managers send.
    """
    token, generated = resolve_token(config)
    scorer = make_scorer(config)
    info = scorer.info()
    received: list = []

    async def main() -> None:
        runner, url = await _start(config, scorer, token)
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        handled = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, lambda s=sig: (received.append(s), stop.set()))
                handled.append(sig)
            except (NotImplementedError, RuntimeError):  # no loop signal handlers here (Windows): Ctrl-C raises
                pass
        say(f"[gdfo serve] {info['model']} ({info['kind']}, hidden {info['hidden_size']}) on {url}")
        if generated:
            say(f"[gdfo serve] token (set GDFO_TEACHER_TOKEN to it on the client): {token}")
        try:
            await stop.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    say("[gdfo serve] stopped" + (f" ({signal.Signals(received[0]).name})" if received else ""))


def wait_until_healthy(url: str, proc=None, timeout_s: float = 120.0) -> None:
    """Block until ``GET url/v1/health`` answers 200: a ``gdfo serve`` started as a process is ready.

    Raises:
        RuntimeError: ``proc`` (a ``subprocess.Popen``) exited first, or ``timeout_s`` passed.
    """
    import time

    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"gdfo serve exited with {proc.returncode} before it answered at {url}")
        try:
            if requests.get(url + "/v1/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gdfo serve did not answer at {url} within {timeout_s:g} s")
