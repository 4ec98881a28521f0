"""A worker process for tests/unit/test_shared_limits.py (imports the limits module only).

``python -m tests.unit.limits_child PATH SLOT KEY MAX_SESSIONS ATTEMPTS MODE``; it says
``ready`` once attached, then moves one step on every line read from stdin and answers
each with one line:

* ``race``: grab sessions of KEY (ATTEMPTS tries) -> ``got N``; -> ``total N`` (the
  key's sessions over every process); release its own, churn ATTEMPTS acquire/release
  pairs checking the key never has more than MAX_SESSIONS -> ``churn N over M``.
* ``hold``: take ATTEMPTS sessions of KEY and as many connections -> ``held``, then waits
  (to be killed).
"""

from __future__ import annotations

import sys

from gateway.workers.limits import SharedLimits


def main(argv: list[str]) -> None:
    path, slot, key, max_sessions, attempts, mode = argv
    limits = SharedLimits.attach(path, int(slot))
    most, tries = int(max_sessions), int(attempts)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    say("ready")
    step = sys.stdin.readline
    if mode == "hold":
        step()
        for _ in range(tries):
            assert limits.try_acquire(key, most) is None
            assert limits.try_open(most, most) is None
        say("held")
        step()  # EOF or killed
        return
    step()
    got = sum(limits.try_acquire(key, most) is None for _ in range(tries))
    say(f"got {got}")
    step()
    say(f"total {limits.sessions_of(key)}")
    step()
    for _ in range(got):
        limits.release_key(key)
    churned = over = 0
    for _ in range(tries):
        if limits.try_acquire(key, most) is None:
            churned += 1
            if limits.sessions_of(key) > most:
                over += 1
            limits.release_key(key)
    say(f"churn {churned} over {over}")
    limits.close()


if __name__ == "__main__":
    main(sys.argv[1:])
