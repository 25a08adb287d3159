# Shared by benches/methods.sh and benches/e2e.sh: every merge method with typical
# parameters, and the config that merges a set's ft1..ft3 onto its base with one of them.
#
# Each spec is METHOD|PARAMETERS-PER-MODEL|TOP-LEVEL-PARAMETERS.
METHOD_SPECS=(
  "model_stock||" "linear||weight: 0.25" "task_arithmetic|weight: 0.3|"
  "ties|weight: 0.5, density: 0.5|" "dare_ties|weight: 0.5, density: 0.5|"
  "dare_linear|weight: 0.3, density: 0.6|" "breadcrumbs|weight: 0.5, density: 0.6|"
  "della|weight: 0.5, density: 0.5|epsilon: 0.1" "sce||select_topk: 0.4"
  "ram||" "ramplus_tl||" "slerp||t: 0.4" "passthrough||"
)

# method_models SPEC: the models the method's config reads.
method_models() {
  case ${1%%|*} in
    slerp) echo base ft1 ;;
    passthrough) echo ft1 ;;
    *) echo base ft1 ft2 ft3 ;;
  esac
}

# method_config DIR SPEC [PREFIX]: the config on stdout. Model paths are PREFIX/ft1 and so
# on (default DIR; mergekit wants paths relative to its working directory). slerp takes ft1
# onto the base, passthrough copies ft1 alone.
method_config() {
  local method per top prefix=${3:-$1} m
  IFS='|' read -r method per top <<<"$2"
  printf 'models:\n'
  for m in $(method_models "$2"); do
    [ "$m" = base ] && continue
    printf '  - model: %s/%s\n    parameters: {%s}\n' "$prefix" "$m" "$per"
  done
  printf 'merge_method: %s\n' "$method"
  [ "$method" = passthrough ] || printf 'base_model: %s/base\n' "$prefix"
  printf 'parameters: {%s}\ndtype: bfloat16\n' "$top"
}
