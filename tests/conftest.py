"""Fixtures of the Python end-to-end suite: one `arrakis serve` for the
session (real microVMs), the py-arrakis manager on it, and sandboxes that
are destroyed whatever happens to the test.

A failing test's report carries the tail of each running server's log; the
logs of a run with failures are kept and their paths printed at the end.
"""

from __future__ import annotations

import atexit
import itertools
import signal
from urllib.parse import quote

import py_arrakis.client
import pytest
import requests
from py_arrakis import Sandbox, SandboxManager

import arrakis_server
from arrakis_server import HTTP_TIMEOUT, Server, http


class _BoundedRequests:
    """What py-arrakis sees as `requests`: the same functions, with a
    timeout on every call. The SDK sets none, and a call stuck in a worker
    thread would outlive pytest-timeout and hang the run; the requests on
    the wire are unchanged."""

    def __getattr__(self, name):
        return getattr(requests, name)

    @staticmethod
    def _bounded(method):
        def call(*args, **kwargs):
            kwargs.setdefault("timeout", HTTP_TIMEOUT)
            return method(*args, **kwargs)

        return call

    def __init__(self):
        for name in ("get", "post", "patch", "put", "delete", "request"):
            setattr(self, name, self._bounded(getattr(requests, name)))


py_arrakis.client.requests = _BoundedRequests()

# Servers alive now, for the failure reports; and every server of the run.
_active: list[Server] = []
_all: list[Server] = []
_failed = False


def start_server(name: str, config: str | None = None, tmp=None, env: dict | None = None) -> Server:
    """A server registered for failure reports; the caller stops it with
    `stop_server`."""
    server = arrakis_server.start(name, config=config, tmp=tmp, env=env)
    _active.append(server)
    _all.append(server)
    return server


def pytest_configure(config):
    # SIGTERM (a CI timeout, `kill`) stops the run like Ctrl-C does, so the
    # finalizers still destroy the VMs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@atexit.register
def _kill_everything_left() -> None:
    """If pytest is interrupted before the finalizers ran, no server or VM
    of this run outlives it."""
    for server in _all:
        if not server.stopped:
            server.kill()


def stop_server(server: Server) -> None:
    if server in _active:
        _active.remove(server)
    if _failed:
        server.keep = True
    server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    global _failed
    report = yield
    if report.failed:
        _failed = True
        for server in _active:
            server.keep = True
            report.sections.append(
                (
                    f"arrakis serve log, last lines ({server.log_path})",
                    server.log_tail(40),
                )
            )
    return report


def pytest_terminal_summary(terminalreporter):
    for server in _all:
        for problem in server.problems:
            terminalreporter.write_line(f"arrakis teardown: {problem}", yellow=True)
        if server.keep and server.stopped:
            terminalreporter.write_line(f"arrakis serve log kept: {server.log_path}")


@pytest.fixture(autouse=True)
def server_errors_allowed():
    """Fails a test during which a running server logged a 5xx reply. A test
    that expects some adds their status (e.g. "501") to this set."""
    allowed: set[str] = set()
    marks = {id(s): len(s.log()) for s in _active}
    yield allowed
    errors = []
    for s in _active:
        for method, path, status in s.server_errors(marks.get(id(s), 0)):
            if status not in allowed:
                errors.append(f"{s.name}: {method} {path} -> {status}")
    if errors:
        pytest.fail("5xx replies in the server log during this test: " + "; ".join(errors[:20]))


@pytest.fixture(scope="session")
def server():
    server = start_server("session")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def base_url(server) -> str:
    return server.base_url


@pytest.fixture
def mgr(base_url) -> SandboxManager:
    return SandboxManager(base_url)


def vm_path(name: str) -> str:
    return "/v1/vms/" + quote(name, safe="")


def destroy_quietly(base_url: str, name: str) -> None:
    try:
        http("DELETE", base_url + vm_path(name), timeout=180)
    except requests.RequestException:
        pass


_counter = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}"


class Names:
    """Hands out VM names and destroys every VM named so at the end."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.names: list[str] = []

    def __call__(self, name: str) -> str:
        self.names.append(name)
        return name

    def unique(self, prefix: str) -> str:
        return self(unique(prefix))

    def cleanup(self) -> None:
        for name in self.names:
            destroy_quietly(self.base_url, name)


@pytest.fixture
def names(base_url):
    """`names("x")` registers the VM name "x" for destruction after the test;
    `names.unique("x")` makes a fresh one."""
    tracker = Names(base_url)
    yield tracker
    tracker.cleanup()


@pytest.fixture
def sandbox(mgr, names) -> Sandbox:
    """A fresh running sandbox, destroyed after the test."""
    return mgr.start_sandbox(names.unique("sb"))


@pytest.fixture(scope="module")
def shared_sandbox(base_url) -> Sandbox:
    """One running sandbox for the read-mostly tests of a module."""
    mgr = SandboxManager(base_url)
    name = unique("shared")
    try:
        yield mgr.start_sandbox(name)
    finally:
        destroy_quietly(base_url, name)
