#!/usr/bin/env bash
# Creates (once) the Python environment for a lock file and links it at <repo>/.venv.
#
# Usage: hack/venv.sh [LOCK]. LOCK defaults to requirements/dev.lock, linked at .venv; any other
# lock NAME.lock is linked at .venv-NAME (requirements/serving.lock: the serving runtime with Ray
# Serve LLM and vLLM, .venv-serving), so it never replaces the dev environment. VENV_LINK=PATH
# links it elsewhere.
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
name="$(basename "$lock" .lock)"
venv="$cache/venvs/$name-$key"
if [[ ! -f "$venv/.complete" ]]; then
  echo "[venv] creating $venv from $(basename "$lock")" >&2
  rm -rf "$venv"
  "$uv" venv --quiet --python "$python" "$venv"
  # --compile-bytecode: .pyc files are written at install time, because with
  # PYTHONDONTWRITEBYTECODE set (as in some shells and CI) every process would otherwise compile
  # its imports from source: `import vllm` went from ~35 s to a few seconds, in each of the
  # several processes that a Ray Serve LLM replica starts.
  "$uv" pip sync --quiet --compile-bytecode --python "$venv/bin/python" "$lock"
  touch "$venv/.complete"
fi
if [[ "$name" == dev ]]; then default_link="$repo/.venv"; else default_link="$repo/.venv-$name"; fi
ln -sfn "$venv" "${VENV_LINK:-$default_link}"
