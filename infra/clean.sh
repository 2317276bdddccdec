#!/usr/bin/env bash
# `make clean[-datasets|-registry]`: delete what the pipeline made, only inside this project's own
# workspace (<project>/workspace), never through a symbolic link, and never the datasets or the
# MLflow registry unless asked for by name.
#
#   clean.sh scratch [WORKSPACE]   everything in the workspace except datasets/ and mlflow/
#   clean.sh datasets              workspace/datasets (ingested datasets)
#   clean.sh registry              workspace/mlflow (runs, registered models, artifacts)
set -euo pipefail

project=$(cd "$(dirname "$0")/.." && pwd -P)
workspace="$project/workspace"
what=${1:?usage: clean.sh scratch|datasets|registry [WORKSPACE]}
asked=${2:-$workspace}

if [ "$(realpath -m "$asked")" != "$workspace" ] && [ "$asked" != "$workspace" ]; then
  echo "clean: leaving WORKSPACE=$asked alone: make clean only deletes inside $workspace" >&2
fi
if [ -L "$workspace" ]; then
  echo "clean: $workspace is a symbolic link (to $(readlink "$workspace")); not following it: clean it yourself" >&2
  exit 1
fi
[ -d "$workspace" ] || exit 0

case $what in
  scratch)
    # Entries are removed as they are: rm -rf on a link deletes the link, not what it points to.
    find "$workspace" -mindepth 1 -maxdepth 1 ! -name datasets ! -name mlflow -exec rm -rf -- {} +
    ;;
  datasets) rm -rf -- "$workspace/datasets" ;;
  registry) rm -rf -- "$workspace/mlflow" ;;
  *) echo "clean: unknown target $what (scratch, datasets or registry)" >&2; exit 2 ;;
esac
