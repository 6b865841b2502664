#!/bin/sh
# A chip node's pool: the supervisor with the node's chips as DEV_ID, unless DEV_ID is set already.
# Arguments go to `python -m supervisor` (--config FILE --router tcp://ROUTER:18100).
# BM_DEV_DIR (default /dev) is where the driver's device nodes are looked for.
set -eu
if [ -z "${DEV_ID:-}" ]; then
    DEV_ID=$(find "${BM_DEV_DIR:-/dev}" -maxdepth 1 -name 'bm-sophon[0-9]*' | sed 's|^.*/bm-sophon||' | sort -n | paste -sd, -)
    if [ -z "$DEV_ID" ]; then
        echo "worker-entrypoint: no ${BM_DEV_DIR:-/dev}/bm-sophon* on this node (is the sophon driver loaded?)" >&2
        exit 2
    fi
    export DEV_ID
fi
echo "worker-entrypoint: DEV_ID=$DEV_ID" >&2
exec python -m supervisor "$@"
