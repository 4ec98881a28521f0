"""Network namespaces joined by veth links: several "hosts" on one machine, without Docker.

``NetnsStar`` builds a star: one primary namespace, N edge namespaces, and the root namespace
(where the test itself runs)::

    root --(10.B.0.0/30)-- primary --(10.B.i.0/30)-- edge i     (i = 1..N)
    root --(10.B.(10+i).0/30)----------------------- edge i

- root <-> primary: the test's publisher reaches the primary's ingest port (and its metrics).
- primary <-> edge i: the upstream link of edge i; ``link_down(i)`` / ``link_up(i)`` cut it.
- root <-> edge i: the test's clients reach edge i's client port (and its metrics) over a
  link of their own, so cutting edge i's upstream never touches its client sessions.

Every name is unique to one run (``lsgt-<pid>-<random>-...`` namespaces, ``<random>...``
interfaces); B (the second octet) is chosen so the root namespace's new /30s overlap none of
its existing addresses or routes. ``close()`` (also on a failed set-up) ends the processes
still inside the namespaces (only ours: the namespaces are this run's), removes the root ends
of the veth pairs and the namespaces. Needs root and iproute2: ``unavailable()`` says why not.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["NetnsStar", "NetnsError", "unavailable"]

PREFIX = "lsgt"


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message holds the command and its stderr."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: rc={proc.returncode}: {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why namespaces cannot be built here (a skip reason), or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and veth links need root (run the suite as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    proc = _ip("netns", "add", probe, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` failed: {proc.stderr.strip() or proc.returncode}"
    try:
        for what, args in (
            ("ip netns exec", ("netns", "exec", probe, "true")),
            ("a veth pair", ("-n", probe, "link", "add", "p0", "type", "veth", "peer", "p1")),
        ):
            proc = _ip(*args, check=False)
            if proc.returncode != 0:
                return f"{what} failed: {proc.stderr.strip() or proc.returncode}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _root_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace has an address or route in."""
    nets: list[ipaddress.IPv4Network] = []
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        # "10.1.0.0/16 dev x", "local 10.1.0.1 dev x table local", "default via ..."
        for word in line.split()[:2]:
            if word == "default":
                break
            try:
                nets.append(ipaddress.IPv4Network(word, strict=False))
                break
            except ValueError:
                continue
    return nets


def _free_octet() -> int:
    """A B in 64..250 whose 10.B.0.0/16 overlaps nothing in the root namespace (77 first)."""
    taken = _root_networks()
    candidates = [77, *secrets.SystemRandom().sample(range(64, 251), 187)]
    for b in candidates:
        block = ipaddress.IPv4Network(f"10.{b}.0.0/16")
        # a default route (0.0.0.0/0) overlaps everything and is no conflict
        if not any(n.prefixlen > 0 and n.overlaps(block) for n in taken):
            return b
    raise NetnsError("no free 10.B.0.0/16 for the test links in the root namespace")


