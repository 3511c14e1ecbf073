#!/bin/sh
# The worker image's entry point (RunPod, Modal, any Docker host). What the container runs comes from
# its first argument, else from ACESTEP_MODE, else `runpod`:
#
#   runpod [SDK flags]           python -m handler.platforms.runpod (the RunPod serverless worker; the
#                                runpod SDK's own flags pass through: --rp_serve_api, --test_input ...)
#   worker [worker flags]        acestep-serverless worker (--once, --exit-when-idle S, --max-jobs N ...)
#   download-models [DIR] [--with NAME ...]   the real weights from the Hugging Face hub (DIR defaults
#                                to ACESTEP_CHECKPOINT_DIR, /weights in the image)
#   migrate [--revision R]       acestep-serverless migrate (ACESTEP_DATABASE_URL)
#   serve | create-key NAME      the other acestep-serverless commands
#   anything else                exec'd as is (`bash`, `python -m ...`: Modal passes its own command)
#   -... (a flag first)          flags for the default mode, e.g. `--rp_serve_api`
#
# Before a worker mode (runpod, worker) starts, the checkpoint directory is checked (python -m
# handler.healthcheck --weights-only): without a loadable layout the container stops at once, exit 78
# (EX_CONFIG), with the reason, instead of loading nothing and failing every job. The check is skipped
# when ACESTEP_PIPELINE names another pipeline than the real one (the health check itself knows) or
# with ACESTEP_SKIP_WEIGHTS_CHECK=1 (then the worker reports the missing weights itself, e.g. as the
# RunPod job's `error`).
set -eu

EX_CONFIG=78

if [ "$#" -gt 0 ]; then
    case "$1" in
        -*) mode="${ACESTEP_MODE:-runpod}" ;;
        *) mode="$1"; shift ;;
    esac
else
    mode="${ACESTEP_MODE:-runpod}"
fi

require_weights() {
    case "${ACESTEP_SKIP_WEIGHTS_CHECK:-0}" in
        1 | true | yes) return 0 ;;
    esac
    if ! reason="$(python -m handler.healthcheck --weights-only 2>&1)"; then
        echo "acestep entrypoint: not starting '$mode': $reason" >&2
        echo "acestep entrypoint: put the checkpoints in ACESTEP_CHECKPOINT_DIR=${ACESTEP_CHECKPOINT_DIR:-<unset>}" \
            "(mount the weights volume there, fill it once with \`download-models\`, or build the image with" \
            "--build-arg BAKE_WEIGHTS=1); ACESTEP_SKIP_WEIGHTS_CHECK=1 starts anyway" >&2
        exit "$EX_CONFIG"
    fi
    echo "acestep entrypoint: $reason" >&2
}

case "$mode" in
    runpod)
        require_weights
        exec python -m handler.platforms.runpod "$@"
        ;;
    worker)
        require_weights
        exec acestep-serverless worker "$@"
        ;;
    download-models | migrate | serve | create-key)
        exec acestep-serverless "$mode" "$@"
        ;;
    *)
        exec "$mode" "$@"
        ;;
esac
