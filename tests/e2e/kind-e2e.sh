#!/usr/bin/env bash
# End-to-end test of CAVI on a throwaway kind cluster, in one command:
#
#   tests/e2e/kind-e2e.sh             run it
#   tests/e2e/kind-e2e.sh --dry-run   print every command it would run, run none
#
# Creates its own kind cluster (deploy/kind/cluster.yaml) with its own kubeconfig
# file, builds the image and loads it into the cluster, installs the operator with
# the Helm chart (values from a file in its temp dir) into a temporary namespace,
# then:
#   - the three-shard example: Ready, its children, `kubectl get cavi` columns,
#     PUT/GET/DELETE in every shard and a fanned-out search through the client
#     Service, the operator's /metrics (cavi_operator_reconciles_total) through a
#     port-forward, deletion and garbage collection of its children;
#   - a Persistent two-shard cluster without spec.image (runs the chart's image):
#     keys survive the deletion of a pod; a split to three shards and a merge back
#     to two move keys without restarting a pod and lose none; a resources edit
#     rolls the pods and loses no key; a storage size change is refused
#     (Ready=False, StorageWouldChange) and leaves the pods alone;
#   - helm upgrade with a copy of the chart whose CRD has an extra field: the
#     live CRD gets it (the CRD is a template, not in crds/), keeps the
#     helm.sh/resource-policy: keep annotation, and outlives helm uninstall.
# It deletes the kind cluster on exit, whatever happened.
#
# It never reads or changes your current kubectl context: every kubectl and helm
# call names the kind cluster's kubeconfig file and context.
#
# Needs docker (with a reachable engine), kind, kubectl, helm and curl. Where one
# is missing it prints "skipped: <what is missing>" and exits 0. --dry-run needs
# none of them: every external command goes through run(), which prints it.
#
# Environment:
#   CAVI_E2E=0              skip (prints "skipped: ..."); not for --dry-run
#   CAVI_E2E_IMAGE          image to build and load (default cavi:e2e)
#   CAVI_E2E_BUILD=0        do not build; CAVI_E2E_IMAGE must exist locally
#   CAVI_E2E_KIND_IMAGE     kind node image (default: kind's own default)
#   CAVI_E2E_TIMEOUT        per-wait timeout (default 300s)
#   CAVI_E2E_KEEP=1         keep the kind cluster for debugging (prints how to reach it)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

dry_run=0
case "${1:-}" in
  "") ;;
  --dry-run) dry_run=1 ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

# The dry run prints commands on fd 3, the script's stdout, so that commands run
# inside $(...) show too.
exec 3>&1

step_no=0
step() { step_no=$((step_no + 1)); printf '\n[e2e %s] step %d: %s\n' "$(date -u +%H:%M:%S)" "$step_no" "$*"; }
log() { printf '[e2e %s]   %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { printf '[e2e %s] FAILED: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; exit 1; }

# Shell words, quoted only where needed, so a printed command can be pasted back.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s' "${out[*]}"
}

# Every external command goes through here: run it, or in a dry run print it.
run() {
  if ((dry_run)); then
    printf '+ %s\n' "$(quote "$@")" >&3
    return 0
  fi
  "$@"
}

# ---------------------------------------------------------------- prerequisites
if ((!dry_run)); then
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
fi

# ---------------------------------------------------------------- settings
image="${CAVI_E2E_IMAGE:-cavi:e2e}"
[[ "${image##*/}" == *:* ]] || die "CAVI_E2E_IMAGE=$image has no tag (repository:tag)"
repo="${image%:*}"
tag="${image##*:}"
timeout="${CAVI_E2E_TIMEOUT:-300s}"
cluster="cavi-e2e-$(date +%s)-$$"
context="kind-$cluster"
ns="cavi-e2e-$RANDOM"
release="cavi-operator"
chart="$root/charts/cavi-operator"
example="$root/deploy/examples/cavicluster-3-shards.yaml"
name="trio"       # metadata.name in that example
durable="durable" # the Persistent cluster this script creates
workdir="$(mktemp -d "${TMPDIR:-/tmp}/cavi-e2e.XXXXXX")"
kubeconfig="$workdir/kubeconfig"
values="$workdir/values.yaml"
pf_pid=""
base=""
declare -A written=() # key -> value of every key durable must still hold

