#!/usr/bin/env bash
# Installs what is needed, then runs the agent in the foreground:
#   scripts/serve.sh [node-agent serve args...]
# It listens on 127.0.0.1:7070 by default and prints where its token is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/install.sh"
exec "$ROOT/.venv/bin/node-agent" serve "$@"
