#!/usr/bin/env bash
# Coordinator: start the Flower 1.42 SuperLink with TLS and SuperNode authentication.
#
#   server/deploy/start-superlink.sh --certs DIR [--host 0.0.0.0] [--port 8000] [--state DIR]
#                                    [--database FILE] [--log-file FILE] [-- extra flower-superlink arguments]
#
# --certs   folder from `hemex certs` holding ca.crt, server.crt and server.key
# --host    address to listen on (default 0.0.0.0: reachable by remote sites; 127.0.0.1 for local tests)
# --port    the one HTTPS port that serves the Fleet API (SuperNodes), the Control API (`flwr`)
#           and the ServerApp runtime (default 8000, Flower's default)
# --state   folder for the SuperLink's database (state.db: registered node keys, runs) and its
#           Flower home (installed app bundles); default ./superlink-state
# --database  SQLite file of the SuperLink's state (default STATE/state.db: registered keys and
#           runs survive a restart); `:flwr-in-memory:` keeps it in memory (lost on exit)
#
# Only SuperNodes whose public key was registered with `flwr supernode register` may connect.
# The Control API (`flwr`: register keys, start runs) shares the port and has no account
# authentication in open-source Flower 1.42: expose the port to the sites' addresses only.
# App dependencies are never installed at run time: hemex must be installed in this environment.
# The script execs flower-superlink, so signals (Ctrl-C, SIGTERM from systemd) reach it directly.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "start-superlink.sh: $*" >&2; exit 2; }

certs="" host="0.0.0.0" port="8000" state="./superlink-state" database="" log_file=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --certs) certs="${2:?--certs needs a folder}"; shift 2 ;;
    --host) host="${2:?--host needs an address}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    --state) state="${2:?--state needs a folder}"; shift 2 ;;
    --database) database="${2:?--database needs a file or :flwr-in-memory:}"; shift 2 ;;
    --log-file) log_file="${2:?--log-file needs a path}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ -n "$certs" ]] || die "--certs DIR is required (create one with: hemex certs --out DIR --nodes ...)"
for file in ca.crt server.crt server.key; do
  [[ -f "$certs/$file" ]] || die "$certs/$file not found (create it with: hemex certs --out DIR --nodes ...)"
done
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got $port"

# Flower starts its runtime processes (flower-superexec, flwr-serverapp) by name: they must be
# found beside flower-superlink, i.e. in the hemex environment.
superlink="$(command -v flower-superlink)" || die "flower-superlink not found on PATH; activate the hemex environment"
export PATH="$(dirname "$superlink"):$PATH"
mkdir -p "$state"
state="$(cd "$state" && pwd)"
certs="$(cd "$certs" && pwd)"
export FLWR_HOME="$state/flwr-home"
database="${database:-$state/state.db}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

args=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.crt" --ssl-keyfile "$certs/server.key"
      --enable-supernode-auth --disable-runtime-dependency-installation
      --host "$host" --port "$port" --database "$database")
[[ -n "$log_file" ]] && args+=(--log-file "$log_file")
exec "$superlink" "${args[@]}" "$@"
