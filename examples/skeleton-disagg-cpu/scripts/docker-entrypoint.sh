#!/bin/sh
# Container entry point of the backend. The TCP request plane advertises the address the
# frontend dials, and it must be an IP literal reachable from other containers: default it
# to this container's first address.
set -eu
if [ -z "${DYN_TCP_RPC_HOST:-}" ]; then
    DYN_TCP_RPC_HOST="$(hostname -i | cut -d' ' -f1)"
    export DYN_TCP_RPC_HOST
fi
exec python -m skeleton_disagg_cpu --model-path "${MODEL_PATH}" --model-name "${MODEL_NAME}" "$@"
