#!/usr/bin/env bash
# Issue 37, step 2: the harmonized update chosen on tuning seeds, as a grid of campaigns that a 2-core
# machine can carry across sessions. gdfo tune's sweep (benchmarks/tune_update.sh) keeps its state in a
# Ray Tune experiment that only survives on the machine that ran it; here every variant is a campaign
# directory whose cells are committed as they finish and resume anywhere.
#
# Each variant runs gdfo with one student on SST-2, AG News and RTE at 510 calls, run seeds 7 and 8
# (disjoint from the reporting seeds 13 21 42 87 100) on few-shot split 42, with the ladder's settings
# (benchmarks/campaign_ladder.sh); `today` is today's update. The choice reads the best dev score each
# cell reached (gdfo report's dev column); the test set is scored on 64 rows only and never read for it.
# A variant becomes the default only if it beats `today` with gp, by the rule benchmarks/update_choice.py prints.
#   GDFO_DATA_DIR=/path/to/shared/data nice -n 19 bash benchmarks/update_variants.sh [ROOT] [STUDENTS...]
set -euo pipefail
ROOT=${1:-benchmarks/results/update-variants}
shift || true
STUDENTS=${*:-gp oracle}
declare -A VARIANTS=(
  [today]=""
  [guided2]="--set harmonize.guided_share=0.2 --set harmonize.guided_k=2"
  [guided4]="--set harmonize.guided_share=0.4 --set harmonize.guided_k=4 --set harmonize.guided_alpha=0.3"
  [adapt]="--set harmonize.adapt_eta=true"
  [tobest]="--set harmonize.mean_to_best=true --set harmonize.keep_sigma=true"
  [cands4]="--set harmonize.n_candidates=4"
  [nogate]="--set harmonize.gate=none"
)
ORDER="today guided2 adapt guided4 tobest cands4 nogate"
for STUDENT in $STUDENTS; do
  for VARIANT in $ORDER; do
    # shellcheck disable=SC2086
    gdfo bench --tasks sst2 ag_news rte --seeds 7 8 --methods gdfo --budget 510 \
        --results "$ROOT/${STUDENT/:/}-$VARIANT" \
        --set task.split_seed=42 --set task.prompt_placement=suffix --set task.max_test_examples=64 \
        --set model.student="$STUDENT" --set student.k_steps=5 --set student.batch_rows=32 ${VARIANTS[$VARIANT]}
  done
done
