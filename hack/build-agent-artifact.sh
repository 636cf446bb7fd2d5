#!/usr/bin/env bash
# Build cluo-agent's Flatcar artifact: a PyInstaller onedir bundle of cluo_host.main,
# laid out as a systemd-sysext image and packed with mksquashfs:
#
#   OUT_DIR/cluo-agent-VERSION-x86-64.raw          the extension image
#   OUT_DIR/cluo-agent-VERSION-x86-64.raw.sha512   its sha512 (`sha512sum` format)
#   OUT_DIR/SHA256SUMS                             `sha256sum` of every
#                   cluo-agent-*-x86-64.raw in OUT_DIR: Flatcar's sysext-bakery layout,
#                   the manifest systemd-sysupdate's url-file source reads
#   OUT_DIR/cluo-agent-VERSION-x86-64/             the tree it was packed from
#
# Image layout (only /usr merges; Ignition writes the unit into /etc/systemd/system):
#   usr/lib/cluo-agent/cluo-agent (+ _internal/)   the onedir bundle
#   usr/bin/cluo-agent -> ../lib/cluo-agent/cluo-agent
#   usr/lib/extension-release.d/extension-release.cluo-agent
#
# Settings (environment):
#   OUT_DIR         where the results go (default: build/ in the repository)
#   VENV            the virtualenv with cluo and PyInstaller (default: .venv)
#   SYSEXT_ID       `flatcar` (default: the release image, ID=flatcar SYSEXT_LEVEL=1.0)
#                   or `_any` (merges on any distribution)
#   ARTIFACT_VERSION  version in the file name and extension-release (default: cluo's
#                   version from pyproject.toml)
#   EXTRA_FILE      a file copied into usr/lib/cluo-agent/ (tests use it to change the
#                   image without changing the code)
#   WORK_DIR        PyInstaller's work tree, kept between builds for speed (default:
#                   OUT_DIR/pyinstaller-work)
#   SOURCE_DATE_EPOCH  time stamp of every file in the image (default: 0); warm builds
#                   of the same input give the same sha512 (cold ones may not)
#
# Built on Debian bookworm (glibc 2.36), the bundle runs on every Flatcar channel
# (glibc >= 2.38).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
# Absolute paths: PyInstaller's cache is keyed by them, so `make` and direct runs share it.
out=$(realpath -m "${OUT_DIR:-$root/build}")
venv=$(realpath -m "${VENV:-$root/.venv}")
id=${SYSEXT_ID:-flatcar}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-0}
arch=x86-64

die() { echo "build-agent-artifact: $*" >&2; exit 2; }

[ "$(uname -m)" = x86_64 ] || die "builds x86-64 images only, this machine is $(uname -m)"
[ -x "$venv/bin/python" ] || die "no virtualenv at $venv (run hack/install-deps.sh)"
"$venv/bin/python" -c 'import PyInstaller' 2>/dev/null \
    || die "PyInstaller is missing in $venv: $venv/bin/pip install -e '$root[agent,build]'"
command -v mksquashfs >/dev/null || die "mksquashfs is missing (Debian package squashfs-tools)"

version=${ARTIFACT_VERSION:-$("$venv/bin/python" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["project"]["version"])
PY
)}
[[ "$version" =~ ^[A-Za-z0-9][A-Za-z0-9._+~-]*$ ]] || die "bad version ${version@Q}"

case "$id" in
    flatcar) release=$'ID=flatcar\nSYSEXT_LEVEL=1.0\nARCHITECTURE='"$arch" ;;
    _any) release=$'ID=_any\nARCHITECTURE='"$arch" ;;
    *) die "SYSEXT_ID must be flatcar or _any, not ${id@Q}" ;;
esac
name=cluo-agent-$version-$arch
[ "$id" = flatcar ] || name=$name-$id
image=$out/$name.raw
tree=$out/$name
work=$(realpath -m "${WORK_DIR:-$out/pyinstaller-work}")
mkdir -p "$out" "$work"
# One build at a time per work tree (PyInstaller's cache and dist live there).
exec 9>"$work/.lock"
flock 9