k() { run kubectl --kubeconfig "$kubeconfig" --context "$context" "$@"; }
h() { run helm --kubeconfig "$kubeconfig" --kube-context "$context" "$@"; }

diagnose() {
  [[ -f "$kubeconfig" ]] || return 0
  echo "----- diagnostics (namespace $ns) -----" >&2
  k -n "$ns" get cavicluster,statefulset,pod,service,configmap,poddisruptionbudget,pvc,event -o wide >&2 2>&1 || true
  k -n "$ns" get cavicluster -o yaml >&2 2>&1 || true
  k -n "$ns" logs "deployment/$release" --tail=100 >&2 2>&1 || true
  for pod in $(k -n "$ns" get pods -l "app.kubernetes.io/name=cavi" -o name 2>/dev/null); do
    echo "--- $pod" >&2
    k -n "$ns" logs "$pod" --tail=50 >&2 2>&1 || true
  done
  echo "----- end of diagnostics -----" >&2
}

stop_port_forward() {
  if [[ -n "$pf_pid" ]]; then
    # It may have exited already (a restarted pod ends it): nothing to check.
    kill "$pf_pid" 2>/dev/null || true
    wait "$pf_pid" 2>/dev/null || true
    pf_pid=""
  fi
}

cleanup() {
  local rc=$?
  stop_port_forward
  if ((rc != 0 && !dry_run)); then diagnose; fi
  if [[ "${CAVI_E2E_KEEP:-}" == 1 ]]; then
    log "kept kind cluster $cluster: kubectl --kubeconfig $kubeconfig --context $context -n $ns get all"
    log "delete it with: kind delete cluster --name $cluster"
  else
    step "tear down kind cluster $cluster"
    if ! run kind delete cluster --name "$cluster" --kubeconfig "$kubeconfig" >/dev/null 2>&1; then
      echo "[e2e] could not delete kind cluster $cluster: kind delete cluster --name $cluster" >&2
      ((rc != 0)) || rc=1
    fi
    rm -rf "$workdir"
  fi
  if ((dry_run)); then
    echo "[e2e] dry run: nothing was run"
  elif ((rc == 0)); then
    echo "[e2e] PASSED"
  else
    echo "[e2e] FAILED (exit $rc)" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# retry WHAT SECONDS CMD...: waits until CMD succeeds.
retry() {
  local what="$1" seconds="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for: $what"
    sleep 2
  done
  if ((dry_run)); then log "check: $what"; else log "ok  $what"; fi
}

# want VALUE WHAT CMD...: CMD succeeds and prints exactly VALUE.
want() {
  local value="$1" what="$2" got; shift 2
  got="$("$@")" || die "$what: command failed: $*"
  if ((dry_run)); then log "check: $what is '$value'"; return 0; fi
  [[ "$got" == "$value" ]] || die "$what is '$got', wanted '$value'"
  log "ok  $what is '$value'"
}

# has PATTERN WHAT CMD...: CMD succeeds and prints a line matching PATTERN (ERE).
has() {
  local pattern="$1" what="$2" got; shift 2
  got="$("$@")" || die "$what: command failed: $*"
  if ((dry_run)); then log "check: $what (a line matching /$pattern/)"; return 0; fi
  grep -Eq -- "$pattern" <<<"$got" || die "$what: no line matches /$pattern/ in: ${got:0:2000}"
  log "ok  $what"
}

# kwait WHAT ARGS...: kubectl wait in the test namespace, with the timeout.
kwait() {
  local what="$1"; shift
  k -n "$ns" wait "$@" --timeout="$timeout" || die "timed out after $timeout waiting for $what"
}

# apply_manifest: kubectl apply of the manifest on stdin (shown in a dry run).
apply_manifest() {
  if ((dry_run)); then
    k -n "$ns" apply -f -
    sed 's/^/    | /'
    return 0
  fi
  k -n "$ns" apply -f -
}

# start_port_forward TARGET PORT: port-forward on a free local port (kubectl
# picks it); sets $base.
start_port_forward() {
  local target="$1" remote="$2"
  stop_port_forward
  if ((dry_run)); then
    k -n "$ns" port-forward "$target" ":$remote"
    base="http://127.0.0.1:LOCAL_PORT"
    return 0
  fi
  : >"$workdir/pf.log"
  k -n "$ns" port-forward "$target" ":$remote" >"$workdir/pf.log" 2>&1 &
  pf_pid=$!
  local port="" deadline=$((SECONDS + 30))
  until [[ -n "$port" ]]; do
    kill -0 "$pf_pid" 2>/dev/null || die "port-forward exited: $(cat "$workdir/pf.log")"
    ((SECONDS < deadline)) || die "port-forward did not start: $(cat "$workdir/pf.log")"
    sleep 1
    port="$(sed -n 's/^Forwarding from 127\.0\.0\.1:\([0-9]*\) -> .*/\1/p' "$workdir/pf.log" | head -n1)"
  done
  base="http://127.0.0.1:$port"
  log "port-forward $target -> $base"
}

# call METHOD PATH [BODY]: sets $code and $body.
call() {
  local method="$1" path="$2" data="${3:-}"
  local args=(-sS --max-time 15 -o "$workdir/body" -w '%{http_code}' -X "$method")
  if [[ -n "$data" ]]; then args+=(-H 'content-type: application/json' --data "$data"); fi
  : >"$workdir/body"
  code="$(run curl "${args[@]}" "$base$path")" || code="curl-error"
  body="$(cat "$workdir/body")"
}
expect() {
  local want="$1" what="$2" want_body="${3:-}"
  if ((dry_run)); then log "check: $what -> $want${want_body:+ $want_body}"; return 0; fi
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

# remember KEY VALUE: PUT it and add it to the keys durable must keep.
remember() { put "$1" "$2"; written[$1]="$2"; }

# read_back WHAT: every remembered key, one by one and in one search.
read_back() {
  local key want="" sep=""
  log "reading back ${#written[@]} keys ($1)"
  for key in $(printf '%s\n' "${!written[@]}" | LC_ALL=C sort); do
    get "$key" "${written[$key]}"
    want+="$sep{\"key\":\"$key\",\"value\":\"${written[$key]}\"}"
    sep=","
  done
  call GET "/search?prefix="
  expect 200 "search of every key ($1)" "[$want]"
}

# cavi_column NAME COLUMN: what `kubectl get cavi NAME` shows in that column.
cavi_column() {
  local out
  out="$(k -n "$ns" get cavicluster "$1")" || return 1
  awk -v col="$2" 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == col) c = i; next } c { print $c }' <<<"$out"
}
cavi_header() {
  local out
  out="$(k -n "$ns" get cavicluster "$1")" || return 1
  awk 'NR == 1 { $1 = $1; print }' <<<"$out"
}

