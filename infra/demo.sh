#!/usr/bin/env bash
# `make demo`: start a local Prefect server (if none answers), serve the train-food deployment,
# run it on the bundled sample with --watch while showing its epoch lines, print where to look, and stop what this script started.
set -euo pipefail

BIN=${BIN:-.venv/bin}
WORKSPACE=${WORKSPACE:-$PWD/workspace}
PORT=${PREFECT_PORT:-4200}
EPOCHS=${EPOCHS:-6}
export PREFECT_HOME="$WORKSPACE/prefect"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_UI_URL="http://127.0.0.1:$PORT"
mkdir -p "$PREFECT_HOME" "$WORKSPACE/logs"

started=()
cleanup() {
  for pid in "${started[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

healthy() {
  "$BIN/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$PREFECT_API_URL/health" >/dev/null 2>&1
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq "$seconds"); do "$@" && return 0; sleep 1; done
  echo "demo: $what did not come up within ${seconds}s; see $WORKSPACE/logs" >&2
  exit 1
}

if healthy; then
  echo "demo: using the Prefect server already running at $PREFECT_UI_URL"
else
  echo "demo: starting a Prefect server at $PREFECT_UI_URL (log: $WORKSPACE/logs/prefect-server.log)"
  "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$WORKSPACE/logs/prefect-server.log" 2>&1 &
  started+=($!)
  wait_for 90 "the Prefect server" healthy
fi

echo "demo: serving the deployment train-food/train-food (log: $WORKSPACE/logs/serve.log)"
"$BIN/train-food" deploy >"$WORKSPACE/logs/serve.log" 2>&1 &
started+=($!)
deployed() { "$BIN/prefect" deployment inspect train-food/train-food >/dev/null 2>&1; }
wait_for 90 "the deployment" deployed

# The flow runs in the deployment's process, whose output goes to serve.log: follow its task-run lines
# (the ingest summary, one line per epoch, each stage's end) here while --watch waits.
tail -n0 -F "$WORKSPACE/logs/serve.log" 2>/dev/null > >(grep --line-buffered -F "| Task run '") &
started+=($!)

# --watch also streams every Prefect event (each artifact update among them): those go to a log file.
echo "demo: running the flow; its progress bars are the run's artifacts at $PREFECT_UI_URL"
if ! "$BIN/prefect" deployment run train-food/train-food --watch \
  -p workspace="$WORKSPACE" -p epochs="$EPOCHS" -p image_size=144 -p workers=1 -p cpus_per_worker=2 -p sweep=false \
  >"$WORKSPACE/logs/watch.log" 2>&1; then
  tail -n 20 "$WORKSPACE/logs/watch.log" >&2
  echo "demo: the flow run failed; see $WORKSPACE/logs/serve.log" >&2
  exit 1
fi
grep -E "^Flow run finished" "$WORKSPACE/logs/watch.log" || true
echo
cat "$WORKSPACE/latest_summary.txt"
echo
echo "demo: finished. The same summary is the flow run's 'train-food-summary' artifact:"
echo "  Prefect UI: $PREFECT_UI_URL  (PREFECT_HOME=$PREFECT_HOME; start it again with"
echo "              PREFECT_HOME=$PREFECT_HOME $BIN/prefect server start --host 127.0.0.1)"
echo "  MLflow UI:  $BIN/mlflow ui --backend-store-uri sqlite:///$WORKSPACE/mlflow/mlflow.db --host 127.0.0.1"
echo "  predict:    $BIN/train-food predict --workspace $WORKSPACE data/food-sample/test/baklava/*.jpg | head"
