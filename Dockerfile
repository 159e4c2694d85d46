# syntax=docker/dockerfile:1
# Container image of the live-migration orchestrator daemon.
#
#   docker build -t passthrough-migration-orchestrator:0.1.0 .
#   docker run --rm passthrough-migration-orchestrator:0.1.0 run     # the embedded example plan
#
# Two stages: the builder makes the orchestrator's wheel and a wheel of every
# dependency (deploy/docker/build-wheels.sh); the final stage installs them with
# no index (deploy/docker/install.sh) into /opt/orchestrator, so it carries no
# build tools.  tests/test_packaging.py runs both scripts the same way.
#
# User: the image runs as "orchestrator" (uid 10001), which is enough for the
# simulated backend.  The device backends open /dev/vfio/* and
# /dev/vhost-vdpa-*, root-owned by default: run those as root with the devices
# passed in (the Kubernetes DaemonSet in deploy/kubernetes/ runs privileged as
# root), or give the nodes to a group with udev rules and add it with
# --group-add.  See README, "Deploying".

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY orchestrator/ orchestrator/
COPY deploy/docker/build-wheels.sh /usr/local/bin/build-wheels.sh
RUN sh /usr/local/bin/build-wheels.sh /src /wheels

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="passthrough-migration-orchestrator" \
      org.opencontainers.image.description="Live migration of a VM's passthrough devices (VFIO, vhost-vdpa)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/orchestrator/bin:$PATH \
    ORCHESTRATOR_CONFIG=/etc/orchestrator/orchestrator.toml
COPY deploy/docker/install.sh deploy/docker/healthcheck.py deploy/docker/orchestrator.toml /tmp/install/
RUN --mount=type=bind,from=builder,source=/wheels,target=/tmp/wheels \
    sh /tmp/install/install.sh /tmp/wheels && rm -rf /tmp/install

# 8443: the REST API and /metrics (api.tcp); 7801: the cross-host device-state
# data channel (data.listen), which other hosts' daemons connect to.
EXPOSE 8443 7801
VOLUME ["/var/lib/orchestrator"]
# Numeric, so that runAsNonRoot can check it without the image's /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/orchestrator
# SIGTERM: refuse new migrations, let running ones finish within
# shutdown_grace_s, roll back the rest.  Give `docker stop` time for that:
# docker stop --time 90 (the grace, 30 s, plus the rollback's device calls).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["orchestrator-healthcheck"]
ENTRYPOINT ["orchestrator"]
CMD ["serve", "--config", "/etc/orchestrator/orchestrator.toml"]
