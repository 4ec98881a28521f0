"""Helpers shared by the unit, integration, soak and transport tests (and nothing else):

* ``wire``: a raw Live client over a socket, blocking (``RawClient``) and asyncio
  (``AsyncRawClient``): handshake, subscribe, start, read records; control lines come from
  ``gateway.control`` (the one wire codec), records are cut with ``split_records``.
* ``waiting``: ``poll_until`` / ``apoll_until``, the one way tests wait for a condition.
* ``prometheus``: parse a ``/metrics`` exposition into samples and sum them by labels.

``tests.integration.helpers`` re-exports these under their old names.
"""
