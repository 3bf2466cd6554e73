#!/usr/bin/env bash
# The API contract, checked against live nodes: starts a two-node cluster of
# the built kvstore-api on loopback ports, runs schemathesis with every check
# against node/openapi.json (no 5xx, every answer as documented, valid input
# accepted, invalid input refused), then stops the nodes.
#
# Environment:
#   CAVI_NODE_BIN            the node binary (default: target/debug/kvstore-api)
#   CAVI_CONTRACT_EXAMPLES   examples per operation (default: 100)
#   CAVI_CONTRACT_VENV       virtualenv to use (default: <repo>/.venv-contract)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
node_bin="${CAVI_NODE_BIN:-$root/target/debug/kvstore-api}"
examples="${CAVI_CONTRACT_EXAMPLES:-100}"
venv="${CAVI_CONTRACT_VENV:-$root/.venv-contract}"
req="$root/tests/contract/requirements.txt"
python="${PYTHON:-python3}"

[[ -x "$node_bin" ]] || { echo "contract: no node binary at $node_bin (cargo build first)" >&2; exit 1; }

want="$( { cat "$req"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
stamp="$venv/.cavi-contract.stamp"
if [[ ! -x "$venv/bin/schemathesis" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "contract: installing $(basename "$req") into $venv"
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
  echo "$want" >"$stamp"
fi

work="$(mktemp -d)"
pids=()
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { "$python" "$root/scripts/free_port.py" "$work/ports"; }
p0="$(free_port)"
p1="$(free_port)"
cat >"$work/config.yaml" <<YAML
shards:
  - {id: 0, addr: "127.0.0.1:$p0", range_start: "", range_end: "m"}
  - {id: 1, addr: "127.0.0.1:$p1", range_start: "n"}
YAML
for id in 0 1; do
  RUST_LOG=error "$node_bin" "$id" "$work/config.yaml" --data-dir "$work/data" >"$work/node-$id.log" 2>&1 &
  pids+=("$!")
done
for port in "$p0" "$p1"; do
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$port/readyz" >/dev/null || { echo "contract: node on $port not ready" >&2; cat "$work"/node-*.log >&2; exit 1; }
done

status=0
(cd "$root/tests/contract" &&
  "$venv/bin/schemathesis" --config-file schemathesis.toml run "$root/node/openapi.json" \
    --url "http://127.0.0.1:$p0" --checks all --max-examples "$examples" \
    --seed "${CAVI_CONTRACT_SEED:-20261202}" --no-color) || status=$?
# A node that died (a panic) fails the run even if every answer was right.
for pid in "${pids[@]}"; do
  kill -0 "$pid" 2>/dev/null || { echo "contract: a node exited during the run" >&2; cat "$work"/node-*.log >&2; status=1; }
done
exit "$status"
