"""End-of-run verification: every session against the reference stream and the
gateway log, then the report (``_report``) with the global checks."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from tests.soak.config import (
    CUT_GRACE_S,
    CUT_LINE,
    EDGE_NS,
    ERR_INTERNAL,
    SCHEMA_RTYPE,
    SYS_WARNING,
    SoakConfig,
)
from tests.soak.controller import SoakReport, _metric, _Run, _slot_roles
from tests.soak.plans import Plan, warn_cut_seconds
from tests.soak.tracking import Ref

# --- verification ------------------------------------------------------------------------------

# the gateway's own per-session log lines ("id=" or "session_id=")
_END = re.compile(
    r"session end (?:session_)?id=(\d+) .*?records=(\d+) bytes=(\d+) skipped=(\d+) "
    r".*?reason=(.*)$"
)


#: a cut session the gateway reset because it had not drained within cut_grace_s
_RESET = re.compile(r"session reset (?:session_)?id=(\d+) .*reason=cut_not_drained")


def _log_resets(log: str) -> set[int]:
    return {int(m.group(1)) for m in _RESET.finditer(log)}


def _log_ends(log: str) -> dict[int, tuple[int, int, str]]:
    out = {}
    for line in log.splitlines():
        m = _END.search(line)
        if m:
            out[int(m.group(1))] = (int(m.group(2)), int(m.group(4)), m.group(5))
    return out


def _fingerprint(seq: np.ndarray) -> list[int]:
    u = seq.astype(np.uint64)
    return [len(seq), int(u.sum(dtype=np.uint64)), int((u * u).sum(dtype=np.uint64))]


def _check_session(
    s: dict[str, Any],
    ref: Ref,
    ends: dict[int, tuple[int, int, str]],
    cfg: SoakConfig,
    resets: set[int] | frozenset[int] = frozenset(),
) -> list[str]:
    """Promises broken by one session (empty: all kept). A stalled warn session that the
    gateway reset after its cut (it resumed reading later than cut_grace_s, e.g. on a
    loaded machine) is held to the promises of a late one: never a clean end without the
    disconnect ErrorMsg."""
    plan = s["plan"]
    kind = plan["kind"]
    late = bool(plan["late"]) or s["session_id"] in resets
    bad: list[str] = []
    if s["failure"]:
        bad.append(f"failure: {s['failure']}")
    if s["n_violations"]:
        bad.append(f"{s['n_violations']} stream violations: {s['violations'][:3]}")
    if not s["session_id"]:
        return bad
    end = ends.get(s["session_id"])
    if end is None:
        bad.append("the gateway logged no end for this session")
        sent, skipped, reason = -1, -1, ""
    else:
        sent, skipped, reason = end
    read_to_eof = s["eof"] and not s["lost_exc"]
    if sent >= 0 and not late:
        if read_to_eof and s["records"] != sent:
            bad.append(f"read to EOF {s['records']} data records, gateway sent {sent}")
        elif s["records"] > sent:
            bad.append(f"received {s['records']} data records, gateway sent only {sent}")
    errors = [tuple(e) for e in s["errors"]]
    expected_unresolved = len(plan["unknown"]) * len(plan["schemas"])
    if len(s["unresolved"]) != expected_unresolved:
        bad.append(f"{len(s['unresolved'])} unresolved-symbol errors, {expected_unresolved} due")
    if s["system"].get(1, 0) != len(plan["schemas"]):
        bad.append(f"{s['system'].get(1, 0)} subscription acks for {len(plan['schemas'])}")
    cap_text = f"slow reader: more than {cfg.hard_cap_bytes} bytes buffered; disconnecting"
    if s["lost_early"] and (ERR_INTERNAL, cap_text) not in errors:
        bad.append(f"lost before leaving ({s['lost_exc'] or 'EOF'}), gateway reason {reason!r}")
    if kind in ("healthy", "reference"):
        if errors:
            bad.append(f"ErrorMsgs {errors[:3]}")
        if s["skip_notices"]:
            bad.append(f"{s['skip_notices']} skip notices to a warn session")
        if skipped > 0:
            bad.append(f"gateway skipped {skipped} records of a warn session")
        if s["left"] == "drain" and not s["eof"]:
            bad.append("no EOF after half-close")
        if plan["lifetime"] >= 3 and s["records"] == 0 and kind == "healthy":
            bad.append("no data records at all")
    elif kind == "skip_stall":
        stalled_fully = bool(s["stall_to"])
        if stalled_fully and not s["skip_notices"] and not s["cut_seen"]:
            if not (errors and errors[-1][0] == ERR_INTERNAL):
                bad.append(
                    f"stalled {s['stall_to'] - s['stall_from']:.1f} s, resumed, "
                    "but no 'Skipped N records' notice and no cut"
                )
        if s["system"].get(SYS_WARNING, 0):
            bad.append("slow-reader warnings to a skip session")
        if errors and not (errors[-1] == (ERR_INTERNAL, cap_text) and len(errors) == 1):
            bad.append(f"unexpected ErrorMsgs {errors[:3]}")
        if read_to_eof and skipped >= 0 and not errors and skipped != s["skipped_reported"]:
            bad.append(f"gateway skipped {skipped}, notices told {s['skipped_reported']}")
        if any(a < 0 or b < 0 for a, b, _ in s["gaps"]):
            bad.append(f"skip notice without data on both sides: {s['gaps']}")
    elif kind == "warn_stall" and late:
        # The gateway gave up on draining it: whatever it still gets, the end must not look
        # like a normal end of stream (a clean EOF with no disconnect ErrorMsg).
        if not (s["cut_seen"] or s["left"] == "cut"):
            if s["stall_to"]:
                bad.append("stalled past the hard cap but never cut")
        elif errors != [(ERR_INTERNAL, cap_text)] and read_to_eof:
            bad.append(
                f"cut, did not drain within the {CUT_GRACE_S:g} s grace, then saw a clean EOF "
                f"without the disconnect ErrorMsg: {sent - s['records']} records and the notice "
                "lost silently"
            )
        return bad
    elif kind == "warn_stall":
        if s["warnings_during_stall"] < 1:
            bad.append("no SLOW_READER_WARNING while stalled")
        if s["skip_notices"] or (skipped > 0):
            bad.append(f"skipped records of a warn session ({skipped})")
        if s["cut_seen"] or s["left"] == "cut":
            if errors != [(ERR_INTERNAL, cap_text)]:
                bad.append(f"cut, but the ErrorMsgs were {errors[:3]}")
            if not reason.startswith("slow_reader_cap"):
                bad.append(f"cut, but the gateway's end reason is {reason!r}")
            if not s["eof"]:
                bad.append("cut, but the stream did not end cleanly after the ErrorMsg")
        elif s["stall_to"]:
            cut_s = warn_cut_seconds(Plan(**plan), cfg)
            stalled = s["stall_to"] - s["stall_from"]
            if stalled >= 1.5 * cut_s + 1.0:
                bad.append(f"stalled {stalled:.1f} s (over the cap after ~{cut_s:.1f} s), not cut")
    # completeness against the reference stream
    if kind != "reference":
        bad += _against_reference(s, ref)
    return bad


def _subset(plan: dict[str, Any], rt: np.ndarray, iid: np.ndarray) -> np.ndarray:
    """Which reference records a session's subscription covers."""
    rtypes = np.array([SCHEMA_RTYPE[x] for x in plan["schemas"]], dtype=np.uint8)
    want = np.isin(rt, rtypes)
    if plan["iids"] is not None:
        want &= np.isin(iid, np.array(plan["iids"], dtype=np.uint32))
    return want


