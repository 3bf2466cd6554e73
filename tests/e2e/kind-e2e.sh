#!/usr/bin/env bash
# End-to-end test of CAVI on a throwaway kind cluster, in one command:
#
#   tests/e2e/kind-e2e.sh
#
# Creates its own kind cluster (deploy/kind/cluster.yaml) with its own kubeconfig
# file, builds the image and loads it into the cluster, installs the operator with
# the Helm chart into a temporary namespace, applies the three-shard example
# CaviCluster, waits for Ready, then through a port-forward to the client Service:
# PUT/GET/DELETE a key in every shard and a search fanned out to all of them. It
# deletes a shard's pod and checks the cluster serves again, deletes the
# CaviCluster and waits for its children to be garbage-collected, and deletes the
# kind cluster on exit, whatever happened.
#
# It never reads or changes your current kubectl context: every kubectl and helm
# call names the kind cluster's kubeconfig file and context.
#
# Needs docker (with a reachable engine), kind, kubectl, helm and curl. Where one
# is missing it prints "skipped: <what is missing>" and exits 0.
#
# Environment:
#   CAVI_E2E=0              skip (prints "skipped: ...")
#   CAVI_E2E_IMAGE          image to build and load (default cavi:e2e)
#   CAVI_E2E_BUILD=0        do not build; CAVI_E2E_IMAGE must exist locally
#   CAVI_E2E_KIND_IMAGE     kind node image (default: kind's own default)
#   CAVI_E2E_TIMEOUT        per-wait timeout (default 300s)
#   CAVI_E2E_KEEP=1         keep the kind cluster for debugging (prints how to reach it)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

