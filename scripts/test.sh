#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests (real gateway, real upstreams,
# real sockets on 127.0.0.1). Installs the system packages the tests need when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh

cargo test --all-targets --locked "$@"
