# Shared by the scripts: install what a fresh machine lacks, once.
# A fresh machine has Rust, gcc, make, perl, pkg-config, libssl-dev, python3 and node.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '==> %s\n' "$*" >&2; }

# Debian packages by name; `apt-get update` runs once, only if something is missing.
ensure_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# C libraries the build links: libopus (the mixer's codec, found by the linker as -lopus).
ensure_build_libs() {
    ensure_apt libopus-dev
    if ! pkg-config --exists opus; then
        say "libopus-dev is installed but pkg-config cannot find opus"
        exit 1
    fi
}

ensure_rust_components() {
    for component in rustfmt clippy; do
        if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
            say "adding the Rust component $component"
            rustup component add "$component"
        fi
    done
}

# Third-party clients the interop tests run (matrix-js-sdk), pinned by package-lock.json.
ensure_interop_clients() {
    local dir="$ROOT/tests/interop"
    if [ ! -d "$dir/node_modules/matrix-js-sdk" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
        say "installing matrix-js-sdk for the interop tests"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    fi
}

# The browser end-to-end tests: Debian's Chromium, `ip` for the loopback-only
# network namespace, and playwright-core (pinned by package-lock.json) to drive it.
ensure_browser_tests() {
    ensure_apt chromium iproute2
    local dir="$ROOT/tests/browser"
    if [ ! -d "$dir/node_modules/playwright-core" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
        say "installing playwright-core for the browser tests"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    fi
    if ! [ -x "${CHROMIUM_BIN:-/usr/bin/chromium}" ]; then
        say "Chromium is missing after installing it: the browser tests cannot run"
        return 1
    fi
}

# coturn's turnutils_uclient/turnutils_peer (the TURN tests) and turnserver (the
# TURN benchmark's baseline). Debian's package may start a turnserver service on
# install; the tests use ports of their own, but stop that service so it does
# not sit on 3478 or compete for the CPU.
ensure_coturn() {
    if ! command -v turnutils_uclient >/dev/null 2>&1; then
        ensure_apt coturn
        if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet coturn 2>/dev/null; then
            say "stopping the coturn service the package started"
            systemctl stop coturn || true
        fi
    fi
    command -v turnutils_uclient >/dev/null 2>&1 || { say "turnutils_uclient is still missing after installing coturn"; return 1; }
    # The TLS test makes its certificate with the openssl tool.
    command -v openssl >/dev/null 2>&1 || ensure_apt openssl
}

# Synapse, the reference homeserver, for the test of the bot attached to it:
# the pinned release from PyPI in a virtualenv under target/.
SYNAPSE_VERSION=1.163.2
ensure_synapse() {
    local venv="$ROOT/target/synapse"
    if "$venv/bin/python" -c "import sys, importlib.metadata as m; sys.exit(m.version('matrix-synapse') != '$SYNAPSE_VERSION')" 2>/dev/null; then
        return 0
    fi
    say "installing Synapse $SYNAPSE_VERSION (PyPI) for the interop tests"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian's own Python keeps venv's pip bootstrap in a separate package.
        ensure_apt python3-venv
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check "matrix-synapse==$SYNAPSE_VERSION"
    "$venv/bin/python" -c "import synapse" || { say "Synapse is still missing after installing it"; return 1; }
}
