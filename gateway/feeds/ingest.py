"""``ingest://HOST:PORT`` — a listener where one publisher writes a DBN stream.

The stream is a DBN Metadata header followed by records, exactly as a ``.dbn`` file
(uncompressed). The gateway learns symbols from the Metadata mappings and from
SymbolMappingMsg / InstrumentDefMsg records, and fans records out as they arrive, cut
at record boundaries. One publisher at a time; when it leaves (or sends garbage and is
dropped) sessions are told with a SystemMsg and the next publisher carries on.

Who may hold the slot, and for how long:

- ``allow=CIDR,CIDR`` lists the addresses that may publish (default: loopback only,
  127.0.0.0/8 and ::1). A connection from anywhere else is closed at once, logged with
  its address and counted (``refused``); sessions hear nothing of it.
- ``idle_timeout_s=N`` (default 30): a publisher that sends nothing for N seconds — one
  that never sent a byte, one stalled inside its Metadata header, one that went silent
  after some records, a half-open connection — is dropped, and sessions are told. TCP
  keepalive (probes after 10 s idle) also ends a connection whose peer has vanished.
- A second publisher that connects while the current one is live is refused (closed,
  logged, counted in ``busy``). If the current one is past the idle timeout, or has not
  completed its Metadata header within it, the newcomer replaces it.

While a lossless feed (``backpressure=1``) has stopped reading the publisher, its idle
clock does not run: the silence is the gateway's doing, not the publisher's.

``backpressure=1`` makes the feed lossless: while any session is over its write-buffer
high-water mark the gateway stops reading the publisher's socket, so TCP slows it.

What sessions are told (the feed's SystemMsg) is generic; the publisher's address and
the exact reason go to the log only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Final, cast

from gateway.dbn import DbnStreamDecoder
from gateway.errors import DbnError
from gateway.feeds.base import Feed

__all__ = [
    "DEFAULT_ALLOW",
    "DEFAULT_IDLE_TIMEOUT_S",
    "MAX_IDLE_TIMEOUT_S",
    "IngestSource",
    "Network",
    "address_allowed",
    "parse_allow",
]

log = logging.getLogger("gateway.feed")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_IDLE_TIMEOUT_S: Final = 30.0
MAX_IDLE_TIMEOUT_S: Final = 86_400.0
DEFAULT_ALLOW: Final[tuple[Network, ...]] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)
#: TCP keepalive on a publisher's socket: first probe after 10 s of silence, then every
#: 5 s; 3 unanswered probes end the connection (a vanished peer is noticed in ~25 s).
KEEPALIVE: Final = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))

_WAITING: Final = "waiting for a publisher"


def parse_allow(text: str) -> tuple[Network, ...]:
    """``10.0.0.0/8,192.168.1.7,::1`` -> networks; ValueError names the bad entry."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise ValueError(f"expected CIDR[,CIDR...], got {text!r}")
    out: list[Network] = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an address or CIDR network ({exc})") from None
    return tuple(out)


def address_allowed(host: str, allow: tuple[Network, ...]) -> bool:
    """Whether a peer address (as ``getpeername`` gives it) is inside ``allow``.

    IPv4-mapped IPv6 addresses (``::ffff:10.1.2.3``, a dual-stack listener) are checked
    as the IPv4 address they carry; a scope suffix (``fe80::1%eth0``) is ignored.
    Anything that is not an IP address is refused.
    """
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in allow)


