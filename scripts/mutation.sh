#!/usr/bin/env bash
# The scoped mutation pass (docs/testing.md): mutmut changes one operator, constant or call at
# a time in the code whose silent breakage changes results, runs the fast tests that cover the
# changed function, and counts the mutants no test caught. Not part of CI: it takes long.
#
#   scripts/mutation.sh                  the whole scope (the list below)
#   scripts/mutation.sh 'afmp.ops.edge.*'  only the mutants whose names match
#
# Settings (files mutated, the test subset, the lines left alone) are [tool.mutmut] in
# pyproject.toml. mutmut works in ./mutants (a copy of src/ and tests/, git-ignored) and keeps
# its results there, and its record of which tests reach which function: after adding tests,
# delete ./mutants, or the new tests are never run against the mutants. JOBS sets the
# parallel workers (default: 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
# One torch thread per worker. mutmut forks a worker per mutant from a process that has
# already run torch; an OpenMP thread pool does not survive fork, so a child whose op is big
# enough to go parallel spins until its CPU limit and is reported as a "timeout".
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# The scope, as mutant names (module, then x_FUNCTION or xǁCLASSǁMETHOD): the training step and
# schedule, the loss contract, EMA, the models' forward passes, the edge stage's reference,
# the split and normalisation, the registry's config resolution, the studies' paired statistics.
SCOPE=(
    "afmp.training.epoch.x_make_scheduler__mutmut_*"
    "afmp.training.epoch.x_mixup__mutmut_*"
    "afmp.training.epoch.x_param_groups__mutmut_*"
    "afmp.training.epoch.x_train_one_epoch__mutmut_*"
    "afmp.training.losses.*"
    "afmp.training.ema.*"
    "afmp.models.text.x_shift__mutmut_*"
    "afmp.models.text.x_masked_mean__mutmut_*"
    "afmp.models.text.xǁNeighbourDiffusionǁ*"
    "afmp.models.afmp.xǁRouterPCULayerǁforward__mutmut_*"
    "afmp.models.afmp.xǁAFMPǁforward_features__mutmut_*"
    "afmp.models.afmp.xǁAFMPǁforward_head__mutmut_*"
    "afmp.models.linear_attention.x_*"
    "afmp.models.linear_attention.xǁ*ǁforward__mutmut_*"
    "afmp.models.linear_attention.xǁHydraAttentionǁbranch_queries__mutmut_*"
    "afmp.ops.edge.*"
    "afmp.data.images.x_split_indices__mutmut_*"
    "afmp.data.images.x_bundle_from_arrays__mutmut_*"
    "afmp.registry.x_resolve_config__mutmut_*"
    "afmp.registry.x_model_args_for_data__mutmut_*"
    "afmp.registry.x_pretrained_cfg__mutmut_*"
    "afmp.studies.ablate.x_paired__mutmut_*"
    "afmp.studies.ablate.x__mean_std__mutmut_*"
)
if [ $# -gt 0 ]; then SCOPE=("$@"); fi

start=$(date +%s)
"$PYTHON" -m mutmut run --max-children "${JOBS:-2}" "${SCOPE[@]}"
echo "mutation pass: $(($(date +%s) - start)) s of wall-clock time"

# The score over the scope, then every mutant not killed with its diff.
"$PYTHON" -m mutmut results --all True > mutants/results.txt
"$PYTHON" - "${SCOPE[@]}" <<'EOF'
import collections, fnmatch, subprocess, sys

scope = sys.argv[1:]
status = {}
for line in open("mutants/results.txt"):
    name, _, verdict = line.strip().rpartition(": ")
    if any(fnmatch.fnmatch(name, pattern) for pattern in scope):
        status[name] = verdict
counts = collections.Counter(status.values())
tested = sum(counts.values()) - counts["not checked"]
print(f"mutants in scope: {tested}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
if tested:
    # A timeout counts as caught (mutmut's reading): the tests did not pass under the mutant.
    caught = counts["killed"] + counts["timeout"]
    print(f"score: {caught / tested:.1%} caught (killed or timeout), {counts['killed'] / tested:.1%} killed")
for name, verdict in sorted(status.items()):
    if verdict not in ("killed", "not checked"):
        print(f"\n== {verdict}: {name}")
        print(subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True).stdout)
EOF
