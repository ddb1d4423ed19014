# Sourced by scripts/build-images.sh and tests/cluster/images/build.sh: build an image from a
# Dockerfile/Containerfile with whatever standard builder is here, save it as an archive that
# `docker load`, `podman load` and containerd's `ctr images import` all read (docker-archive), and
# skip both when nothing that goes into the image changed.
#
# Builder: $BUILDER if set (buildah, podman or docker), else the first of buildah, podman, docker
# (docker only when its daemon answers). With none, installs Debian's buildah: packaged,
# daemonless, runs as a plain command in CI and here, and reads Dockerfiles as they are.
#
# Archives and their cache keys: $IMAGES_DIR (default ~/.cache/bio-exporter/images, outside the
# repository), one <name>.tar and <name>.key per image.

LIB_IMAGES_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGES_DIR="${IMAGES_DIR:-${BIO_CACHE:-$HOME/.cache/bio-exporter}/images}"

img_log() { echo "images: $*" >&2; }

# Sets BUILDER.
img_pick_builder() {
  if [ -n "${BUILDER:-}" ]; then
    case "$BUILDER" in
      buildah | podman | docker) ;;
      *) img_log "BUILDER must be buildah, podman or docker, not '$BUILDER'"; return 1 ;;
    esac
    command -v "$BUILDER" >/dev/null || { img_log "BUILDER=$BUILDER is not installed"; return 1; }
    return 0
  fi
  if command -v buildah >/dev/null; then
    BUILDER=buildah
  elif command -v podman >/dev/null; then
    BUILDER=podman
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    BUILDER=docker
  else
    img_log "no image builder (buildah, podman, or docker with a daemon); installing buildah"
    "$LIB_IMAGES_ROOT/scripts/install-deps.sh" images-builder
    BUILDER=buildah
  fi
}

img_exists() { "$BUILDER" inspect --type image "$1" >/dev/null 2>&1; }
img_id() {
  local field='{{.Id}}'
  [ "$BUILDER" != buildah ] || field='{{.FromImageID}}'
  "$BUILDER" inspect --type image --format "$field" "$1" 2>/dev/null || true
}

# img_build NAME TAG CONTAINERFILE CONTEXT INPUT...
# INPUTs are the files the Containerfile copies (paths as given, relative to the current
# directory); they, the Containerfile, the context's .dockerignore, the tag and the builder make
# the cache key. Prints the archive's path on stdout.
img_build() {
  local name="$1" tag="$2" file="$3" context="$4"
  shift 4
  local archive="$IMAGES_DIR/$name.tar" keyfile="$IMAGES_DIR/$name.key" key old new f start
  mkdir -p "$IMAGES_DIR"
  for f in "$file" "$@"; do
    [ -f "$f" ] || { img_log "$name: missing $f"; return 1; }
  done
  key="$({
    printf 'tag %s\nbuilder %s\n' "$tag" "$BUILDER"
    sha256sum "$file" "$@"
    [ ! -f "$context/.dockerignore" ] || sha256sum "$context/.dockerignore"
  } | sha256sum | cut -d' ' -f1)"

  if [ -f "$archive" ] && [ "$(cat "$keyfile" 2>/dev/null)" = "$key" ] && img_exists "$tag"; then
    img_log "$tag unchanged, kept $archive"
    echo "$archive"
    return 0
  fi

  old="$(img_id "$tag")"
  start=$(date +%s)
  case "$BUILDER" in
    buildah) buildah bud --quiet -f "$file" -t "$tag" "$context" >/dev/null ;;
    *) "$BUILDER" build --quiet -f "$file" -t "$tag" "$context" >/dev/null ;;
  esac
  new="$(img_id "$tag")"
  # The previous build of this tag is now untagged: drop it (unless something still uses it).
  if [ -n "$old" ] && [ "$old" != "$new" ]; then
    "$BUILDER" rmi "$old" >/dev/null 2>&1 || true
  fi

  rm -f "$keyfile" "$archive.tmp"
  case "$BUILDER" in
    buildah) buildah push --quiet "$tag" "docker-archive:$archive.tmp:$tag" >/dev/null ;;
    podman) podman save --quiet --format docker-archive -o "$archive.tmp" "$tag" ;;
    docker) docker save -o "$archive.tmp" "$tag" ;;
  esac
  mv -f "$archive.tmp" "$archive"
  echo "$key" >"$keyfile"
  img_log "$tag built with $BUILDER in $(($(date +%s) - start)) s, saved to $archive"
  echo "$archive"
}

# img_report ARCHIVE...: one line per archive with its size.
img_report() {
  local a
  for a in "$@"; do
    printf '%s  %s\n' "$(du -h "$a" | cut -f1)" "$a"
  done
}
