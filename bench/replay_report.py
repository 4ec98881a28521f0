"""The ``replay`` scenario's targets and its RESULTS.md section (``bench.report`` calls these)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["replay_table", "replay_targets"]

FULL_JOURNAL = 1 << 30


def _part(results: list[dict[str, Any]], part: str) -> dict[str, Any] | None:
    for r in results:
        if r["scenario"] == "replay" and r.get("params", {}).get("part") == part:
            return r
    return None


def _target(
    name: str, measured: str, threshold: str, ratio: float | None, ok: bool | None, why: str = ""
) -> dict[str, Any]:
    return {
        "target": name,
        "measured": measured,
        "threshold": threshold,
        "ratio": None if ratio is None else round(ratio, 3),
        "status": "n/a" if ok is None else ("met" if ok else "missed"),
        "detail": why,
    }


def _missing(case: dict[str, Any] | None, full: bool) -> str:
    if case is None:
        return "replay not run"
    if case.get("status") != "ok":
        return f"replay {case.get('status')}: {case.get('reason', '')}"[:160]
    return "" if full else "not measured by --quick (make bench measures it)"


def replay_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    name = "replay: one session (sendfile) >= 80% of a bare os.sendfile of the same bytes"
    r = _part(results, "sendfile")
    full = r is not None and r.get("journal_bytes", 0) >= FULL_JOURNAL
    if r is not None and r.get("status") == "ok" and full:
        out.append(
            _target(
                name,
                f"{r['replay_median_bps'] / 1e6:,.0f} vs {r['raw_median_bps'] / 1e6:,.0f} MB/s",
                ">= 0.80x",
                r["ratio"],
                r["ratio"] >= 0.8,
            )
        )
    else:
        out.append(_target(name, "-", ">= 0.80x", None, None, _missing(r, full)))
    name = "replay: 10 replays beside 100 live sessions @ 50k rec/s: live p99 <= 1.5x"
    r = _part(results, "beside-live")
    full = r is not None and r.get("live_sessions") == 100 and r.get("replays") == 10
    if r is not None and r.get("status") == "ok" and full and r.get("live_p99_ratio"):
        # at the start: the part's own processes raise it while it runs
        load = (r.get("load_avg_1m") or [0.0])[0]
        cores = os.cpu_count() or 1
        busy = (
            f"the machine was busy (load average up to {load} on {cores} cores): a noisy comparison"
            if load > cores
            else ""
        )
        out.append(
            _target(
                name,
                f"{r['live_p99_us_beside']:,.0f} vs {r['live_p99_us_alone']:,.0f} us "
                f"(replay_step_bytes {r['chosen_step_bytes'] // 1024} KiB, "
                f"{_cap(r.get('chosen_cap_bytes_per_s', 0))}: replays "
                f"{r['replay_bytes_per_s'] / 1e6:,.0f} MB/s)",
                "<= 1.5x",
                r["live_p99_ratio"],
                r["live_p99_ratio"] <= 1.5,
                busy,
            )
        )
    else:
        out.append(_target(name, "-", "<= 1.5x", None, None, _missing(r, full)))
    name = "fanout N=100 with the journal on >= 90% of journal off"
    r = _part(results, "fanout-journal")
    full = r is not None and r.get("n") == 100
    if r is not None and r.get("status") == "ok" and full:
        out.append(
            _target(
                name,
                f"{r['median_rps_on'] / 1e6:.2f} vs {r['median_rps_off'] / 1e6:.2f} M rec/s",
                ">= 0.90x",
                r["ratio"],
                r["ratio"] >= 0.9,
            )
        )
    else:
        out.append(_target(name, "-", ">= 0.90x", None, None, _missing(r, full)))
    return out


def _nums(values: list[float | None] | None) -> str:
    return ", ".join("–" if v is None else f"{v:.2f}" for v in values or []) or "–"


def _mbs(values: list[float]) -> str:
    return ", ".join(f"{v / 1e6:,.0f}" for v in values)


def replay_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["scenario"] == "replay"]
    if not rows:
        return []
    lines = ["", "## replay: intraday replay from the journal", ""]
    for r in rows:
        part = r.get("params", {}).get("part")
        if r.get("status") != "ok":
            lines.append(f"- **{part}**: {r.get('status')}: {r.get('reason', '')[:300]}")
            continue
        ok = "loss-free" if r.get("loss_free") else "**NOT loss-free**"
        if r.get("load_avg_1m"):
            first, last = r["load_avg_1m"]
            ok += f"; load average {first} → {last}"
        if part == "sendfile":
            lines.append(
                f"- **sendfile**: one session replays the whole journal "
                f"({r['journal_bytes'] / 2**20:,.0f} MiB, {r['journal_records']:,} MBP-1 "
                f"records; start=0, ALL_SYMBOLS, no ts_out, no zstd): median "
                f"**{r['replay_median_bps'] / 1e6:,.0f} MB/s** "
                f"(runs {_mbs(r['replay_bytes_per_s'])}) "
                f"vs a bare os.sendfile loop of the same files to the same reader: median "
                f"**{r['raw_median_bps'] / 1e6:,.0f} MB/s** (runs {_mbs(r['raw_bytes_per_s'])}): "
                f"**{100 * r['ratio']:.0f} %** of the raw limit; start to REPLAY_COMPLETED "
                f"{', '.join(f'{x:.2f}' for x in r['replay_catchup_s'])} s; sender CPU s per "
                f"GiB: gateway {_nums(r.get('replay_cpu_s_per_gib'))}, raw "
                f"{_nums(r.get('raw_cpu_s_per_gib'))}; gateway counters "
                f"{r.get('replay_metrics') or '–'}; {ok}."
            )
        elif part == "filtered":
            lines.append(
                f"- **filtered**: {r['instruments']} instruments from the start of the journal "
                f"({r['journal_records']:,} records scanned, {r['records_sent'][0]:,} sent): "
                f"median **{r['scanned_median_per_s'] / 1e6:.2f} M records scanned/s** "
                f"(runs {', '.join(f'{x / 1e6:.2f}' for x in r['scanned_per_s'])}); {ok}."
            )
        elif part == "beside-live":
            alone_runs = ", ".join(f"{x:,.0f}" for x in r["live_p99_us_alone_runs"])
            lines.append(
                f"- **beside live**: {r['live_sessions']} live sessions at "
                f"{r['live_rate']:,} rec/s, p99 over every session's samples "
                f"**{r['live_p99_us_alone']:,.0f} us** alone (runs {alone_runs}; the "
                f"last-served session's p99 {r['live_probe_p99_us_alone']:,.0f} us); with "
                f"{r['replays']} replays of {r['replay_mib_each']} MiB each started with the "
                f"publisher, per replay_step_bytes (bytes one replay hands the kernel per loop "
                f"turn), medians of {r['rounds']} interleaved rounds; {ok}:"
            )
            lines += [
                "",
                "  | replay_step_bytes | replay_bytes_per_s | live p99 us (runs) | × alone | "
                "last-served p99 us | replays MB/s together (runs) | each replay s |",
                "  |---|---|---|---|---|---|---|",
            ]
            for st in r["steps"]:
                each = st["replay_each_s"]
                runs = ", ".join(f"{x:,.0f}" for x in st["live_p99_us_runs"])
                mbs = ", ".join(f"{x / 1e6:,.0f}" for x in st["replay_bytes_per_s_runs"])
                lines.append(
                    f"  | {st['replay_step_bytes'] // 1024:,} KiB | "
                    f"{_cap(st.get('replay_cap_bytes_per_s', 0))} | {st['live_p99_us']:,.0f} "
                    f"({runs}) | {st['live_p99_ratio']} | {st['live_probe_p99_us']:,.0f} | "
                    f"{st['replay_bytes_per_s'] / 1e6:,.0f} ({mbs}) | "
                    f"{min(each):.2f}–{max(each):.2f} |"
                )
            lines.append("")
        elif part == "fanout-journal":
            lines.append(
                f"- **fan-out N={r['n']} journal on vs off**: median "
                f"**{r['median_rps_on'] / 1e6:.2f}** vs **{r['median_rps_off'] / 1e6:.2f} M "
                f"rec/s** ({100 * r['ratio']:.0f} %; on: "
                f"{', '.join(f'{x / 1e6:.2f}' for x in r['throughput_rps_on'])}, off: "
                f"{', '.join(f'{x / 1e6:.2f}' for x in r['throughput_rps_off'])}); {ok}."
            )
    return lines


def _cap(rate: int) -> str:
    return f"cap {rate / 1e6:,.0f} MB/s" if rate else "no cap"