def _set_keepalive(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in KEEPALIVE:
            opt = getattr(socket, name, None)
            if opt is not None:
                sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    except OSError as exc:  # pragma: no cover - platform without these options
        log.debug("ingest: cannot set TCP keepalive: %s", exc)


class IngestSource:
    kind = "ingest"

    def __init__(
        self,
        feed: Feed,
        host: str,
        port: int,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        allow: tuple[Network, ...] = DEFAULT_ALLOW,
        reuse_port: bool = False,
    ) -> None:
        self.feed = feed
        #: bind with SO_REUSEPORT, so a successor gateway can bind it too (hand-over)
        self.reuse_port = reuse_port
        self.host = host
        self.port = port
        self.idle_timeout_s = idle_timeout_s
        self.allow = allow
        self.server: asyncio.Server | None = None
        self.active: _Publisher | None = None
        self.publishers_seen = 0
        #: connections refused because their address is not in ``allow``
        self.refused = 0
        #: newcomers refused because a live publisher holds the slot
        self.busy = 0
        #: publishers dropped after ``idle_timeout_s`` of silence
        self.idle_drops = 0
        #: stale publishers replaced by a newcomer
        self.replaced = 0
        feed.flow_listeners.append(self._on_flow)

    def _on_flow(self, paused: bool) -> None:
        pub = self.active
        if pub is not None and pub.transport is not None and not pub.transport.is_closing():
            if paused:
                pub.transport.pause_reading()
            else:
                pub.touch()
                pub.transport.resume_reading()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Publisher(self), self.host, self.port, reuse_port=self.reuse_port or None
        )
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        self.feed.set_state(False, _WAITING, notify=False)
        log.info(
            "feed %s: ingest listening on %s:%d (allow %s; idle_timeout_s=%g)",
            self.feed.dataset,
            self.host,
            self.port,
            ",".join(str(net) for net in self.allow),
            self.idle_timeout_s,
        )

    async def stop(self) -> None:
        if self.active is not None:
            self.active.cancel_timer()
            if self.active.transport is not None:
                self.active.transport.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class _Publisher(asyncio.Protocol):
    def __init__(self, source: IngestSource) -> None:
        self.source = source
        self.transport: asyncio.Transport | None = None
        self.decoder = DbnStreamDecoder()
        self.peer = "?"
        self.live = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.connected_at = 0.0
        self.last_data = 0.0

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        else:
            self.peer = str(peer)
        src = self.source
        dataset = src.feed.dataset
        if not address_allowed(host, src.allow):
            src.refused += 1
            log.warning(
                "feed %s: refusing publisher %s: address not in the ingest allow-list (%s)",
                dataset,
                self.peer,
                ",".join(str(net) for net in src.allow),
            )
            transport.close()
            return
        loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        current = src.active
        if current is not None:
            stale = current.stale_reason(now)
            if stale is None:
                src.busy += 1
                log.warning(
                    "feed %s: refusing publisher %s: publisher %s holds the slot and is live "
                    "(last data %.1f s ago; it can be replaced after %g s of silence)",
                    dataset,
                    self.peer,
                    current.peer,
                    now - current.last_data,
                    src.idle_timeout_s,
                )
                transport.close()
                return
            src.replaced += 1
            log.warning(
                "feed %s: publisher %s replaces publisher %s (%s)",
                dataset,
                self.peer,
                current.peer,
                stale,
            )
            current.drop(f"publisher timed out; {_WAITING}")
        src.active = self
        src.publishers_seen += 1
        self.live = True
        self.connected_at = self.last_data = now
        _set_keepalive(transport)
        self._timer = loop.call_later(src.idle_timeout_s, self._check_idle)
        log.info("feed %s: publisher %s connected", dataset, self.peer)
        if src.feed.paused:
            transport.pause_reading()

    # --- the idle clock ---------------------------------------------------------------

    def touch(self) -> None:
        if self._loop is not None:
            self.last_data = self._loop.time()

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stale_reason(self, now: float) -> str | None:
        """Why a newcomer may replace this publisher, or None while it is live."""
        if self.source.feed.paused:
            return None  # the gateway stopped reading it: its silence is ours
        timeout = self.source.idle_timeout_s
        idle = now - self.last_data
        if idle >= timeout:
            return f"silent for {idle:.1f} s, idle_timeout_s={timeout:g}"
        if self.decoder.metadata is None and now - self.connected_at >= timeout:
            return f"Metadata header still incomplete after {now - self.connected_at:.1f} s"
        return None

    def _check_idle(self) -> None:
        self._timer = None
        if not self.live or self._loop is None:
            return
        now = self._loop.time()
        src = self.source
        if src.feed.paused:
            self.last_data = now
        idle = now - self.last_data
        if idle < src.idle_timeout_s:
            self._timer = self._loop.call_later(src.idle_timeout_s - idle, self._check_idle)
            return
        src.idle_drops += 1
        where = "inside its Metadata header" if self.decoder.metadata is None else "after data"
        log.warning(
            "feed %s: dropping publisher %s: silent for %.1f s %s (idle_timeout_s=%g)",
            src.feed.dataset,
            self.peer,
            idle,
            where,
            src.idle_timeout_s,
        )
        self.drop(f"publisher timed out; {_WAITING}")

    # --- the stream ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self.live:
            return
        assert self._loop is not None
        self.last_data = self._loop.time()
        feed = self.source.feed
        had_metadata = self.decoder.metadata is not None
        try:
            chunks = self.decoder.feed(data)
            if not had_metadata and self.decoder.metadata is not None:
                meta_dataset = str(self.decoder.metadata.dataset)
                if meta_dataset and meta_dataset != feed.dataset:
                    raise DbnError(
                        f"publisher Metadata is for dataset {meta_dataset}, "
                        f"this feed serves {feed.dataset}"
                    )
                feed.on_metadata(self.decoder.metadata, self.decoder.mappings)
                feed.set_state(True, "publisher connected")
            for index in chunks:
                feed.publish(index)
            if self.decoder.error is not None:
                raise self.decoder.error
        except DbnError as exc:
            feed.invalid_inputs += 1
            log.error("feed %s: publisher %s sent invalid DBN: %s", feed.dataset, self.peer, exc)
            self.drop(f"publisher sent invalid DBN; {_WAITING}")
        except Exception:
            log.exception("feed %s: publisher %s dropped: internal error", feed.dataset, self.peer)
            self.drop(f"publisher dropped (internal error); {_WAITING}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timer()
        if self.live:
            pending = self.decoder.pending
            detail = "publisher disconnected"
            if pending and self.decoder.metadata is not None:
                detail += f" mid-record ({pending} bytes of a partial record dropped)"
            elif pending:
                detail += " inside its Metadata header"
            log.warning(
                "feed %s: publisher %s disconnected (%s)",
                self.source.feed.dataset,
                self.peer,
                exc or "end of stream",
            )
            self._end(f"{detail}; {_WAITING}")

    def drop(self, detail: str) -> None:
        """End this publisher's turn (sessions are told ``detail``) and close its socket."""
        self._end(detail)
        if self.transport is not None:
            self.transport.close()

    def _end(self, detail: str) -> None:
        self.cancel_timer()
        if not self.live:
            return
        self.live = False
        src = self.source
        if src.active is self:
            src.active = None
        src.feed.set_state(False, detail)
