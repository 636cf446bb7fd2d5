#!/usr/bin/env bash
# Build cluo-coord's container image from Containerfile with Debian's own tools and no
# container registry, as root:
#
#   IMAGE (localhost/cluo-coord:VERSION)    in podman's storage: what deploy/coordinator.yaml
#                                           names
#   OUT_DIR/cluo-coord-VERSION.oci.tar      the same image as an OCI archive
#   OUT_DIR/cluo-coord-VERSION.oci.digest   the digest of its manifest (sha256:...)
#
# The Containerfile's public bases cannot be pulled here, so this makes stand-ins from
# Debian bookworm with mmdebstrap and imports them with `podman import`:
#   builder  minbase + python3 + python3-pip (python:3.11-slim-bookworm's role)
#   runtime  distroless-like (distroless/python3-debian12's role): python3.11 and its
#            standard library, tzdata, CA certificates, base-files; no shell, no package
#            tool, no other program; /etc/passwd with nonroot (65532)
# Both are cached in CLUO_CACHE/coord-image, keyed by their package lists and the steps
# that make them (a change builds a new root beside the old one; delete the folder to
# pick up newer Debian packages). A root is made in a temporary folder and renamed into place, so a
# killed build leaves nothing half-made. The wheels cluo-coord needs (the core dependencies
# and build requirements of pyproject.toml) are downloaded with this machine's pip into
# build/coord-wheels/, inside the build context, and the build installs from there
# (PIP_NO_INDEX): containers here do not trust the machine's egress CA.
#
# Settings (environment):
#   OUT_DIR     where the archive and digest go (default: build/ in the repository)
#   VENV        the virtualenv whose pip downloads the wheels (default: .venv)
#   IMAGE_NAME  the image's name without the tag (default: localhost/cluo-coord)
#   CLUO_CACHE  the cache (default: /var/cache/cluo)
#
# Idempotent: with nothing changed it rebuilds nothing (buildah's layer cache) and prints
# one line. stdout: the archive's path.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
out=$(realpath -m "${OUT_DIR:-$root/build}")
venv=$(realpath -m "${VENV:-$root/.venv}")
cache=${CLUO_CACHE:-/var/cache/cluo}/coord-image
wheels=$root/build/coord-wheels
wheels_in_build=/src/build/coord-wheels # where COPY . /src puts them (Containerfile)
suite=bookworm
# crun fails on the VMs we test on; runc with explicit limits (the machine's hard ones)
# works for buildah and podman alike.
runtime_flags=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
base_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mmdebstrap_options=(
    # Debian's merged /usr (/bin -> usr/bin, ...), which the extract variant does not set up.
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    # No documentation or translations.
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    # The .debs stay for the customize step (it lists their files); it removes them.
    --skip=cleanup/apt/cache
)

