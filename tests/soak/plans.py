"""What a session slot subscribes to and how it behaves: one ``Plan`` per life, drawn
at random per slot role (healthy, stalled skip, stalled warn, late-resuming warn)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from gateway import control
from gateway.feeds.synthetic import instrument_table
from tests.soak.config import CUT_GRACE_S, UNKNOWN_SYMBOL, SoakConfig

# --- subscription plans -------------------------------------------------------------------


@dataclass
class Plan:
    kind: str  # reference | healthy | skip_stall | warn_stall
    cls: str  # report class
    schemas: tuple[str, ...]
    #: () for ALL_SYMBOLS
    symbols: tuple[str, ...] = ()
    stype: str = "raw_symbol"
    #: instrument ids the subscription resolves to; None for ALL_SYMBOLS
    iids: tuple[int, ...] | None = None
    unknown: tuple[str, ...] = ()
    behavior: str | None = "warn"
    zstd: bool = False
    ts_out: bool = False
    rcvbuf: int | None = None
    lifetime: float = 0.0
    leave: str = "drain"  # drain | close | reset
    pre: float = 0.0
    stall: float = 0.0
    post: float = 0.0
    chunked: bool = False
    pipelined: bool = False
    start_line: str = "start_session"
    keep: bool = False
    #: read every ``poll_s`` (pause_reading in between); stalled readers read continuously
    #: when not stalled, since their small SO_RCVBUF holds only a few KB per read
    poll: bool = True
    #: warn stall: resume only after the gateway's cut grace period has run out
    late: bool = False

    @property
    def all_symbols(self) -> bool:
        return not self.symbols

    @property
    def contiguous(self) -> bool:
        return self.all_symbols and set(self.schemas) == {"trades", "mbp-1"}

    def lines(self) -> bytes:
        out = []
        for sub_id, schema in enumerate(self.schemas, start=1):
            symbols = ["ALL_SYMBOLS"] if self.all_symbols else [*self.symbols, *self.unknown]
            chunks = [symbols]
            if self.chunked and len(symbols) > 1:
                half = len(symbols) // 2
                chunks = [symbols[:half], symbols[half:]]
            for n, chunk in enumerate(chunks):
                out.append(
                    control.encode_subscription(
                        schema,
                        chunk,
                        stype_in=self.stype,
                        sub_id=sub_id,
                        is_last=n == len(chunks) - 1,
                    )
                )
        out.append(self.start_line.encode() + b"\n")
        return b"".join(out)

    def record_bytes(self, rate: float) -> float:
        """Bytes per second the subscription receives at ``rate`` (ALL_SYMBOLS only)."""
        per = {"trades": 0.25 * 48, "mbp-1": 0.75 * 80}
        return rate * sum(per[s] for s in self.schemas)


def symbol_sets(instruments: int) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """A few fixed filtered subscriptions: (stype_in, symbols as sent, instrument ids)."""
    table = instrument_table(instruments)
    syms = [s for s, _ in table]
    ids = [i for _, i in table]
    n = len(table)

    def pick(idx: list[int]) -> list[int]:
        return sorted({i for i in idx if 0 <= i < n})

    top = pick([0, 1, 2])
    mid = pick(list(range(10, 20)))
    tail = pick(list(range(n // 2, n // 2 + 30)))
    by_id = pick([3, 7, 15, 31, 63])
    edge = pick([0, n - 1])
    return {
        "top3": ("raw_symbol", tuple(syms[i] for i in top), tuple(ids[i] for i in top)),
        # lower case: the gateway upper-cases raw symbols
        "mid10": ("raw_symbol", tuple(syms[i].lower() for i in mid), tuple(ids[i] for i in mid)),
        "tail30": ("raw_symbol", tuple(syms[i] for i in tail), tuple(ids[i] for i in tail)),
        "ids5": ("instrument_id", tuple(str(ids[i]) for i in by_id), tuple(ids[i] for i in by_id)),
        "edge+unknown": ("raw_symbol", tuple(syms[i] for i in edge), tuple(ids[i] for i in edge)),
    }


def reference_plan() -> Plan:
    return Plan(kind="reference", cls="reference", schemas=("trades", "mbp-1"), keep=True)


def healthy_plan(rng: random.Random, cfg: SoakConfig, remaining: float) -> Plan | None:
    if remaining < 2.5:
        return None
    life = min(rng.uniform(cfg.min_life, cfg.max_life), remaining - 1.5)
    x = rng.random()
    plan: Plan
    if x < 0.25:
        plan = Plan("healthy", "all trades+mbp-1", ("trades", "mbp-1"))
    elif x < 0.40:
        plan = Plan("healthy", "all mbp-1", ("mbp-1",))
    elif x < 0.50:
        plan = Plan("healthy", "all trades", ("trades",))
    else:
        sets = symbol_sets(cfg.instruments)
        name = rng.choice(sorted(sets))
        stype, symbols, iids = sets[name]
        schemas = rng.choice([("trades",), ("mbp-1",), ("trades", "mbp-1")])
        plan = Plan(
            "healthy",
            "filtered",
            schemas,
            symbols=symbols,
            stype=stype,
            iids=iids,
            unknown=(UNKNOWN_SYMBOL,) if name == "edge+unknown" else (),
            chunked=rng.random() < 0.5,
        )
    plan.lifetime = life
    plan.zstd = rng.random() < 0.1
    plan.ts_out = rng.random() < 0.1
    plan.leave = rng.choices(["drain", "close", "reset"], weights=[6, 2, 2])[0]
    plan.pipelined = rng.random() < 0.2
    plan.start_line = rng.choice(["start_session", "start_session=0"])
    return plan


def skip_stall_plan(rng: random.Random, cfg: SoakConfig, remaining: float) -> Plan | None:
    pre = rng.uniform(0.5, 1.5)
    stall = rng.uniform(cfg.skip_stall_min, cfg.skip_stall_max)
    post = rng.uniform(1.5, 3.0)
    if remaining < pre + stall + post + 2.0:
        return healthy_plan(rng, cfg, remaining)
    # mbp-1 only: no behaviour (the default is skip for mbp-1), skip, or the old alias drop
    behavior = rng.choice([None, None, "skip", "drop"])
    return Plan(
        "skip_stall",
        "stalled skip",
        ("mbp-1",),
        behavior=behavior,
        rcvbuf=cfg.stall_rcvbuf,
        pre=pre,
        stall=stall,
        post=post,
        leave="drain",
        poll=False,
    )


def warn_cut_seconds(plan: Plan, cfg: SoakConfig) -> float:
    """Seconds a stalled ALL_SYMBOLS session needs to go over the hard cap."""
    return (cfg.hard_cap_bytes + 2 * cfg.sndbuf) / plan.record_bytes(cfg.rate)


def warn_stall_plan(rng: random.Random, cfg: SoakConfig, remaining: float) -> Plan | None:
    # All of these are effectively ``warn``: explicit warn on mbp-1, the default with trades
    # in the mix, and skip asked for a mix that includes trades (trades never skip).
    schemas, behavior = rng.choice(
        [(("mbp-1",), "warn"), (("trades", "mbp-1"), None), (("trades", "mbp-1"), "skip")]
    )
    plan = Plan(
        "warn_stall",
        "stalled warn",
        schemas,
        behavior=behavior,
        rcvbuf=cfg.stall_rcvbuf,
        pre=rng.uniform(0.5, 1.5),
        post=rng.uniform(1.0, 2.0),
        leave="drain",
        poll=False,
    )
    cut_s = warn_cut_seconds(plan, cfg)
    # wait for the cut up to 2.5x the time it needs, within what is left of the run
    plan.stall = min(2.5 * cut_s + 3.0, remaining - plan.pre - 2.0)
    if plan.stall < 1.5 * cut_s + 1.0:
        return healthy_plan(rng, cfg, remaining)
    return plan


def late_warn_stall_plan(rng: random.Random, cfg: SoakConfig, remaining: float) -> Plan | None:
    plan = warn_stall_plan(rng, cfg, remaining - CUT_GRACE_S - 2.0)
    if plan is None or plan.kind != "warn_stall":
        return healthy_plan(rng, cfg, remaining)
    plan.late = True
    plan.cls = "stalled warn late"
    return plan


PLANNERS: dict[str, Callable[[random.Random, SoakConfig, float], Plan | None]] = {
    "healthy": healthy_plan,
    "skip_stall": skip_stall_plan,
    "warn_stall": warn_stall_plan,
    "warn_stall_late": late_warn_stall_plan,
}
