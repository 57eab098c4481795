#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (metadata in Cargo.toml):
#   target/debian/cachefs_<version>_<arch>.deb
# It stages what cargo-deb packs beside the binary into target/package/: the unit (for
# /usr/bin/cachefs), man pages and shell completions made by the binary itself.
# CACHEFS_BIN=path packs that binary instead of building target/release/cachefs.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi
if [ -z "${CACHEFS_BIN:-}" ]; then
    cargo build --release --locked
    CACHEFS_BIN=target/release/cachefs
fi

stage=target/package
rm -rf "$stage"
mkdir -p "$stage/man" "$stage/completions"
"$CACHEFS_BIN" manpages "$stage/man"
gzip -9n "$stage"/man/*.1
"$CACHEFS_BIN" completions bash >"$stage/completions/cachefs.bash"
"$CACHEFS_BIN" completions zsh >"$stage/completions/_cachefs"
"$CACHEFS_BIN" completions fish >"$stage/completions/cachefs.fish"
sed -e 's#/usr/local/bin/cachefs#/usr/bin/cachefs#g' \
    -e 's#/usr/local/share/doc/cachefs#/usr/share/doc/cachefs#g' \
    -e 's#^\# Install: .*#\# Installed by the cachefs package; config in /etc/cachefs/cachefs.toml.#' \
    systemd/cachefs.service >"$stage/cachefs.service"
if ! [ "$CACHEFS_BIN" -ef target/release/cachefs ]; then
    install -D -m 0755 "$CACHEFS_BIN" target/release/cachefs
fi
cargo deb --no-build --locked --strip
