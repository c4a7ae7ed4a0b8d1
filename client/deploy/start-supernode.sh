#!/usr/bin/env bash
# Site: start a Flower 1.42 SuperNode for one hospital centre, over TLS, authenticated by its key.
#
#   client/deploy/start-supernode.sh --superlink HOST:PORT --ca ca.crt --key center1.key \
#       --center center1 --data-path /data/DATA_ROOT/center1 [--port 9094] [--state DIR]
#       [--min-aggregate-cases K] [--max-cls-scorings N] [--cache-dir DIR]
#       [-- extra flower-supernode arguments, e.g. --max-retries 5 --max-wait-time 300]
#
# --superlink  the coordinator's SuperLink (host or IP as in its certificate, and its port)
# --ca         the coordinator's CA certificate (verifies the SuperLink's TLS certificate)
# --key        this site's node private key (ECDSA SECP384R1, OpenSSH format); the coordinator
#              must have registered the matching .pub with `flwr supernode register`
# --center     this site's centre id, as named in the run config's `centers`
# --data-path  this centre's folder in the site data contract (images/, masks/, cases.csv)
# --port       local port of the SuperNode's runtime API (loopback only; default 9094); each
#              SuperNode on one machine needs its own
# --state      folder for this SuperNode's Flower home (installed app bundles); default
#              ${XDG_STATE_HOME:-~/.local/state}/hemex/supernode-<center>, outside any app folder
#              (state inside the app would be packed into the next app bundle)
# --cache-dir  where this site keeps its trained generator for reuse (node-config cache-dir);
#              default <data-path>/../.hemex-<center>/cache. It is a model of the site's patients:
#              keep it as private as the data.
# --min-aggregate-cases  this site withholds aggregates of fewer than K cases (the run's value
#              is used when larger); --max-cls-scorings: it scores at most N classifier models
#              per run (the run's value when smaller). A coordinator cannot loosen either.
#
# -- --trusted-entities FILE  (Flower's own option) run only app bundles signed by a key in FILE,
#              a YAML map of key id -> 'ssh-ed25519 ...' public key (e.g. the coordinator's
#              bundle.pub). In open-source Flower 1.42 only bundles fetched from Flower Hub carry
#              signatures: a SuperNode with this option refuses every bundle a coordinator submits
#              with `flwr run .` (tested), so hemex deployments cannot use it yet (README, Security).
#
# Scans never leave the site: the ClientApp reads --data-path locally and replies with model
# weights and aggregate metrics only. The script execs flower-supernode (signals reach it).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "start-supernode.sh: $*" >&2; exit 2; }

superlink="" ca="" key="" center="" data_path="" port="9094" state="" node_settings=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) superlink="${2:?--superlink needs HOST:PORT}"; shift 2 ;;
    --ca) ca="${2:?--ca needs a file}"; shift 2 ;;
    --key) key="${2:?--key needs a file}"; shift 2 ;;
    --center) center="${2:?--center needs a centre id}"; shift 2 ;;
    --data-path) data_path="${2:?--data-path needs a folder}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    --state) state="${2:?--state needs a folder}"; shift 2 ;;
    --cache-dir) node_settings+=" cache-dir='${2:?--cache-dir needs a folder}'"; shift 2 ;;
    --min-aggregate-cases|--max-cls-scorings)
      [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "$1 needs an integer >= 1"
      node_settings+=" ${1#--}=$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[[ -n "$superlink" && "$superlink" == *:* ]] || die "--superlink HOST:PORT is required"
[[ -f "$ca" ]] || die "--ca: CA certificate ${ca:-(missing)} not found"
[[ -f "$key" ]] || die "--key: node private key ${key:-(missing)} not found"
[[ "$center" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--center: a centre id of letters, digits, '.', '_', '-' is required"
[[ -d "$data_path" ]] || die "--data-path: ${data_path:-(missing)} is not a folder"
[[ "$data_path" != *"'"* ]] || die "--data-path may not contain a single quote"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got $port"
if [[ -n "$(find "$key" -perm /077 2>/dev/null)" ]]; then
  echo "start-supernode.sh: warning: $key is readable by other users (chmod 600 it)" >&2
fi

# Flower starts its runtime processes (flower-superexec, flwr-clientapp) by name: they must be
# found beside flower-supernode, i.e. in the hemex environment (runtime installs are off).
supernode="$(command -v flower-supernode)" || die "flower-supernode not found on PATH; activate the hemex environment"
export PATH="$(dirname "$supernode"):$PATH"
state="${state:-${XDG_STATE_HOME:-$HOME/.local/state}/hemex/supernode-$center}"
mkdir -p "$state"
export FLWR_HOME="$(cd "$state" && pwd)/flwr-home"
data_path="$(cd "$data_path" && pwd)"
ca="$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")"
key="$(cd "$(dirname "$key")" && pwd)/$(basename "$key")"

# TOML literal strings ('...'): the path is taken verbatim, backslashes included.
exec "$supernode" --superlink "$superlink" --root-certificates "$ca" --auth-supernode-private-key "$key" \
  --node-config "center='$center' data-path='$data_path'$node_settings" --host 127.0.0.1 --port "$port" "$@"