class NetnsStar:
    """The namespaces and links of one run; see the module docstring."""

    def __init__(self, edges: int = 2) -> None:
        token = secrets.token_hex(3)
        base = f"{PREFIX}-{os.getpid()}-{token}"
        self.primary = f"{base}-primary"
        self.edges = [f"{base}-edge{i}" for i in range(1, edges + 1)]
        self._tag = f"t{token}"  # interface names: <= 15 characters
        self._root_links: list[str] = []
        self._made: list[str] = []
        self._wrappers = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-wrap-"))
        try:
            self.octet = _free_octet()
            self._build()
        except BaseException:
            self.close()
            raise

    # --- addresses ------------------------------------------------------------------------

    def _net(self, third: int, host: int) -> str:
        return f"10.{self.octet}.{third}.{host}"

    @property
    def primary_from_root(self) -> str:
        """The primary's address on its link to the root namespace."""
        return self._net(0, 2)

    def primary_for_edge(self, i: int) -> str:
        """The primary's address as edge ``i`` (1-based) reaches it: the upstream host."""
        return self._net(i, 1)

    def edge_from_root(self, i: int) -> str:
        """Edge ``i``'s address on its link to the root namespace (its clients' way in)."""
        return self._net(10 + i, 2)

    def upstream_link(self, i: int) -> tuple[str, str]:
        """(namespace, interface) of the primary's end of edge ``i``'s upstream link."""
        return self.primary, f"{self._tag}p{i}"

    # --- set-up -----------------------------------------------------------------------------

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _pair(
        self, a_ns: str | None, a_dev: str, a_ip: str, b_ns: str, b_dev: str, b_ip: str
    ) -> None:
        """A veth pair: a_dev in a_ns (None: root) with a_ip/30, b_dev in b_ns with b_ip/30."""
        if a_ns is None:
            _ip("link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b_ns)
            self._root_links.append(a_dev)
        else:
            _ip(
                "-n", a_ns, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev,
                "netns", b_ns,
            )  # fmt: skip
        for ns, dev, addr in ((a_ns, a_dev, a_ip), (b_ns, b_dev, b_ip)):
            where = ["-n", ns] if ns else []
            _ip(*where, "addr", "add", f"{addr}/30", "dev", dev)
            _ip(*where, "link", "set", dev, "up")

    def _build(self) -> None:
        for name in (self.primary, *self.edges):
            self._add_ns(name)
        t = self._tag
        self._pair(None, f"{t}rp", self._net(0, 1), self.primary, f"{t}pr", self._net(0, 2))
        for i, edge in enumerate(self.edges, start=1):
            self._pair(self.primary, f"{t}p{i}", self._net(i, 1), edge, f"{t}e{i}", self._net(i, 2))
            self._pair(
                None, f"{t}r{i}", self._net(10 + i, 1), edge, f"{t}x{i}", self._net(10 + i, 2)
            )

    # --- use --------------------------------------------------------------------------------

    def python_in(self, ns: str) -> str:
        """An executable that runs this interpreter inside ``ns`` with the given arguments
        (``ip netns exec`` execs in place: the process started is the interpreter itself)."""
        path = self._wrappers / f"python-{ns}"
        if not path.exists():
            path.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {sys.executable} "$@"\n')
            path.chmod(0o755)
        return str(path)

    def link_down(self, i: int) -> None:
        """Cut edge ``i``'s upstream link (both ends lose carrier)."""
        ns, dev = self.upstream_link(i)
        _ip("-n", ns, "link", "set", dev, "down")

    def link_up(self, i: int) -> None:
        ns, dev = self.upstream_link(i)
        _ip("-n", ns, "link", "set", dev, "up")

    def link_is_up(self, i: int) -> bool:
        """Whether edge ``i``'s upstream link is up with carrier (both ends up)."""
        ns, dev = self.upstream_link(i)
        line = _ip("-n", ns, "-o", "link", "show", dev).stdout
        flags = line[line.find("<") + 1 : line.find(">")].split(",")
        return "UP" in flags and "LOWER_UP" in flags

    def pids(self, ns: str) -> list[int]:
        proc = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    # --- tear-down --------------------------------------------------------------------------

    def close(self) -> list[str]:
        """End what still runs in the namespaces, remove links and namespaces; the problems
        met on the way (empty when everything went)."""
        problems: list[str] = []
        for ns in self._made:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = self.pids(ns)
                if not pids:
                    break
                if sig == signal.SIGKILL:
                    problems.append(f"killed pids {pids} left in {ns}")
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 5
                while self.pids(ns) and time.monotonic() < deadline:
                    time.sleep(0.05)
        for dev in self._root_links:
            _ip("link", "del", dev, check=False)
        for ns in self._made:
            proc = _ip("netns", "del", ns, check=False)
            if proc.returncode != 0:
                problems.append(f"ip netns del {ns}: {proc.stderr.strip()}")
        self._root_links.clear()
        self._made.clear()
        shutil.rmtree(self._wrappers, ignore_errors=True)
        return problems

    def __enter__(self) -> NetnsStar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
