#!/usr/bin/env bash
# Install the pinned real agent CLIs of versions.txt for the contract tests:
# npm packages into tests/clients/node_modules (their bin/ is what the tests put on
# PATH), PyPI packages into the active Python environment.  Idempotent: an npm set that
# is already installed at the pinned versions is left alone.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
npm_specs=()
pypi_specs=()
while read -r registry name version; do
    case "$registry" in
        ''|'#'*) continue ;;
        npm) npm_specs+=("$name@$version") ;;
        pypi) pypi_specs+=("$name==$version") ;;
        *) echo "versions.txt: unknown registry '$registry'" >&2; exit 2 ;;
    esac
done < "$here/versions.txt"

if ! command -v npm >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    else
        echo "npm not found: install Node.js 20 or newer" >&2; exit 1
    fi
fi

stamp="$here/node_modules/.pinned"
want="$(printf '%s\n' "${npm_specs[@]}")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # --prefer-offline: the npm cache (~/.npm) makes repeated CI runs cheap.
    npm install --prefix "$here" --no-save --no-audit --no-fund --prefer-offline \
        --loglevel=error "${npm_specs[@]}"
    printf '%s\n' "$want" > "$stamp"
fi
if [ "${#pypi_specs[@]}" -gt 0 ]; then
    python -m pip install -q "${pypi_specs[@]}"
fi
for exe in claude codex gemini opencode; do
    "$here/node_modules/.bin/$exe" --version >/dev/null
done
echo "agent CLIs installed in $here/node_modules/.bin"
