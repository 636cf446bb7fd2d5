#!/usr/bin/env bash
# Build a FleetLock client for the tests from Zincati's own FleetLock client code
# (src/fleet_lock/mod.rs of the zincati crate on crates.io), so that cluo-coord's FleetLock
# server is driven by the very code Fedora CoreOS hosts run (docs/fleetlock.md).
#
# Zincati is a binary crate with no library target, so the harness compiles Zincati's
# module from the crate's source as cargo downloaded it (a `#[path]` module), beside a
# stand-in for the one thing it takes from the rest of Zincati: an Identity with the node
# UUID and the group. Nothing of Zincati is copied into this repository.
#
# Usage: fleetlock-client BASE_URL NODE_UUID GROUP pre-reboot|steady-state
# prints one JSON line ({"ok": true} or {"status": 409, "kind": ..., "value": ...}) and
# exits 0 when the server answered yes, 1 when it answered no, 2 on a usage error.
#
# Output: $CLUO_CACHE/fleetlock-client-zincati-$ZINCATI_VERSION/fleetlock-client (its path
# on stdout). Skipped when that binary is there. If FLEETLOCK_CLIENT_BINARY is set, nothing
# is built: it must be an executable harness.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

if [ -n "${FLEETLOCK_CLIENT_BINARY:-}" ]; then
    if [ ! -x "$FLEETLOCK_CLIENT_BINARY" ]; then
        echo "FLEETLOCK_CLIENT_BINARY=$FLEETLOCK_CLIENT_BINARY is not an executable file" >&2
        exit 1
    fi
    echo "$FLEETLOCK_CLIENT_BINARY"
    exit 0
fi

cache=${CLUO_CACHE:-/var/cache/cluo}
out="$cache/fleetlock-client-zincati-$ZINCATI_VERSION"
if [ -x "$out/fleetlock-client" ]; then
    echo "$out/fleetlock-client"
    exit 0
fi

# rustup installs cargo here; a shell that did not source its profile lacks it on PATH.
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
work=$(mktemp -d "${TMPDIR:-/tmp}/cluo-fleetlock-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
echo "building a FleetLock client from zincati $ZINCATI_VERSION" >&2

# Step 1: have cargo download Zincati's source: `cargo info` fetches and unpacks the
# crate into cargo's registry folder (a dependency on it would not: cargo ignores a
# dependency with no library target).
cargo info --quiet "zincati@$ZINCATI_VERSION" >/dev/null
module=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"zincati-$ZINCATI_VERSION"/src/fleet_lock/mod.rs \
    | head -n 1)
test -f "$module"

# Step 2: the harness, with the dependency versions Zincati's Cargo.toml asks for.
mkdir -p "$work/harness/src"
cat >"$work/harness/Cargo.toml" <<TOML
[package]
name = "fleetlock-client"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
anyhow = "1.0"
futures = "0.3"
libsystemd = "0.7"
reqwest = { version = "0.12", default-features = false, features = ["json"] }
serde = { version = "1.0", features = ["derive"] }
serde_json = "1.0"
thiserror = "2.0"
tokio = { version = "1", features = ["rt"] }

[profile.release]
opt-level = 1
debug = false
TOML
cat >"$work/harness/src/main.rs" <<RUST
// Zincati's FleetLock client module, compiled as it is published.
#[allow(dead_code)]
#[path = "$module"]
mod fleet_lock;

// The part of Zincati's identity module that the FleetLock client reads.
mod identity {
    pub struct Identity {
        pub(crate) group: String,
        pub(crate) node_uuid: libsystemd::id128::Id128,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 || !["pre-reboot", "steady-state"].contains(&args[4].as_str()) {
        eprintln!("usage: fleetlock-client BASE_URL NODE_UUID GROUP pre-reboot|steady-state");
        std::process::exit(2);
    }
    let node_uuid = match libsystemd::id128::Id128::parse_str(&args[2]) {
        Ok(id) => id,
        Err(err) => {
            eprintln!("bad node UUID: {err}");
            std::process::exit(2);
        }
    };
    let identity = identity::Identity { group: args[3].clone(), node_uuid };
    let client = match fleet_lock::ClientBuilder::new(args[1].clone(), &identity).build() {
        Ok(client) => client,
        Err(err) => {
            eprintln!("cannot build the client: {err:#}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let result = runtime.block_on(async {
        if args[4] == "pre-reboot" { client.pre_reboot().await } else { client.steady_state().await }
    });
    match result {
        Ok(_) => println!("{}", serde_json::json!({"ok": true})),
        Err(err) => {
            println!("{}", serde_json::json!({
                "status": err.status_code(),
                "kind": err.error_kind(),
                "value": err.error_value(),
                "message": err.to_string(),
            }));
            std::process::exit(1);
        }
    }
}
RUST
(cd "$work/harness" && cargo build --release --quiet)
mkdir -p "$out"
mv "$work/harness/target/release/fleetlock-client" "$out/fleetlock-client"
echo "built the FleetLock client in $(( $(date +%s) - start ))s" >&2
echo "$out/fleetlock-client"
