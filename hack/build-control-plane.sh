#!/usr/bin/env bash
# Build the real control-plane binaries the tests run against: etcd,
# kube-apiserver, kube-controller-manager and kubectl, from the Go module proxy.
#
# No package registry ships kube-apiserver, and `go install
# k8s.io/kubernetes/cmd/...@vX` fails because k8s.io/kubernetes points its
# staging modules at ./staging through replace directives. So we write a
# throwaway module that requires k8s.io/kubernetes and replaces every staging
# module with its published v0.X.Y twin, then build from there.
#
# Output: $CLUO_CACHE/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION/
#         holding etcd, kube-apiserver, kube-controller-manager, kubectl.
# The folder is the envtest-style KUBEBUILDER_ASSETS layout. If
# KUBEBUILDER_ASSETS is set, nothing is built: it must already hold the four.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

cache=${CLUO_CACHE:-/var/cache/cluo}
out="$cache/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
binaries=(etcd kube-apiserver kube-controller-manager kubectl)

if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
    for b in "${binaries[@]}"; do
        if [ ! -x "$KUBEBUILDER_ASSETS/$b" ]; then
            echo "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no executable '$b'" >&2
            exit 1
        fi
    done
    echo "$KUBEBUILDER_ASSETS"
    exit 0
fi

complete=1
for b in "${binaries[@]}"; do [ -x "$out/$b" ] || complete=0; done
if [ "$complete" = 1 ]; then
    echo "$out"
    exit 0
fi

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
work=$(mktemp -d "${TMPDIR:-/tmp}/cluo-cp-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$out.partial"

start=$(date +%s)

# --- kube-apiserver, kube-controller-manager, kubectl -----------------------
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
staging_version="v0.${K8S_VERSION#v1.}"
mkdir -p "$work/k8s"
(
    cd "$work/k8s"
    modfile=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    {
        echo "module cluo.local/control-plane"
        echo
        echo "go 1.24.0"
        echo
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo
        echo "replace ("
        sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\t\1 => \1 '"$staging_version"'#p' "$modfile"
        echo ")"
    } > go.mod
    ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags="$ldflags -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    go mod download k8s.io/kubernetes
    for cmd in kube-apiserver kube-controller-manager kubectl; do
        echo "building $cmd $K8S_VERSION" >&2
        go build -trimpath -ldflags "$ldflags" -o "$out.partial/$cmd" "k8s.io/kubernetes/cmd/$cmd"
    done
)

# --- etcd --------------------------------------------------------------------
mkdir -p "$work/etcd"
(
    cd "$work/etcd"
    printf 'module cluo.local/etcd\n\ngo 1.24.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
    echo "building etcd $ETCD_VERSION" >&2
    go build -trimpath -ldflags "-s -w" -o "$out.partial/etcd" go.etcd.io/etcd/server/v3
)

rm -rf "$out"
mv "$out.partial" "$out"
echo "built control plane in $(( $(date +%s) - start ))s" >&2
echo "$out"
