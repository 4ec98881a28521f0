"""The operations side of the gateway: what an operator reads and runs beside the data path.

- ``snapshot``: the gateway's figures at one instant, as msgspec structs (``Gateway.snapshot()``)
- ``collector``: those figures as Prometheus metrics, read at scrape time
- ``status``, ``page``, ``templates/status.html``: the status document and its HTML page
- ``http``: the operator HTTP port (/metrics, /healthz, /readyz, /status, /status.json)
- ``probe``, ``probe_cli``, ``history``: the uptime probe and its SQLite history
- ``logs``: log set-up (text or JSON lines) and the fatal-error line

Nothing here is imported by the data path (session, server, feeds, fan-out), and nothing
here imports ``gateway.app``: the gateway is seen through its snapshot.
"""
