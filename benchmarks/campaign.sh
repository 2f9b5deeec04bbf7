#!/usr/bin/env bash
# The benchmark campaign whose table the README shows: the seven BBT tasks, 3 seeds,
# manual / bbt / gdfo on every task, and bbtv2 and gdfo's random-direction control on SST-2,
# at 102 train calls per run (6 generations of CMA-ES at popsize 17), then the report.
# A rerun skips finished cells, so an interrupted campaign continues where it stopped.
#   GDFO_DATA_DIR=../shared/data bash benchmarks/campaign.sh [RESULTS_DIR]
set -euo pipefail
RESULTS=${1:-runs/campaign}
COMMON=(--seeds 13 42 87 --budget 102 --results "$RESULTS"
        --set task.max_test_examples=300 --set task.prompt_placement=suffix
        --set model.student=sentence-transformers/all-MiniLM-L6-v2)  # the default student when it ran
gdfo bench --tasks sst2 yelp_polarity ag_news dbpedia mrpc snli rte --methods manual bbt gdfo "${COMMON[@]}"
gdfo bench --tasks sst2 --methods bbtv2 gdfo_random "${COMMON[@]}"
gdfo report "$RESULTS"