# pod_state NAME: "pod uid restarts" of every pod of cluster NAME, sorted; equal
# before and after means no pod was replaced or restarted.
pod_state() {
  local out
  out="$(k -n "$ns" get pods -l "app.kubernetes.io/instance=$1" \
    -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.uid} {.status.containerStatuses[0].restartCount}{"\n"}{end}')" || return 1
  LC_ALL=C sort <<<"$out"
}
# same_pods BEFORE NAME: every pod of BEFORE still runs, unrestarted.
same_pods() {
  local before="$1" after line
  after="$(pod_state "$2")" || die "listing the pods of $2 failed"
  if ((dry_run)); then log "check: the pods of $2 were neither replaced nor restarted"; return 0; fi
  while IFS= read -r line; do
    [[ -z "$line" ]] || grep -qxF -- "$line" <<<"$after" || die "pod replaced or restarted: was '$line', now: $after"
  done <<<"$before"
  log "ok  no pod of $2 was replaced or restarted"
}

# settle NAME: the operator has seen NAME's current spec.
settle() {
  local gen
  gen="$(k -n "$ns" get cavicluster "$1" -o jsonpath='{.metadata.generation}')" \
    || die "reading the generation of $1 failed"
  if ((dry_run)); then gen="GENERATION"; fi
  kwait "$1 to observe generation $gen" --for=jsonpath='{.status.observedGeneration}'="$gen" "cavicluster/$1"
}

