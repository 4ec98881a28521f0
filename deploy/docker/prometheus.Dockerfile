# Prometheus from Debian's package, for machines without a container registry (make
# test-swarm uses it; with a registry, the stack's default prom/prometheus image is simpler):
#     docker build -f deploy/docker/prometheus.Dockerfile -t local/prometheus:debian deploy/docker
#     PROMETHEUS_IMAGE=local/prometheus:debian docker stack deploy ...
# Same paths as the upstream image: config /etc/prometheus/prometheus.yml, data /prometheus.
ARG BASE=local/debian:bookworm
FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
RUN set -eu; \
    apt-get update -q; \
    apt-get install -y -q --no-install-recommends prometheus; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
        /var/lib/prometheus/*; \
    install -d -o prometheus -g prometheus -m 0750 /prometheus
USER prometheus
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
# no HEALTHCHECK: Debian's promtool 2.42 has no `check healthy` and the image has no HTTP
# client; Swarm restarts it if it exits
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.listen-address=:9090", "--web.console.libraries=/usr/share/prometheus/console_libraries", \
     "--web.console.templates=/usr/share/prometheus/consoles"]
