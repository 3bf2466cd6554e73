#!/usr/bin/env bash
# Runs every check of the project: formatting, lints, all Rust tests (unit,
# mocked API server, real node processes, the fuzz corpus), the API contract
# against live nodes (schemathesis, in its own venv), that the fuzz targets
# build, then the Kubernetes manifest, chart and monitoring checks, shellcheck
# and the kind e2e dry run (which set up their own Python venv on first use and
# need shellcheck and promtool: .ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "rustfmt"
cargo fmt --all -- --check

step "clippy (-D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi

step "API contract (schemathesis against two live nodes)"
scripts/contract.sh

step "fuzz targets compile (their corpus ran with the tests)"
cargo check --manifest-path fuzz/Cargo.toml --locked --quiet

if [ -x scripts/check-manifests.sh ]; then
  step "Kubernetes manifests, chart and CRD"
  scripts/check-manifests.sh
fi
