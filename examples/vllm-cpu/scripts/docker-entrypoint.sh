#!/bin/sh
# Container entry point of the backend. The TCP request plane and the ZMQ event plane
# advertise (and bind) the address the frontend dials, and it must be an IP literal
# reachable from other containers: default both to this container's first address.
set -eu
if [ -z "${DYN_TCP_RPC_HOST:-}" ]; then
    DYN_TCP_RPC_HOST="$(hostname -i | cut -d' ' -f1)"
    export DYN_TCP_RPC_HOST
fi
if [ -z "${DYN_EVENT_PLANE_HOST:-}" ]; then
    DYN_EVENT_PLANE_HOST="$(hostname -i | cut -d' ' -f1)"
    export DYN_EVENT_PLANE_HOST
fi
exec python -m vllm_cpu_backend --model-path "${MODEL_PATH}" --model-name "${MODEL_NAME}" "$@"
