"""The descriptor limit (issue 11, item 9): the gateway raises its soft RLIMIT_NOFILE to the
hard limit and keeps max_connections below it, so that a connection over the limit is
accepted and refused with a reason (and logged), not dropped in accept() with a bare EOF
(uvloop) or left hanging (asyncio)."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from tests.integration.helpers import RawClient, start_gateway

SOFT, HARD = 40, 160


def test_connections_over_the_fd_limit_are_refused_with_a_reason() -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-nofile-") as tmp:
        wrapper = Path(tmp) / "python"
        # A low hard limit, and a soft one lower still (as a login shell's 1024 under a
        # higher hard limit): the gateway should raise the soft one itself.
        wrapper.write_text(
            f"#!/bin/sh\nulimit -S -n {SOFT} && ulimit -H -n {HARD} || exit 97\n"
            f'exec "{sys.executable}" "$@"\n'
        )
        wrapper.chmod(0o755)
        gw = start_gateway(python=str(wrapper), feeds={"DEMO.SYNTH": "synthetic:?rate=100"})
        clients: list[RawClient] = []
        try:
            refusal = None
            for _ in range(HARD + 10):  # more connections than descriptors
                c = RawClient(gw.port, timeout=5.0)
                clients.append(c)
                first = c.line()  # a bare EOF raises EOFError, a hang TimeoutError
                if first.startswith("success=0"):
                    refusal = first
                    break
                assert first.startswith("lsg_version="), first
            assert refusal == "success=0|error=too many connections to this gateway"
            accepted = len(clients) - 1
        finally:
            for c in clients:
                c.close()
            assert gw.stop() == 0
            log = gw.log()
            gw.cleanup()
    m = re.search(r"descriptors nofile=(\d+) hard=(\d+) in_use=(\d+) max_connections=(\d+)", log)
    assert m is not None, log
    nofile, hard, _, budget = map(int, m.groups())
    assert (nofile, hard) == (HARD, HARD)  # the soft limit was raised to the hard one
    assert accepted == budget < HARD
    assert f"serving at most max_connections={budget}" in log
    assert "connection refused peer=127.0.0.1:" in log and "reason=max_connections" in log
