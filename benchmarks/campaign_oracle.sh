#!/usr/bin/env bash
# Issue 21, step 2: does the harmonized update beat CMA-ES alone when the gradient is exact?
# gdfo and its random-direction control with the oracle student (the black box's own weights
# reading its own projection, frozen: a diagnostic that breaks the black-box premise), white_box
# (Adam on the exact gradient, one forward and backward per call: the ceiling) and lq_cma (pycma's
# surrogate-assisted CMA-ES, the peer without a student), at 510 train calls on SST-2, AG News and
# RTE, seeds 13 42 87 21 100. The settings are those of benchmarks/campaign_500.sh, so its bbt and
# manual cells pair with these and are copied in (--reuse) rather than run again; a cell that differs
# in any setting that can change it runs here. The oracle trains nothing (student.k_steps=0).
# The cells are the same whichever order they run in; on 2026-12-05 the remaining ones ran as three
# invocations of this command (--methods "manual bbt gdfo", then "white_box lq_cma", then "gdfo_random";
# campaign.yaml records each), so that gdfo's five seeds, which decide step 3, came first.
# Run it from a pinned commit in its own worktree, niced; a rerun skips finished cells:
#   git worktree add ../gdfo-campaign <commit> && cd ../gdfo-campaign && make setup
#   GDFO_DATA_DIR=/path/to/shared/data nice -n 19 bash benchmarks/campaign_oracle.sh [RESULTS_DIR]
set -euo pipefail
RESULTS=${1:-benchmarks/results/campaign-oracle-2026-12-05}
REUSE=${REUSE:-benchmarks/results/campaign-2026-12-03}
gdfo bench --tasks sst2 ag_news rte --seeds 13 42 87 21 100 --methods manual bbt gdfo gdfo_random white_box lq_cma \
    --budget 510 --results "$RESULTS" --cell-cpus 1 --reuse "$REUSE" \
    --set task.prompt_placement=suffix --set task.max_test_examples=2000 \
    --set model.student=oracle --set student.k_steps=0
gdfo report "$RESULTS"
