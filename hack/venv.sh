#!/usr/bin/env bash
# Creates (once) the Python environment for a lock file and links it at <repo>/.venv.
#
# The environment lives in the cache outside the repo, keyed by the Python version and the lock
# file's content, so every checkout on this machine (CI's fresh clones included) reuses it and a
# changed lock gets a new one. A half-built environment has no .complete marker and is rebuilt.
# The project itself is not installed into it (it is shared between checkouts): the Makefile puts
# operator/ on PYTHONPATH instead.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${TRAMONTANE_CACHE:-$HOME/.cache/tramontane}"
lock="${1:-$repo/requirements/dev.lock}"
python="${PYTHON:-python3}"
uv_version=0.13.8

if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: $python is required (Python 3.11)" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: Python 3.11 is required, $python is $("$python" --version 2>&1)" >&2
  exit 1
fi

uv_dir="$cache/tools/uv-$uv_version"
if [[ ! -x "$uv_dir/bin/uv" ]]; then
  rm -rf "$uv_dir"
  "$python" -m venv "$uv_dir"
  "$uv_dir/bin/pip" install --quiet --disable-pip-version-check "uv==$uv_version"
fi
uv="$uv_dir/bin/uv"

key="$( { "$python" --version; cat "$lock"; } | sha256sum | cut -c1-16)"
venv="$cache/venvs/$(basename "$lock" .lock)-$key"
if [[ ! -f "$venv/.complete" ]]; then
  echo "[venv] creating $venv from $(basename "$lock")" >&2
  rm -rf "$venv"
  "$uv" venv --quiet --python "$python" "$venv"
  "$uv" pip sync --quiet --python "$venv/bin/python" "$lock"
  touch "$venv/.complete"
fi
ln -sfn "$venv" "$repo/.venv"