step_no=0
step() { step_no=$((step_no + 1)); printf '\n[e2e %s] step %d: %s\n' "$(date -u +%H:%M:%S)" "$step_no" "$*"; }
log() { printf '[e2e %s]   %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf '[e2e %s] FAILED: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
if [[ "${CAVI_E2E:-}" == 0 ]]; then
  echo "skipped: kind e2e disabled by CAVI_E2E=0"
  exit 0
fi
missing=()
for tool in docker kind kubectl helm curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if command -v docker >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
  missing+=("a reachable docker engine ('docker info' failed)")
fi
if ((${#missing[@]})); then
  joined="$(printf '%s, ' "${missing[@]}")"
  echo "skipped: kind e2e needs ${joined%, }"
  exit 0
fi

# ---------------------------------------------------------------- settings
image="${CAVI_E2E_IMAGE:-cavi:e2e}"
timeout="${CAVI_E2E_TIMEOUT:-300s}"
cluster="cavi-e2e-$(date +%s)-$$"
context="kind-$cluster"
ns="cavi-e2e-$RANDOM"
release="cavi-operator"
example="$root/deploy/examples/cavicluster-3-shards.yaml"
name="trio" # metadata.name in that example
workdir="$(mktemp -d "${TMPDIR:-/tmp}/cavi-e2e.XXXXXX")"
kubeconfig="$workdir/kubeconfig"
pf_pid=""
base=""

k() { kubectl --kubeconfig "$kubeconfig" --context "$context" "$@"; }
h() { helm --kubeconfig "$kubeconfig" --kube-context "$context" "$@"; }

diagnose() {
  [[ -f "$kubeconfig" ]] || return 0
  echo "----- diagnostics (namespace $ns) -----" >&2
  k -n "$ns" get cavicluster,statefulset,pod,service,configmap,event -o wide >&2 2>&1 || true
  k -n "$ns" get cavicluster "$name" -o yaml >&2 2>&1 || true
  k -n "$ns" logs "deployment/$release" --tail=100 >&2 2>&1 || true
  for pod in $(k -n "$ns" get pods -l "app.kubernetes.io/instance=$name" -o name 2>/dev/null); do
    echo "--- $pod" >&2
    k -n "$ns" logs "$pod" --tail=50 >&2 2>&1 || true
  done
  echo "----- end of diagnostics -----" >&2
}

stop_port_forward() {
  if [[ -n "$pf_pid" ]]; then
    kill "$pf_pid" 2>/dev/null || true
    wait "$pf_pid" 2>/dev/null || true
    pf_pid=""
  fi
}

cleanup() {
  local rc=$?
  stop_port_forward
  if ((rc != 0)); then diagnose; fi
  if [[ "${CAVI_E2E_KEEP:-}" == 1 ]]; then
    log "kept kind cluster $cluster: kubectl --kubeconfig $kubeconfig --context $context -n $ns get all"
    log "delete it with: kind delete cluster --name $cluster"
  else
    step "tear down kind cluster $cluster"
    kind delete cluster --name "$cluster" --kubeconfig "$kubeconfig" >/dev/null 2>&1 || true
    rm -rf "$workdir"
  fi
  if ((rc == 0)); then echo "[e2e] PASSED"; else echo "[e2e] FAILED (exit $rc)" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until a command succeeds, up to $2 seconds.
retry() {
  local what="$1" seconds="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for: $what"
    sleep 2
  done
}

# Port-forward to the client Service on a free local port (kubectl picks it).
start_port_forward() {
  stop_port_forward
  : >"$workdir/pf.log"
  k -n "$ns" port-forward "svc/$name" ":3100" >"$workdir/pf.log" 2>&1 &
  pf_pid=$!
  local port="" deadline=$((SECONDS + 30))
  until [[ -n "$port" ]]; do
    kill -0 "$pf_pid" 2>/dev/null || die "port-forward exited: $(cat "$workdir/pf.log")"
    ((SECONDS < deadline)) || die "port-forward did not start: $(cat "$workdir/pf.log")"
    sleep 1
    port="$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) -> .*/\1/p' "$workdir/pf.log" | head -n1)"
  done
  base="http://127.0.0.1:$port"
  log "port-forward svc/$name -> $base"
}

# call METHOD PATH [BODY]: sets $code and $body.
call() {
  local method="$1" path="$2" data="${3:-}"
  local args=(-sS --max-time 15 -o "$workdir/body" -w '%{http_code}' -X "$method")
  [[ -n "$data" ]] && args+=(-H 'content-type: application/json' --data "$data")
  code="$(curl "${args[@]}" "$base$path")" || code="curl-error"
  body="$(cat "$workdir/body" 2>/dev/null || true)"
}
expect() {
  local want="$1" what="$2" want_body="${3:-}"
  [[ "$code" == "$want" ]] || die "$what: HTTP $code (wanted $want): $body"
  if [[ -n "$want_body" && "$body" != "$want_body" ]]; then
    die "$what: body $body (wanted $want_body)"
  fi
  log "ok  $what -> $code${want_body:+ $body}"
}
put() { call PUT "/kv/$1" "{\"value\":\"$2\"}"; expect 204 "PUT $1=$2"; }
get() { call GET "/kv/$1"; expect 200 "GET $1" "\"$2\""; }
gone() { call GET "/kv/$1"; expect 404 "GET $1 (absent)"; }
del() { call DELETE "/kv/$1"; expect 204 "DELETE $1"; }

# ---------------------------------------------------------------- run
step "create kind cluster $cluster (kubeconfig $kubeconfig)"
kind_args=(create cluster --name "$cluster" --config "$root/deploy/kind/cluster.yaml" --kubeconfig "$kubeconfig" --wait 120s)
[[ -n "${CAVI_E2E_KIND_IMAGE:-}" ]] && kind_args+=(--image "$CAVI_E2E_KIND_IMAGE")
kind "${kind_args[@]}"
k cluster-info

if [[ "${CAVI_E2E_BUILD:-1}" != 0 ]]; then
  step "docker build -t $image ."
  docker build -t "$image" "$root"
fi
step "kind load docker-image $image"
kind load docker-image "$image" --name "$cluster"

step "helm install $release into namespace $ns"
[[ "${image##*/}" == *:* ]] || die "CAVI_E2E_IMAGE=$image has no tag (repository:tag)"
repo="${image%:*}"
tag="${image##*:}"
h install "$release" "$root/charts/cavi-operator" \
  --namespace "$ns" --create-namespace \
  --set-string "image.repository=$repo" --set-string "image.tag=$tag" \
  --set-string "operator.logLevel=info,cavi_operator=debug" \
  --wait --timeout "$timeout"
k wait --for=condition=Established crd/caviclusters.cavi.dev --timeout="$timeout"
k -n "$ns" rollout status "deployment/$release" --timeout="$timeout"

step "operator metrics through the metrics Service"
retry "operator /metrics" 60 k get --raw "/api/v1/namespaces/$ns/services/http:$release-metrics:metrics/proxy/metrics"
log "ok  /metrics answers"

step "apply $(basename "$example") with image $image"
grep -q '^  image: cavi:dev$' "$example" || die "$example no longer sets 'image: cavi:dev'; update this script"
sed "s|^  image: cavi:dev\$|  image: $image|" "$example" | k -n "$ns" apply -f -

step "wait for cavicluster/$name Ready"
k -n "$ns" wait --for=condition=Ready "cavicluster/$name" --timeout="$timeout"
k -n "$ns" get cavicluster "$name" -o wide
[[ "$(k -n "$ns" get statefulset "$name" -o jsonpath='{.spec.replicas}')" == 3 ]] || die "StatefulSet $name does not have 3 replicas"

step "client traffic through svc/$name: every shard, then a fanned-out search"
start_port_forward
# Shard 0 owns ..h, shard 1 i..q, shard 2 r.. (the example's layout).
put apple red;  put apricot orange   # shard 0
put kiwi green; put plum purple      # shard 1
put zebra striped                    # shard 2
get apple red; get apricot orange; get kiwi green; get plum purple; get zebra striped
call GET "/search?prefix="
expect 200 "search (every shard)" '[{"key":"apple","value":"red"},{"key":"apricot","value":"orange"},{"key":"kiwi","value":"green"},{"key":"plum","value":"purple"},{"key":"zebra","value":"striped"}]'
call GET "/search?prefix=ap"
expect 200 "search prefix=ap" '[{"key":"apple","value":"red"},{"key":"apricot","value":"orange"}]'
del apricot; gone apricot
del plum; gone plum
call DELETE "/kv/never-written"; expect 204 "DELETE of a missing key"

step "delete pod $name-1 (shard 1, in-memory: its data is lost) and wait until it serves again"
stop_port_forward
k -n "$ns" delete pod "$name-1" --wait=true
retry "pod $name-1 recreated" 120 k -n "$ns" get pod "$name-1"
k -n "$ns" wait --for=condition=Ready "pod/$name-1" --timeout="$timeout"
k -n "$ns" wait --for=condition=Ready "cavicluster/$name" --timeout="$timeout"
start_port_forward
gone kiwi                      # shard 1 restarted empty
get apple red; get zebra striped   # the other shards kept theirs
put kiwi gold; get kiwi gold   # and shard 1 serves again
call GET "/search?prefix="
expect 200 "search after the restart" '[{"key":"apple","value":"red"},{"key":"kiwi","value":"gold"},{"key":"zebra","value":"striped"}]'
stop_port_forward

step "delete cavicluster/$name and wait for its children to be garbage-collected"
k -n "$ns" delete cavicluster "$name" --wait=true --timeout="$timeout"
children=("statefulset/$name" "configmap/$name-config" "service/$name" "service/$name-headless")
children_gone() { [[ -z "$(k -n "$ns" get "${children[@]}" --ignore-not-found -o name)" ]]; }
retry "${children[*]} to be deleted" 180 children_gone
log "ok  ${children[*]} deleted"

step "helm uninstall $release"
h uninstall "$release" --namespace "$ns" --wait --timeout "$timeout"
k get crd caviclusters.cavi.dev >/dev/null || die "the CRD was removed by helm uninstall although crds.keep is true"
log "ok  CRD kept (crds.keep=true)"
