# Sourced by start.sh and scripts/*: makes sure .venv exists and holds the pinned dependencies.
# Usage: . scripts/_env.sh [runtime|dev]
# With GATEWAYZ_SKIP_INSTALL=1 (containers, platforms that install on their own) the current
# python is used as it is.

gatewayz_python() {
  local kind="${1:-runtime}" req="requirements.txt" py
  [ "$kind" = dev ] && req="requirements-dev.txt"
  if [ "${GATEWAYZ_SKIP_INSTALL:-}" = "1" ]; then
    PYTHON="$(command -v python3 || command -v python)"
    return 0
  fi
  py="$(command -v python3.11 || command -v python3 || command -v python)" || {
    echo "gatewayz: Python 3.11 or newer is required" >&2; return 1; }
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "gatewayz: Python 3.11 or newer is required (found $("$py" --version))" >&2; return 1; }
  if [ ! -x .venv/bin/python ]; then
    echo "gatewayz: creating .venv" >&2
    "$py" -m venv .venv
  fi
  local stamp=".venv/.installed-$kind" want
  want="$(cat requirements.txt "$req" | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "gatewayz: installing $req" >&2
    .venv/bin/python -m pip install --disable-pip-version-check -q -r "$req"
    echo "$want" > "$stamp"
  fi
  PYTHON=.venv/bin/python
}