started=$(date +%s)
# The onedir bundle. --noconfirm replaces the previous dist; the work folder (analysis
# cache) is kept between builds, which is what makes a warm build fast.
# The venv also holds the kubernetes package (a test dependency): cluo never imports it
# (.importlinter), and the excludes keep it, and urllib3 under it, out of the bundle even
# if a stray import appeared.
# multiprocessing and pkgutil are never used by the agent, but when they are in the
# bundle PyInstaller adds a runtime hook for each that imports them (and pickle, runpy,
# ...) before the agent's first line: 30 modules, 1 MB of the idle agent's RSS and some
# of its start-up time, for nothing (docs/agent.md "Footprint").
# systemd (systemd-python) is left out too: cluo_host/journal.py speaks journald's native
# protocol itself, and the package would bring libsystemd and its libraries.
# bz2 and lzma: zipfile, which PyInstaller's inspect runtime hook imports at start, loads
# them (and libbz2, liblzma) if they are there and does without them if not; the agent
# never reads such archives: 0.4 MB.
# --debug noarchive: the modules as .pyc files in _internal/ rather than in the
# zlib-compressed PYZ archive, which starts 10 to 15 % faster (no decompression; the
# files are in the squashfs image, itself compressed) and 0.2 MB smaller.
"$venv/bin/python" -m PyInstaller \
    --noconfirm --log-level WARN --onedir --name cluo-agent \
    --distpath "$work/dist" --workpath "$work/build" --specpath "$work" \
    --paths "$root" \
    --collect-submodules cluo \
    --collect-submodules cluo_host \
    --exclude-module kubernetes \
    --exclude-module urllib3 \
    --exclude-module multiprocessing \
    --exclude-module pkgutil \
    --exclude-module systemd \
    --exclude-module bz2 \
    --exclude-module lzma \
    --debug noarchive \
    "$here/cluo-agent-entry.py" >"$work/pyinstaller.log" 2>&1 \
    || { tail -40 "$work/pyinstaller.log" >&2; die "PyInstaller failed (log: $work/pyinstaller.log)"; }

rm -rf "$tree"
mkdir -p "$tree/usr/lib/cluo-agent" "$tree/usr/bin" "$tree/usr/lib/extension-release.d"
cp -a "$work/dist/cluo-agent/." "$tree/usr/lib/cluo-agent/"
ln -s ../lib/cluo-agent/cluo-agent "$tree/usr/bin/cluo-agent"
printf '%s\n' "$release" >"$tree/usr/lib/extension-release.d/extension-release.cluo-agent"
printf '%s\n' "$version" >"$tree/usr/lib/cluo-agent/VERSION"
if [ -n "${EXTRA_FILE:-}" ]; then
    [ -f "$EXTRA_FILE" ] || die "EXTRA_FILE ${EXTRA_FILE@Q} is not a file"
    cp "$EXTRA_FILE" "$tree/usr/lib/cluo-agent/"
fi
chmod -R u=rwX,go=rX "$tree"

# The bundle must start on this machine before it is packed.
"$tree/usr/lib/cluo-agent/cluo-agent" --help >/dev/null \
    || die "the bundle does not run: $tree/usr/lib/cluo-agent/cluo-agent --help failed"

rm -f "$image" "$image.sha512"
mksquashfs "$tree" "$image.tmp" -all-root -noappend -quiet -no-progress \
    -comp zstd >/dev/null  # SOURCE_DATE_EPOCH sets every time stamp
mv "$image.tmp" "$image"
(cd "$out" && sha512sum "$name.raw" >"$name.raw.sha512")
(cd "$out" && sha256sum cluo-agent-*-"$arch".raw >SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)

echo "built $image ($(du -h "$image" | cut -f1), $(($(date +%s) - started))s)" >&2
echo "$image"
