"""The container's HEALTHCHECK: GET the gateway's /healthz (on its metrics port) and exit 0
on 200, 1 otherwise. The URL comes from HEALTHCHECK_URL (default
http://127.0.0.1:9313/healthz: metrics_port = 9313 in the image's config); the check runs in
the container's own network namespace, so 127.0.0.1 reaches a metrics port bound to
0.0.0.0 or 127.0.0.1 alike. Standard library only, no curl in the image."""

import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("HEALTHCHECK_URL", "http://127.0.0.1:9313/healthz")

try:
    with urllib.request.urlopen(URL, timeout=3) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except (OSError, urllib.error.URLError) as exc:
    print(f"healthcheck {URL}: {exc}", file=sys.stderr)
    sys.exit(1)
