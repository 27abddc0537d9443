#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests (real gateway, real upstreams,
# real sockets on 127.0.0.1). Installs the system packages the tests need when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
# (later test suites add packages here, e.g. redis-server for the shared rate limiter)
if [ ${#need_packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}"
  else
    echo "missing packages: ${need_packages[*]} (install them, or run as root)" >&2
    exit 1
  fi
fi

cargo test --all-targets --locked "$@"
