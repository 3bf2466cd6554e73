#!/usr/bin/env bash
# Validates everything CAVI ships to Kubernetes, without a cluster:
#   - renders and lints the Helm chart with Helm's own engine (helm-python-sdk),
#     including value sets that must be refused by values.schema.json;
#   - validates every rendered manifest, every file in deploy/ and the children the
#     operator renders for deploy/examples/*.yaml against the Kubernetes OpenAPI
#     schemas (kubernetes-validate --strict), custom resources against the CRD;
#   - checks that the CRD in deploy/crds and in the chart is the generated one;
#   - checks every pod template against the "restricted" Pod Security Standard;
#   - compares the RBAC with `cavi-operator rbac` and the CRD template's upgrade
#     behaviour and keep policy;
#   - checks the monitoring kit: `promtool check rules` and `promtool test rules`
#     on the alerts, the Grafana dashboard's panels and PromQL, the PodMonitor;
#   - runs shellcheck on every shell script and tests/e2e/kind-e2e.sh --dry-run;
#   - runs the kind end-to-end test (tests/e2e/kind-e2e.sh), which prints
#     "skipped: ..." and passes where docker, kind, kubectl or helm is missing.
# Needs shellcheck and promtool (Debian packages shellcheck and prometheus).
# Ends with "N passed, N failed[, N skipped]"; exits non-zero on any failure.
#
# Environment:
#   CAVI_OPERATOR_BIN  a built cavi-operator to use instead of
#                      `cargo run -q -p cavi-operator --`
#   CAVI_E2E=0         skip the kind end-to-end test even where it could run
#   CAVI_VENV          virtualenv to use (default: <repo>/.venv)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CAVI_VENV:-$root/.venv}"
req="$root/scripts/requirements-manifests.txt"
python="${PYTHON:-python3}"

# The venv is (re)provisioned only when the requirements or the interpreter change:
# the stamp holds a hash of both.
want="$( { cat "$req"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
stamp="$venv/.cavi-manifests.stamp"
if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "check-manifests: installing $(basename "$req") into $venv"
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
  echo "$want" >"$stamp"
fi

exec "$venv/bin/python" "$root/scripts/check_manifests.py" "$@"