die() { echo "build-coord-image: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap makes the bases; the image goes to root's podman storage)"
for tool in mmdebstrap:mmdebstrap podman:podman buildah:buildah runc:runc \
            unshare:util-linux flock:util-linux dpkg-deb:dpkg; do
    command -v "${tool%%:*}" >/dev/null \
        || die "${tool%%:*} is missing (Debian package ${tool#*:}; hack/install-deps.sh installs it)"
done
[ -x "$venv/bin/python" ] || die "no virtualenv at $venv (run hack/install-deps.sh)"
py=$venv/bin/python

# The version and the requirements, from pyproject.toml.
mapfile -t project < <("$py" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    data = tomllib.load(f)
print(data["project"]["version"])
for requirement in data["build-system"]["requires"] + data["project"]["dependencies"]:
    print(requirement)
PY
)
version=${project[0]}
requirements=("${project[@]:1}")
[[ "$version" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad version ${version@Q} in pyproject.toml"
image=${IMAGE_NAME:-localhost/cluo-coord}:$version
archive=$out/cluo-coord-$version.oci.tar
digest_file=$out/cluo-coord-$version.oci.digest

mkdir -p "$cache" "$out"
exec 9>"$cache/.lock"
flock -w 1800 9 || die "another build held $cache/.lock for 30 minutes"

# build_root NAME VARIANT PACKAGES [CUSTOMIZE]: print the path of a cached Debian root,
# making it first if needed; the function CUSTOMIZE, if given, finishes it (the root in $1,
# the .debs still in its apt cache). mmdebstrap's own customize hook does not run for the
# extract variant, and its extract hook runs before mmdebstrap puts back the
# start-stop-daemon it diverted, hence a step of our own after it.
build_root() {
    local name=$1 variant=$2 packages=$3 customize=${4:-} key final started building
    # The key: everything that shapes the root, this function's own steps included.
    key=$( { printf '%s\n' "$suite" "$variant" "$packages" "${mmdebstrap_options[@]}"
             declare -f build_root; [ -z "$customize" ] || declare -f "$customize"; } \
           | sha256sum | cut -c1-16)
    final=$cache/$name-$key
    if [ -d "$final" ]; then
        echo "$final"
        return
    fi
    rm -rf "$cache/.build-$name-"*  # leftovers of a killed build (we hold the lock)
    building=$(mktemp -d "$cache/.build-$name-$key.XXXXXX")
    trap 'rm -rf "$building"' EXIT  # this runs in a $(...) subshell: its own trap
    started=$(date +%s)
    # A private mount namespace: mmdebstrap mounts /dev and /proc into the root while it
    # works, and a build that dies must leave no mount behind.
    timeout 900 unshare --mount --propagation=private \
        mmdebstrap --variant="$variant" "${mmdebstrap_options[@]}" --include="$packages" \
        "$suite" "$building" >"$cache/$name.log" 2>&1 \
        || { tail -30 "$cache/$name.log" >&2; die "mmdebstrap of the $name base failed (log: $cache/$name.log)"; }
    if [ -n "$customize" ]; then
        # A bash of its own: called in a `||` list, a function would run with errexit off.
        bash -euo pipefail -c "$(declare -f "$customize"); $customize \"\$1\"" \
            "$customize" "$building" >>"$cache/$name.log" 2>&1 \
            || { tail -30 "$cache/$name.log" >&2; die "$customize failed (log: $cache/$name.log)"; }
    fi
    rm -rf "$building/var/cache/apt/archives/"*.deb
    # This machine's name and resolver, copied in by mmdebstrap, and the device nodes it
    # made: a container runtime provides its own.
    rm -f "$building/etc/hostname" "$building/etc/resolv.conf"
    find "$building/dev" -mindepth 1 -delete
    chmod 0755 "$building"
    mv "$building" "$final"
    trap - EXIT
    rm -f "$final.image"  # an import of an earlier root with this key is stale
    echo "built the $name base $final in $(($(date +%s) - started))s" >&2
    echo "$final"
}

# import_base ROOT REPOSITORY: print the tag of ROOT imported as an image, importing it
# first if needed. ROOT.image records the id of ROOT's import.
import_base() {
    local tag=$2:${1##*-}
    if [ ! -s "$1.image" ] \
        || [ "$(cat "$1.image")" != "$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null)" ]; then
        tar -C "$1" --numeric-owner -cf - . \
            | podman import --quiet --change "ENV PATH=$base_path" - "$tag" >/dev/null \
            || die "podman import of $1 as $tag failed"
        podman image inspect --format '{{.Id}}' "$tag" >"$1.image"
    fi
    echo "$tag"
}

# Finish the runtime base. Extracted packages ran no maintainer scripts, so this does what
# theirs would have (the CA bundle, python3, users, bytecode), then removes what a
# distroless image has not: the package tools that came as dependencies, file by file as
# their .debs list them, and the package managers' state.
customize_runtime() {
    local root=$1 package deb path programs
    # dpkg, tar and the libraries only they use; debconf (for maintainer scripts); mawk
    # (base-files' awk). The programs of openssl and ca-certificates go below; the
    # configuration, certificates and links stay.
    for package in dpkg tar debconf mawk libacl1 libmd0 libselinux1 libpcre2-8-0 libzstd1; do
        for deb in "$root/var/cache/apt/archives/${package}"_*.deb; do
            [ -f "$deb" ] || continue
            # tar lists directories with a trailing slash: "usr/sbin/", "usr/sbin/dpkg-divert".
            mapfile -t paths < <(dpkg-deb --fsys-tarfile "$deb" | tar -t | sed 's|^\./||')
            for path in "${paths[@]}"; do
                case $path in
                    */ | "") ;;
                    *) if [ -L "$root/$path" ] || [ -f "$root/$path" ]; then
                           rm -f "$root/$path"
                       fi ;;
                esac
            done
            while IFS= read -r path; do  # the directories left empty, deepest first
                path=${path%/}
                if [ -d "$root/$path" ] && [ ! -L "$root/$path" ]; then
                    rmdir --ignore-fail-on-non-empty "$root/$path"
                fi
            done < <(printf '%s\n' "${paths[@]}" | grep '/$' | sort -r)
        done
    done
    rm -f "$root/usr/bin/openssl" "$root/usr/bin/c_rehash" "$root/usr/sbin/update-ca-certificates"
    rm -rf "$root/etc/apt" "$root/etc/dpkg" "$root/var/lib/apt" "$root/var/cache/apt" "$root/var/lib/dpkg" \
        "$root/var/cache/debconf" "$root/var/log/"*
    programs=$(find "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" \
        "$root/usr/libexec" -mindepth 1 ! -type d ! -path "$root/usr/bin/python3.11" \
        2>/dev/null || true)
    if [ -n "$programs" ]; then
        echo "programs left besides python3.11 (a new dependency? remove it above): $programs"
        return 1
    fi
    # What the maintainer scripts would have made.
    cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
    ln -s python3.11 "$root/usr/bin/python3"
    printf '%s\n' root:x:0:0:root:/root:/sbin/nologin \
        nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin >"$root/etc/passwd"
    printf '%s\n' root:x:0: nonroot:x:65532: >"$root/etc/group"
    install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
    chmod 1777 "$root/tmp"
    # The standard library's bytecode: the image's root is read-only. (Some test data in
    # it is invalid Python on purpose, hence no status check; the imports below are one.)
    chroot "$root" /usr/bin/python3.11 -m compileall -q /usr/lib/python3.11 >/dev/null || true
    # Every extension module loads (none lost a library above), the CA bundle loads, and a
    # zone far from UTC.
    chroot "$root" /usr/bin/python3.11 -c '
import importlib, os, ssl, zoneinfo
for name in sorted(os.listdir("/usr/lib/python3.11/lib-dynload")):
    importlib.import_module(name.split(".")[0])
assert ssl.create_default_context().cert_store_stats()["x509_ca"] > 100
zoneinfo.ZoneInfo("Pacific/Kiritimati")
'
}

builder_root=$(build_root builder minbase python3,python3-pip)
runtime_root=$(build_root runtime extract \
    base-files,netbase,python3.11-minimal,libpython3.11-stdlib,tzdata,ca-certificates \
    customize_runtime)
builder=$(import_base "$builder_root" localhost/cluo-coord-builder)
runtime=$(import_base "$runtime_root" localhost/cluo-coord-runtime)

# The wheels, downloaded again only when the requirements change.
if [ "$(cat "$wheels/.requirements" 2>/dev/null)" != "$(printf '%s\n' "${requirements[@]}")" ]; then
    rm -rf "$wheels.partial"
    mkdir -p "$wheels.partial"
    "$py" -m pip download --quiet --dest "$wheels.partial" --only-binary=:all: \
        --implementation cp --python-version 3.11 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "${requirements[@]}" >"$out/coord-wheels.log" 2>&1 \
        || { cat "$out/coord-wheels.log" >&2; die "pip download of ${requirements[*]} failed"; }
    printf '%s\n' "${requirements[@]}" >"$wheels.partial/.requirements"
    rm -rf "$wheels"
    mv "$wheels.partial" "$wheels"
fi

started=$(date +%s)
before=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
iidfile=$out/.cluo-coord.iid
buildah bud --layers --pull=never "${runtime_flags[@]}" --network none \
    --build-arg BUILDER="$builder" --build-arg RUNTIME="$runtime" \
    --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS="$wheels_in_build" \
    --iidfile "$iidfile" --tag "$image" --file "$root/Containerfile" "$root" \
    >"$out/cluo-coord-build.log" 2>&1 \
    || { tail -30 "$out/cluo-coord-build.log" >&2; die "buildah bud failed (log: $out/cluo-coord-build.log)"; }
id=$(cat "$iidfile")
id=${id#sha256:}
if [ "$id" = "$before" ]; then
    built="unchanged"
else
    built="built in $(($(date +%s) - started))s"
fi

# The archive's manifest and config: an archive of this very image is kept as it is.
archived() {
    "$py" - "$1" <<'PY'
import json, sys, tarfile
try:
    with tarfile.open(sys.argv[1]) as archive:
        index = json.load(archive.extractfile("index.json"))
        manifest_digest = index["manifests"][0]["digest"]
        blob = "blobs/" + manifest_digest.replace(":", "/")
        config_digest = json.load(archive.extractfile(blob))["config"]["digest"]
except (OSError, KeyError, ValueError, tarfile.TarError):
    sys.exit(0)
print(config_digest.removeprefix("sha256:"), manifest_digest)
PY
}
read -r saved_id digest < <(archived "$archive"; echo) || true
if [ "$saved_id" = "$id" ] && [ -f "$digest_file" ]; then
    saved="unchanged"
else
    # The image must start, locked down as in the pod, before it is saved.
    status=0
    usage=$(podman run --rm "${runtime_flags[@]}" --network none --read-only \
        --read-only-tmpfs=false --cap-drop ALL --security-opt no-new-privileges \
        "$id" --help 2>&1) || status=$?
    [ "$status" = 0 ] && [[ "$usage" == *"usage: cluo-coord"* ]] \
        || die "the image does not run: podman run $image --help exited $status: $usage"
    rm -f "$archive" "$digest_file"
    podman save --quiet --format oci-archive --output "$archive.partial" "$image" \
        || die "podman save of $image failed"
    mv "$archive.partial" "$archive"
    read -r saved_id digest < <(archived "$archive"; echo) || true
    [ "$saved_id" = "$id" ] || die "$archive does not hold image $id"
    echo "$digest" >"$digest_file"
    saved="written"
fi
size=$(podman image inspect --format '{{.Size}}' "$id")
echo "cluo-coord: $image ($built), $((size / 1000000)) MB, $digest;" \
    "$archive ($saved, $(($(stat -c %s "$archive") / 1000000)) MB)" >&2
echo "$archive"
