# Shared by benches/methods.sh and benches/e2e.sh: every merge method with typical
# parameters, and the config that merges a set's ft1..ft3 onto its base with one of them.
#
# Each spec is METHOD|PARAMETERS-PER-MODEL|TOP-LEVEL-PARAMETERS.
METHOD_SPECS=(
  "model_stock||" "linear||weight: 0.25" "task_arithmetic|weight: 0.3|"
  "ties|weight: 0.5, density: 0.5|" "dare_ties|weight: 0.5, density: 0.5|"
  "dare_linear|weight: 0.3, density: 0.6|" "breadcrumbs|weight: 0.5, density: 0.6|"
  "della|weight: 0.5, density: 0.5|epsilon: 0.1" "sce||select_topk: 0.4"
  "ram||" "ramplus_tl||"
)

# method_config DIR SPEC [PREFIX]: the config on stdout. Model paths are PREFIX/ft1 and so
# on (default DIR; mergekit wants paths relative to its working directory).
method_config() {
  local method per top prefix=${3:-$1}
  IFS='|' read -r method per top <<<"$2"
  printf 'models:\n'
  for m in ft1 ft2 ft3; do printf '  - model: %s/%s\n    parameters: {%s}\n' "$prefix" "$m" "$per"; done
  printf 'merge_method: %s\nbase_model: %s/base\nparameters: {%s}\ndtype: bfloat16\n' "$method" "$prefix" "$top"
}