def _against_reference(s: dict[str, Any], ref: Ref) -> list[str]:
    """The session's records against the reference stream (see the module docstring)."""
    plan = s["plan"]
    if not len(ref.seq):
        return ["no reference stream"]
    base = int(ref.seq[0])
    bad: list[str] = []
    if s["records"]:
        first, last = s["first"], s["last"]
        if first < base or last > int(ref.seq[-1]):
            return [f"range {first}..{last} outside the reference {base}..{int(ref.seq[-1])}"]
        sl = slice(first - base, last - base + 1)
        seq, rt = ref.seq[sl], ref.rt[sl]
        want = _subset(plan, rt, ref.iid[sl])
        for a, b, n in s["gaps"]:
            if a < 0 or b < 0:
                continue
            in_gap = want & (seq > a) & (seq < b)
            count = int(np.count_nonzero(in_gap))
            if count != n:
                bad.append(f"skip notice said {n} between {a} and {b}, the reference has {count}")
            want &= ~in_gap
        for r in sorted({SCHEMA_RTYPE[x] for x in plan["schemas"]}):
            exp = _fingerprint(seq[want & (rt == r)])
            got = s["fp"].get(r, s["fp"].get(str(r), [0, 0, 0]))
            if [int(x) for x in got] != exp:
                bad.append(
                    f"rtype {r:#x} between sequence {first} and {last}: received {got[0]} "
                    f"records, the reference has {exp[0]}"
                    + ("" if got[0] != exp[0] else " (same count, different records)")
                )
    if plan["kind"] == "healthy" and len(ref.ts) == len(ref.seq):
        bad += _edges(s, ref, base)
    return bad


