#!/usr/bin/env bash
# Install the test OpenID Connect provider's npm dependencies (pinned by
# package-lock.json) into testing/oidc/node_modules.
#
# Idempotent: when node_modules already matches package-lock.json it returns
# at once without touching the network. Pass --force to reinstall anyway.
# Exit codes: 0 ok, 1 node/npm missing or too old, other = npm ci failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

# oidc-provider 8.x supports Node.js LTS >= 18 ("Hydrogen"); see README.md.
REQUIRED_MAJOR=18
REQUIRED_MINOR=12

if ! command -v node >/dev/null 2>&1; then
    echo "testing/oidc/setup.sh: node not found on PATH; Node.js >= ${REQUIRED_MAJOR}.${REQUIRED_MINOR} is required (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "testing/oidc/setup.sh: npm not found on PATH (Debian: apt-get install npm)" >&2
    exit 1
fi

node_version="$(node -p 'process.versions.node')"
IFS=. read -r major minor _ <<<"${node_version}"
if (( major < REQUIRED_MAJOR || (major == REQUIRED_MAJOR && minor < REQUIRED_MINOR) )); then
    echo "testing/oidc/setup.sh: Node.js ${node_version} is too old; >= ${REQUIRED_MAJOR}.${REQUIRED_MINOR} is required by oidc-provider (found $(command -v node))" >&2
    exit 1
fi

stamp=node_modules/.palisade-setup-stamp
want="$(sha256sum package-lock.json | cut -d' ' -f1) node-${major}"
if [[ "${1:-}" != "--force" && -f "${stamp}" && "$(cat "${stamp}")" == "${want}" \
      && -f node_modules/oidc-provider/package.json ]]; then
    exit 0
fi

echo "testing/oidc/setup.sh: installing npm dependencies (npm ci --omit=dev) with Node.js ${node_version}" >&2
rm -f "${stamp}"
# No dependency needs an install script; --ignore-scripts keeps it that way.
npm ci --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error >&2
echo "${want}" > "${stamp}"