# condition NAME TYPE STATUS [REASON]: NAME's condition TYPE has STATUS (and
# REASON). Read with jsonpath: `--for=condition=` also waits for the condition's
# observedGeneration to reach the current generation, which only Ready promises.
condition() {
  local jp="{.status.conditions[?(@.type==\"$2\")]"
  kwait "$1 $2=$3" --for=jsonpath="$jp.status}=$3" "cavicluster/$1"
  if [[ -n "${4:-}" ]]; then
    kwait "$1 $2 reason $4" --for=jsonpath="$jp.reason}=$4" "cavicluster/$1"
  fi
}

# live NAME: Ready=True for the current generation (Ready's observedGeneration is
# the newest generation fully live, so kubectl wait waits for the edit itself).
live() { kwait "$1 Ready with its current spec live" --for=condition=Ready "cavicluster/$1"; }

reshard() {
  local shards="$1"
  k -n "$ns" patch cavicluster "$durable" --type merge -p "{\"spec\":{\"shards\":$shards}}" \
    || die "patching the shards of $durable failed"
}

# add_crd_field FILE: adds the string property e2eUpgradeProbe to spec in the
# chart's CRD template, the change a new field of the Rust type would make.
add_crd_field() {
  local file="$1"
  awk '
    $0 == "      openAPIV3Schema:" { schema = 1 }
    schema && $0 == "          spec:" { spec = 1 }
    { print }
    spec && !done && $0 == "            properties:" {
      print "              e2eUpgradeProbe:"
      print "                description: Added by tests/e2e/kind-e2e.sh to check that helm upgrade updates the CRD."
      print "                type: string"
      done = 1
    }
    END { if (!done) exit 1 }
  ' "$file" >"$file.new" || die "$file: no spec properties to add a field to; update add_crd_field"
  mv "$file.new" "$file"
}

children_gone() {
  local out
  out="$(k -n "$ns" get "$@" --ignore-not-found -o name)" || return 1
  [[ -z "$out" ]]
}

crd_field='{.spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.e2eUpgradeProbe.type}'
crd_keep='{.metadata.annotations.helm\.sh/resource-policy}'

# ---------------------------------------------------------------- run
step "create kind cluster $cluster (kubeconfig $kubeconfig)"
kind_args=(create cluster --name "$cluster" --config "$root/deploy/kind/cluster.yaml" --kubeconfig "$kubeconfig" --wait 120s)
if [[ -n "${CAVI_E2E_KIND_IMAGE:-}" ]]; then kind_args+=(--image "$CAVI_E2E_KIND_IMAGE"); fi
run kind "${kind_args[@]}"
k cluster-info

if [[ "${CAVI_E2E_BUILD:-1}" != 0 ]]; then
  step "docker build -t $image ."
  run docker build -t "$image" "$root"
fi
step "kind load docker-image $image"
run kind load docker-image "$image" --name "$cluster"

step "helm install $release into namespace $ns (values file $values)"
# A values file rather than --set-string: Helm splits --set values at commas, and
# the log filter has one.
cat >"$values" <<EOF
image:
  repository: "$repo"
  tag: "$tag"
crds:
  install: true
  keep: true
operator:
  logLevel: "info,cavi_operator=debug"
EOF
if ((dry_run)); then sed 's/^/    | /' "$values"; fi
h install "$release" "$chart" --namespace "$ns" --create-namespace -f "$values" --wait --timeout "$timeout"
k wait --for=condition=Established crd/caviclusters.cavi.dev --timeout="$timeout"
k -n "$ns" rollout status "deployment/$release" --timeout="$timeout"
want keep "CRD annotation helm.sh/resource-policy (crds.keep=true)" k get crd caviclusters.cavi.dev -o jsonpath="$crd_keep"

step "operator metrics through the metrics Service"
retry "operator /metrics answers" 60 k get --raw "/api/v1/namespaces/$ns/services/http:$release-metrics:metrics/proxy/metrics"

step "apply $(basename "$example") with image $image"
grep -q '^  image: cavi:dev$' "$example" || die "$example no longer sets 'image: cavi:dev'; update this script"
sed "s|^  image: cavi:dev\$|  image: $image|" "$example" | apply_manifest