def _edges(s: dict[str, Any], ref: Ref, base: int) -> list[str]:
    """Nothing missing before the first or after the last record received: every record of
    the subscription published EDGE_NS after the session started and EDGE_NS before it left
    is there (the reference's ts_recv is the feed's wall clock, as are the session's times)."""
    if not s["start_wall"] or s["left"] not in ("drain", "close", "reset"):
        return []
    plan = s["plan"]
    lo = int(np.searchsorted(ref.ts_after, s["start_wall"] + EDGE_NS, side="left"))
    hi = int(np.searchsorted(ref.ts_before, s["leave_wall"] - EDGE_NS, side="right"))
    if lo >= hi:
        return []
    out = []
    if s["records"]:
        windows = [
            (lo, min(hi, s["first"] - base), "before its first record"),
            (max(lo, s["last"] - base + 1), hi, "after its last record"),
        ]
    else:
        windows = [(lo, hi, "at all")]
    for a, b, where in windows:
        if a < b:
            n = int(np.count_nonzero(_subset(plan, ref.rt[a:b], ref.iid[a:b])))
            if n:
                out.append(
                    f"{n} records of its subscription, published while it was connected, "
                    f"missing {where}"
                )
    return out


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _report(run: _Run, rep: SoakReport, log: str, exit_code: int | None) -> None:
    cfg = run.cfg
    ends = _log_ends(log)
    resets = _log_resets(log)
    ref = run.reference
    assert ref is not None
    sessions: list[dict[str, Any]] = []
    for w in run.workers:
        if "crash" in w:
            rep.fail(f"worker {w['index']} crashed: {w['crash']}")
            continue
        if w.get("stuck_slots"):
            rep.fail(f"worker {w['index']}: {w['stuck_slots']} slots did not finish in time")
        sessions += w["sessions"]
    ref_summary = ref.summary()
    ref_arrays = run.ref_arrays
    assert ref_arrays is not None
    # the reference itself: contiguous from start to end, never told anything bad
    ref_bad = _check_session(ref_summary, ref_arrays, ends, cfg)
    for b in ref_bad:
        rep.fail(f"reference session {ref.session_id}: {b}")
    rep.stats["reference_records"] = ref.tracker.data_records
    rep.say()
    rep.say(
        f"reference session: {ref.tracker.data_records} records, sequence "
        f"{ref.tracker.first}..{ref.tracker.last} "
        f"({'contiguous' if not ref.tracker.n_violations else 'NOT contiguous'})"
    )
    # per session
    by_class: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    broken: list[tuple[str, str]] = []  # (text, tag)
    for s in sessions:
        cls = s["plan"]["cls"]
        c = by_class[cls]
        c["sessions"] += 1
        c["received"] += s["records"]
        c["MiB in"] += s["bytes_in"]
        end = ends.get(s["session_id"])
        if end is not None:
            c["sent"] += end[0]
            c["skipped"] += end[1]
            reasons[cls][end[2].split(":", 1)[0]] += 1
        c["notices"] += s["skip_notices"]
        c["warnings"] += s["system"].get(SYS_WARNING, 0)
        c["cut"] += int(s["left"] == "cut")
        c["zstd"] += int(s["plan"]["zstd"])
        c["ts_out"] += int(s["plan"]["ts_out"])
        problems = _check_session(s, ref_arrays, ends, cfg, resets)
        if problems:
            c["BROKEN"] += 1
            p = s["plan"]
            broken.append(
                (
                    f"session {s['session_id']} [{p['cls']} {','.join(p['schemas'])} "
                    f"behavior={p['behavior']} zstd={p['zstd']} ts_out={p['ts_out']} "
                    f"leave={p['leave']}]: " + "; ".join(problems),
                    "late-cut" if p["late"] else "",
                )
            )
    total = Counter[str]()
    rep.say()
    head = (
        f"{'class':<18}{'sessions':>9}{'sent(gw)':>12}{'received':>12}{'skipped':>10}"
        f"{'notices':>8}{'warnings':>9}{'cut':>5}{'zstd':>5}{'ts_out':>7}{'MiB in':>9}{'BROKEN':>7}"
    )
    rep.say(head)
    rep.say("-" * len(head))
    order = ["all trades+mbp-1", "all mbp-1", "all trades", "filtered", "stalled skip"]
    order += ["stalled warn", "stalled warn late"]
    for cls in order + sorted(set(by_class) - set(order)):
        row = by_class.get(cls)
        if not row:
            continue
        total.update(row)
        rep.say(
            f"{cls:<18}{row['sessions']:>9}{row['sent']:>12}{row['received']:>12}"
            f"{row['skipped']:>10}{row['notices']:>8}{row['warnings']:>9}{row['cut']:>5}"
            f"{row['zstd']:>5}{row['ts_out']:>7}{row['MiB in'] / 2**20:>9.0f}{row['BROKEN']:>7}"
        )
    rep.say("-" * len(head))
    rep.say(
        f"{'total':<18}{total['sessions']:>9}{total['sent']:>12}{total['received']:>12}"
        f"{total['skipped']:>10}{total['notices']:>8}{total['warnings']:>9}{total['cut']:>5}"
        f"{total['zstd']:>5}{total['ts_out']:>7}{total['MiB in'] / 2**20:>9.0f}"
        f"{total['BROKEN']:>7}"
    )
    rep.stats["classes"] = {k: dict(v) for k, v in by_class.items()}
    rep.say("(sent/skipped: the gateway's own per-session log; received: data records read)")
    rep.say()
    rep.say("session end reasons (gateway log), per class:")
    for cls in order + sorted(set(reasons) - set(order)):
        if cls in reasons:
            rep.say(f"  {cls:<18} " + ", ".join(f"{k}={v}" for k, v in reasons[cls].most_common()))
    # skip episodes: one expected per stall; a new gap that opens within 0.1 s of feed time
    # after the previous resume means the reader was skipped again while catching up
    skip_sessions = [s for s in sessions if s["plan"]["kind"] == "skip_stall"]
    stalls = sum(1 for s in skip_sessions if s["stall_to"])
    episodes = sum(len(s["gaps"]) for s in skip_sessions)
    window = int(cfg.rate * 0.1)
    reskips = sum(
        1
        for s in skip_sessions
        for (_, b0, _), (a1, _, _) in zip(s["gaps"], s["gaps"][1:], strict=False)
        if 0 <= a1 - b0 <= window
    )
    rep.stats["skip_episodes"] = (stalls, episodes, reskips)
    rep.say(
        f"skip sessions: {stalls} stalls, {episodes} skip episodes (notices), {reskips} of "
        f"them re-skips within 0.1 s (feed time) of the previous resume"
    )
    for text, tag in broken[:40]:
        rep.fail(text, tag)
    if len(broken) > 40:
        rep.fail(f"... and {len(broken) - 40} more broken sessions")
    if total["sessions"] < cfg.sessions:
        rep.fail(f"only {total['sessions']} sessions ran for {cfg.sessions} slots")
    stalled_classes = {"stalled skip": "notices", "stalled warn": "cut"}
    roles = Counter(role for _, role in _slot_roles(cfg))
    for cls, what in stalled_classes.items():
        want = cfg.stalled and (cls == "stalled skip" or cfg.stalled > 1)
        if want and by_class.get(cls, Counter())[what] == 0:
            rep.fail(f"no {cls} session ever got {what}: the stall scenario did not happen")
    if roles["warn_stall_late"] and not by_class.get("stalled warn late", Counter())["cut"]:
        rep.fail(
            "no late-resuming warn session was ever cut: that scenario did not happen", "late-cut"
        )
    # hostile clients
    rep.say()
    acts: dict[str, Counter[bool]] = defaultdict(Counter)
    for action, outcome, ok in run.hostile:
        acts[action][ok] += 1
        if not ok:
            rep.fail(f"hostile {action}: {outcome}")
    rep.say(
        f"hostile connections: {len(run.hostile)} — "
        + ", ".join(
            f"{a}={c[True]}" + (f"(+{c[False]} BAD)" if c[False] else "")
            for a, c in sorted(acts.items())
        )
    )
    rep.stats["hostile"] = len(run.hostile)
    # metrics
    m = run.metrics
    rep.say()
    rep.say("gateway metrics at the end:")
    for name, label in (
        ("gateway_disconnects_total", "reason"),
        ("gateway_slow_reader_events_total", None),
        ("gateway_connections_total", None),
        ("gateway_auth_failures_total", "reason"),
        ("gateway_limit_hits_total", "limit"),
    ):
        parts = []
        for (n, lab), v in sorted(m.items()):
            if n == name and v:
                d = dict(lab)
                key = d.get(label, "") if label else ",".join(f"{k}={x}" for k, x in lab)
                parts.append(f"{key}={v:.0f}")
        rep.say(f"  {name}: " + (", ".join(parts) or "none"))
    skipped_metric = _metric(m, "gateway_records_skipped_total")
    rep.say(f"  gateway_records_skipped_total: {skipped_metric:.0f}")
    rep.say(
        f"  gateway_feed_records_in_total: {_metric(m, 'gateway_feed_records_in_total'):.0f}, "
        f"gateway_records_out_total: {_metric(m, 'gateway_records_out_total'):.0f}, "
        f"gateway_heartbeats_total: {_metric(m, 'gateway_heartbeats_total'):.0f}"
    )
    # every session gone: nothing left registered in the gateway
    left = _metric(m, "gateway_sessions")
    groups = _metric(m, "gateway_fanout_groups")
    rep.say(f"  after the run: gateway_sessions={left:.0f}, gateway_fanout_groups={groups:.0f}")
    if left or groups:
        rep.fail(f"sessions still registered after the run: sessions={left}, groups={groups}")
    logged_skipped = sum(e[1] for e in ends.values())
    if int(skipped_metric) != logged_skipped:
        rep.fail(
            f"gateway_records_skipped_total={skipped_metric:.0f} but the sessions' logged "
            f"skipped counts add up to {logged_skipped}"
        )
    cuts_logged = len(CUT_LINE.findall(log))
    cuts_metric = _metric(m, "gateway_slow_reader_events_total", event="disconnect")
    if cuts_logged != int(cuts_metric):
        rep.fail(f"{cuts_logged} 'session cut' log lines but {cuts_metric:.0f} disconnect events")
    # memory and file descriptors
    rep.say()
    rep.say("gateway RSS / fds over time (t, RSS, fds, streaming sessions):")
    step = max(1, len(run.samples) // 14)
    pts = run.samples[::step]
    rep.say(
        "  "
        + "  ".join(f"{t:.0f}s:{rss / 1024:.0f}MiB/{fds}fd/{live}s" for t, rss, fds, _, live in pts)
    )
    peak = max((x[1] for x in run.samples), default=run.rss_end)
    growth = (run.rss_end - run.rss_warm) / run.rss_warm if run.rss_warm else 0.0
    rep.say(
        f"RSS: start {_mib(run.rss_base)}, after warm-up ({cfg.warmup_s:.0f} s) "
        f"{_mib(run.rss_warm)}, peak {_mib(peak)}, end {_mib(run.rss_end)} "
        f"({growth:+.1%} vs warm-up; limit +{cfg.rss_tolerance:.0%})"
    )
    rep.say(f"fds: baseline {run.fd_base}, after warm-up {run.fd_warm}, end {run.fd_end}")
    rep.stats.update(
        rss_warm=run.rss_warm, rss_end=run.rss_end, fd_base=run.fd_base, fd_end=run.fd_end
    )
    if growth > cfg.rss_tolerance:
        rep.fail(
            f"RSS grew {growth:+.1%} from warm-up ({_mib(run.rss_warm)}) to the end "
            f"({_mib(run.rss_end)})"
        )
    if run.fd_end != run.fd_base:
        rep.fail(f"fd leak: {run.fd_end} open at the end, {run.fd_base} before any client")
    for text in run.feed_stalls:
        rep.fail(f"feed stall: {text}")
    cpu = ", ".join(f"w{w['index']}={w.get('cpu_s', 0):.0f}s" for w in run.workers)
    rep.say(f"reader CPU: {cpu}")
    # the gateway process itself
    for pattern in ("Traceback", "Exception in callback", "exception was never retrieved"):
        if pattern in log:
            i = log.index(pattern)
            rep.fail(f"gateway log contains {pattern!r}: {log[max(0, i - 300) : i + 1500]}")
    if exit_code != 0:
        rep.fail(f"gateway exited with {exit_code} on SIGTERM")
