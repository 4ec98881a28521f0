"""Order books built from MBO records (issue 17, in progress).

``reference`` is the pure-Python book, written from Databento's documented MBO rules
(PROTOCOL.md §6.3b): the oracle the native, chunk-at-a-time builder will be tested
against. Nothing in the gateway's data path uses it yet.
"""
