#!/usr/bin/env bash
# System packages the local run and the tests need, installed only when missing.
# Idempotent and quiet when everything is present. Debian/Ubuntu (apt) only; elsewhere it
# prints what to install.
set -euo pipefail

need=()
command -v redis-server >/dev/null || need+=(redis-server)
# openssl CLI: the TLS tests make their certificates with it (gRPC mTLS, rediss://, the health probe).
command -v openssl >/dev/null || need+=(openssl)
# Prometheus server + promtool: the observability tests and `asyncopd run --prometheus`.
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || need+=(prometheus)

if ((${#need[@]})); then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "sysdeps: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "sysdeps: please install: ${need[*]} (or run as root on Debian/Ubuntu)" >&2
    exit 1
  fi
fi