step "wait for cavicluster/$name Ready; its children and columns"
kwait "cavicluster/$name Ready" --for=condition=Ready "cavicluster/$name"
k -n "$ns" get cavicluster "$name" -o wide
want 3 "StatefulSet $name replicas" k -n "$ns" get statefulset "$name" -o jsonpath='{.spec.replicas}'
want "$(printf '%s\n' "configmap/$name-config" "service/$name" "service/$name-headless" "poddisruptionbudget.policy/$name")" \
  "children of $name" \
  k -n "$ns" get "configmap/$name-config" "service/$name" "service/$name-headless" "poddisruptionbudget/$name" -o name
want "NAME SHARDS READY PHASE REBALANCE STORAGE AGE" "kubectl get cavi columns" cavi_header "$name"
want 3 "kubectl get cavi $name: SHARDS" cavi_column "$name" SHARDS

step "client traffic through svc/$name: every shard, then a fanned-out search"
start_port_forward "svc/$name" 3100
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
stop_port_forward

step "operator /metrics through a port-forward: cavi_operator_reconciles_total"
start_port_forward "svc/$release-metrics" 8080
has '^cavi_operator_reconciles_total' "operator /metrics has cavi_operator_reconciles_total" \
  run curl -sS --max-time 15 --fail "$base/metrics"
stop_port_forward

step "delete cavicluster/$name and wait for its children to be garbage-collected"
k -n "$ns" delete cavicluster "$name" --wait=true --timeout="$timeout"
children=("statefulset/$name" "configmap/$name-config" "service/$name" "service/$name-headless" "poddisruptionbudget/$name")
retry "${children[*]} deleted" 180 children_gone "${children[@]}"

step "create Persistent cluster $durable (two shards, no spec.image)"
apply_manifest <<EOF
apiVersion: cavi.dev/v1alpha1
kind: CaviCluster
metadata:
  name: $durable
spec:
  shards:
    - rangeStart: "a"
      rangeEnd: "m"
    - rangeStart: "n"
      rangeEnd: "z"
  storage:
    type: Persistent
    persistent:
      size: 1Gi
EOF
settle "$durable"
live "$durable"
want "$image" "StatefulSet $durable image (the chart's, the default node image)" \
  k -n "$ns" get statefulset "$durable" -o jsonpath='{.spec.template.spec.containers[0].image}'
want "Bound Bound" "claims data-$durable-0 and data-$durable-1" \
  k -n "$ns" get pvc "data-$durable-0" "data-$durable-1" -o jsonpath='{.items[*].status.phase}'

step "persistence: write keys, delete pod $durable-1, read every key back"
start_port_forward "svc/$durable" 3100
remember apple red; remember mango yellow                             # shard 0: a..m
remember nectarine orange; remember pear green; remember sloe blue    # shard 1: n..z
remember tangerine amber; remember zucchini green                    # shard 1, later shard 2
read_back "before the pod is deleted"
stop_port_forward
k -n "$ns" delete pod "$durable-1" --wait=true
retry "pod $durable-1 recreated" 120 k -n "$ns" get pod "$durable-1"
kwait "pod/$durable-1 Ready" --for=condition=Ready "pod/$durable-1"
live "$durable"
start_port_forward "svc/$durable" 3100
read_back "after pod $durable-1 was deleted"

step "resharding: split n..z into n..s and t..z (3 shards), online"
before="$(pod_state "$durable")" || die "listing the pods of $durable failed"
reshard '[{"rangeStart":"a","rangeEnd":"m"},{"rangeStart":"n","rangeEnd":"s"},{"rangeStart":"t","rangeEnd":"z"}]'
settle "$durable"
kwait "StatefulSet $durable at 3 replicas" --for=jsonpath='{.spec.replicas}'=3 "statefulset/$durable"
kwait "$durable serving 3 shards" --for=jsonpath='{.status.shardCount}'=3 "cavicluster/$durable"
condition "$durable" Rebalancing False
live "$durable"
want 3 "kubectl get cavi $durable: SHARDS" cavi_column "$durable" SHARDS
same_pods "$before" "$durable"
read_back "after the split"
remember tomato red
read_back "a new key in the new shard"

