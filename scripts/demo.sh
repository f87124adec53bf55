#!/usr/bin/env bash
# Quick start, command 1: set up, then train the demo GPT with the spectral monitor logging to
# local TensorBoard, MLflow (sqlite) and offline W&B at once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
exec spectral-plugins demo "$@"
