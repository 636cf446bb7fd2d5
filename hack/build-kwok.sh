#!/usr/bin/env bash
# Build KWOK (sigs.k8s.io/kwok), which plays the kubelet of the test bed's virtual nodes
# (testbed/kubelet.py), from the Go module proxy. Unlike kube-apiserver it installs with a
# plain `go install`: its go.mod has no replace directives to work around.
#
# Output: $CLUO_CACHE/kwok-$KWOK_VERSION/kwok (its path on stdout). Skipped when that
# binary is there and says it is $KWOK_VERSION. If KWOK_BINARY is set, nothing is built:
# it must be an executable kwok.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

if [ -n "${KWOK_BINARY:-}" ]; then
    if [ ! -x "$KWOK_BINARY" ]; then
        echo "KWOK_BINARY=$KWOK_BINARY is not an executable file" >&2
        exit 1
    fi
    echo "$KWOK_BINARY"
    exit 0
fi

cache=${CLUO_CACHE:-/var/cache/cluo}
out="$cache/kwok-$KWOK_VERSION"
if [ -x "$out/kwok" ] && "$out/kwok" --version 2>/dev/null | grep -q " $KWOK_VERSION "; then
    echo "$out/kwok"
    exit 0
fi

export GOTOOLCHAIN=local CGO_ENABLED=0
work=$(mktemp -d "${TMPDIR:-/tmp}/cluo-kwok-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
echo "building kwok $KWOK_VERSION" >&2
# Outside any module (the repository has none), so `go install pkg@version` resolves
# kwok's own go.mod; installed into a scratch folder first, so a failed build leaves no
# half-written binary behind.
(cd "$work" && GOBIN="$work/bin" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION")
mkdir -p "$out"
mv "$work/bin/kwok" "$out/kwok"
echo "built kwok in $(( $(date +%s) - start ))s" >&2
echo "$out/kwok"
