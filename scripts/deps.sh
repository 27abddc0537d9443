#!/usr/bin/env bash
# Installs the system packages the build and the tests need, when they are missing:
# OpenSSL's headers and pkg-config (for josekit, which decrypts JWE tokens), redis-server (the
# shared-state tests start real servers), redis-cli (which joins them into a Redis Cluster), and
# Chromium with ChromeDriver (the dashboard is tested in a real headless browser).
set -euo pipefail
need=()
command -v pkg-config >/dev/null || need+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || need+=(libssl-dev)
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "missing packages: ${need[*]} (install them, or run as root)" >&2
    exit 1
  fi
fi
