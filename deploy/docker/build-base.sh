#!/bin/sh
# build-base.sh: a Debian bookworm base image without a container registry.
#
#   deploy/docker/build-base.sh [TAG]        (default TAG: local/debian:bookworm)
#
# For machines that reach a Debian mirror but no container registry: debootstrap a minbase
# bookworm root file system from the Debian mirror this machine's apt already uses (the first
# `bookworm` entry of /etc/apt/sources.list and /etc/apt/sources.list.d/*.list|*.sources;
# MIRROR=URL overrides it, and deb.debian.org is the fallback), give it the same mirror (and the
# security mirror, when configured) as its apt sources, drop the package caches, and
# `docker import` it as TAG. Then: docker build --build-arg BASE=TAG ... (see deploy/README.md).
# With a registry, skip this and build FROM python:3.11-slim instead.
#
# Needs root (debootstrap) and the debootstrap package; talks to the daemon named by
# DOCKER_HOST (default: the local one). About 30 s and ~200 MB on disk while it runs; the
# temporary root file system is removed whatever happens.
set -eu

TAG=${1:-local/debian:bookworm}
SUITE=bookworm

if [ "$(id -u)" != 0 ]; then
  echo "build-base.sh: debootstrap needs root" >&2
  exit 2
fi
for tool in debootstrap docker; do
  if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
    echo "build-base.sh: $tool not found (apt-get install --no-install-recommends debootstrap docker.io)" >&2
    exit 2
  fi
done
PATH=$PATH:/usr/sbin:/sbin

# The first mirror URL the machine's apt configuration uses for SUITE (one-line .list files
# and deb822 .sources files), or the security one with SUITE-security.
configured_mirror() {
  suite=$1
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v s="$suite" '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
      if ($(i + 1) == s) { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
      { types = ""; uri = ""; ok = 0; on = 1
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^Types:/) types = line
          if (line ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", line); split(line, u, /[ \t]+/); uri = u[1] }
          if (line ~ /^Suites:/) { n = split(line, w, /[ \t]+/); for (j = 2; j <= n; j++) if (w[j] == s) ok = 1 }
          if (line ~ /^Enabled:[ \t]*no/) on = 0
        }
        if (types ~ /(^|[ \t])deb([ \t]|$)/ && ok && on && uri != "") { print uri; exit } }' "$f"
  done
}

MIRROR=${MIRROR:-$(configured_mirror "$SUITE" | head -n 1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${SECURITY_MIRROR:-$(configured_mirror "$SUITE-security" | head -n 1)}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-base.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' HUP INT PIPE TERM
ROOTFS=$WORK/rootfs

echo "build-base.sh: debootstrap --variant=minbase $SUITE from $MIRROR"
if ! debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
  tail -n 20 "$WORK/debootstrap.log" >&2
  [ -f "$ROOTFS/debootstrap/debootstrap.log" ] && tail -n 20 "$ROOTFS/debootstrap/debootstrap.log" >&2
  echo "build-base.sh: debootstrap failed" >&2
  exit 1
fi

# apt inside the image uses the same mirrors as this machine
{
  echo "deb $MIRROR $SUITE main"
  echo "deb $MIRROR $SUITE-updates main"
  if [ -n "$SECURITY" ]; then
    echo "deb $SECURITY $SUITE-security main"
  fi
} >"$ROOTFS/etc/apt/sources.list"
# smaller and reproducible: no package caches, no lists, no logs, no machine-id
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/*
: >"$ROOTFS/etc/machine-id"
# no documentation, manual pages or translations in the image, now or from later apt-get installs
# (the copyright files stay)
rm -rf "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
  "$ROOTFS"/usr/share/locale/* "$ROOTFS"/usr/share/lintian
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
# never start services inside the image (apt-get install of a daemon in a Dockerfile)
printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"

echo "build-base.sh: docker import as $TAG"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase $SUITE $MIRROR" - "$TAG"
docker image inspect --format "build-base.sh: $TAG {{.Id}} {{.Size}} bytes" "$TAG"