step "resharding: merge n..s and t..z back (2 shards), online"
before="$(pod_state "$durable")" || die "listing the pods of $durable failed"
before="$(awk -v gone="$durable-2" '$1 != gone' <<<"$before")"
# Through pod 0: the Service's port-forward could be bound to pod 2, which goes.
start_port_forward "pod/$durable-0" 3100
reshard '[{"rangeStart":"a","rangeEnd":"m"},{"rangeStart":"n","rangeEnd":"z"}]'
settle "$durable"
kwait "$durable serving 2 shards" --for=jsonpath='{.status.shardCount}'=2 "cavicluster/$durable"
condition "$durable" Rebalancing False
live "$durable"
kwait "StatefulSet $durable at 2 replicas" --for=jsonpath='{.spec.replicas}'=2 "statefulset/$durable"
want 2 "StatefulSet $durable replicas" k -n "$ns" get statefulset "$durable" -o jsonpath='{.spec.replicas}'
want 2 "kubectl get cavi $durable: SHARDS" cavi_column "$durable" SHARDS
same_pods "$before" "$durable"
read_back "after the merge"
stop_port_forward

step "rollout: resources.requests.cpu of $durable to 150m, one pod at a time"
k -n "$ns" patch cavicluster "$durable" --type merge -p '{"spec":{"resources":{"requests":{"cpu":"150m"}}}}'
settle "$durable"
k -n "$ns" rollout status "statefulset/$durable" --timeout="$timeout"
condition "$durable" Progressing False RolloutComplete
live "$durable"
want "150m 150m" "cpu request of the pods of $durable" \
  k -n "$ns" get pods -l "app.kubernetes.io/instance=$durable" -o jsonpath='{.items[*].spec.containers[0].resources.requests.cpu}'
start_port_forward "svc/$durable" 3100
read_back "after the rollout"
stop_port_forward

step "refused change: storage size of running $durable to 2Gi (StorageWouldChange)"
before="$(pod_state "$durable")" || die "listing the pods of $durable failed"
k -n "$ns" patch cavicluster "$durable" --type merge -p '{"spec":{"storage":{"persistent":{"size":"2Gi"}}}}'
condition "$durable" Ready False StorageWouldChange
has . "a Warning event StorageWouldChange" \
  k -n "$ns" get events --field-selector type=Warning,reason=StorageWouldChange -o name
want 1Gi "claim template size of StatefulSet $durable" \
  k -n "$ns" get statefulset "$durable" -o jsonpath='{.spec.volumeClaimTemplates[0].spec.resources.requests.storage}'
same_pods "$before" "$durable"
k -n "$ns" patch cavicluster "$durable" --type merge -p '{"spec":{"storage":{"persistent":{"size":"1Gi"}}}}'
settle "$durable"
live "$durable"
start_port_forward "svc/$durable" 3100
read_back "after the refused change was reverted"
stop_port_forward

step "helm upgrade with a CRD that has an extra field: the live CRD follows"
chart_copy="$workdir/chart-extra-field"
rm -rf "$chart_copy"
cp -R "$chart" "$chart_copy"
add_crd_field "$chart_copy/templates/crd.yaml"
h upgrade "$release" "$chart_copy" --namespace "$ns" -f "$values" --wait --timeout "$timeout"
want string "the extra field in the live CRD" k get crd caviclusters.cavi.dev -o jsonpath="$crd_field"
want keep "CRD annotation helm.sh/resource-policy" k get crd caviclusters.cavi.dev -o jsonpath="$crd_keep"
h upgrade "$release" "$chart" --namespace "$ns" -f "$values" --wait --timeout "$timeout"
want "" "the extra field, gone again with the chart's own CRD" k get crd caviclusters.cavi.dev -o jsonpath="$crd_field"
live "$durable"

step "delete cavicluster/$durable: children go, claims stay (Retain)"
k -n "$ns" delete cavicluster "$durable" --wait=true --timeout="$timeout"
children=("statefulset/$durable" "configmap/$durable-config" "service/$durable" "service/$durable-headless" "poddisruptionbudget/$durable")
retry "${children[*]} deleted" 180 children_gone "${children[@]}"
want "data-$durable-0 data-$durable-1" "claims kept" \
  k -n "$ns" get pvc "data-$durable-0" "data-$durable-1" -o jsonpath='{.items[*].metadata.name}'

step "helm uninstall $release: the CRD stays (crds.keep=true)"
h uninstall "$release" --namespace "$ns" --wait --timeout "$timeout"
want caviclusters.cavi.dev "CRD after helm uninstall" k get crd caviclusters.cavi.dev -o jsonpath='{.metadata.name}'
