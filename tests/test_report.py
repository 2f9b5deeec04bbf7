"""The report's table: the papers' shape, partial cells marked, the average only over complete rows."""

import json

import numpy as np
import pytest

from gdfo_ray.report import (calls_to_reach, cost_table, machine_lines, paired_differences, paired_table, reach_table,
                             score_table)


def _row(task, method, seed, score, calls=10, **extra):
    return {"task": task, "method": method, "seed": seed, "test_score": score, "calls": calls, "dev_calls": 2,
            "wall_s": 3.0, **extra}


def test_score_table_orders_tasks_and_methods_and_averages_complete_rows():
    rows = [_row("rte", "bbt", s, v) for s, v in ((1, 0.5), (2, 0.6))]
    rows += [_row("sst2", "bbt", s, v) for s, v in ((1, 0.8), (2, 0.9))]
    rows += [_row("sst2", "manual", 1, 0.7), _row("sst2", "manual", 2, 0.7)]
    rows += [_row("sst2", "bbtv2", 1, 0.85)]  # one seed of two
    lines = score_table(rows).splitlines()
    assert lines[0] == "| method | SST-2 | RTE | Avg. |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| manual", "| bbt", "| bbtv2"]
    assert lines[3] == "| bbt | 85.00 ± 7.07 | 55.00 ± 7.07 | 70.00 |"
    assert lines[2] == "| manual | 70.00 ± 0.00 | – | – |"  # no RTE: no average
    assert lines[4] == "| bbtv2 | 85.00† | – | – |"


def test_cost_table_shows_calls_and_time():
    table = cost_table([_row("sst2", "bbt", 1, 0.8, calls=102), _row("sst2", "bbt", 2, 0.9, calls=102)])
    assert "| bbt | 102+2 calls, 3 s |" in table
    rows = [_row("sst2", "bbt", s, 0.8, calls=102, s_per_call_over_floor=x, machine_json=json.dumps(
        {"cpu": "AMD EPYC", "cores": 2, "gpu": None, "matmul_dtype": "float32", "matmul_gflops": 80.0}))
        for s, x in ((1, 1.4), (2, 1.6), (3, 1.5))]
    assert "| bbt | 102+2 calls, 3 s, 1.50x floor |" in cost_table(rows)
    lines = machine_lines(rows)
    assert "- AMD EPYC, 2 cores: 3 cells, matmul 80 GFLOP/s in float32" in lines
    assert "median 1.50x over 3 cells, 1.40x to 1.60x" in lines
    assert "do not record their machine" in machine_lines([_row("sst2", "bbt", 1, 0.8)])


def test_missing_cells_are_those_asked_for_and_not_finished(tmp_path):
    import yaml

    from gdfo_ray.report import missing_cells

    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump({"invocations": [
        {"tasks": ["sst2", "rte"], "methods": ["bbt"], "seeds": [1, 2]},
        {"tasks": ["sst2"], "methods": ["bbtv2"], "seeds": [1]}]}))
    rows = [_row("sst2", "bbt", 1, 0.8), _row("sst2", "bbt", 2, 0.8), _row("rte", "bbt", 1, 0.5)]
    assert missing_cells(str(tmp_path), rows) == ["rte_bbt_seed2", "sst2_bbtv2_seed1"]


def _pred_row(task, method, seed, correct, label=None):
    """A cell whose tuned prompt answers row i correctly iff ``correct[i]`` (binary labels)."""
    label = np.asarray(label if label is not None else [i % 2 for i in range(len(correct))])
    pred = np.where(np.asarray(correct, bool), label, 1 - label)
    return {**_row(task, method, seed, float(np.mean(correct))), "metric": "accuracy",
            "test_pred": pred.tolist(), "test_label": label.tolist()}


def test_paired_difference_is_the_mean_over_tasks_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    rows = []
    for task in ("sst2", "rte"):
        for seed in (1, 2, 3):
            a = rng.random(400) < 0.8
            b = rng.random(400) < 0.6
            rows += [_pred_row(task, "gdfo", seed, a), _pred_row(task, "bbt", seed, b)]
    r = paired_differences(rows, "gdfo", "bbt", n_boot=300)
    expected = np.mean([ra["test_score"] - rb["test_score"] for ra, rb in zip(rows[::2], rows[1::2])])
    assert r["diff"] == pytest.approx(expected)
    assert r["lo"] < r["diff"] < r["hi"] and r["lo"] > 0.1  # a 20-point gap on 2,400 rows is clear
    assert (r["a_wins"], r["b_wins"], r["cells"], r["rows_resampled"]) == (2, 0, 6, True)


def test_paired_interval_spans_zero_when_methods_answer_alike_and_widens_with_fewer_rows():
    rng = np.random.default_rng(1)
    same = [(rng.random(n) < 0.7, rng.random(n) < 0.7) for n in (2000, 2000, 60, 60)]
    big = [_pred_row("sst2", m, s, c) for s, (a, b) in enumerate(same[:2]) for m, c in (("gdfo", a), ("bbt", b))]
    small = [_pred_row("sst2", m, s, c) for s, (a, b) in enumerate(same[2:]) for m, c in (("gdfo", a), ("bbt", b))]
    r_big, r_small = paired_differences(big, "gdfo", "bbt", 500), paired_differences(small, "gdfo", "bbt", 500)
    assert r_big["lo"] < 0 < r_big["hi"]
    assert r_small["hi"] - r_small["lo"] > 2 * (r_big["hi"] - r_big["lo"])


def test_paired_table_bolds_clear_differences_and_marks_seed_only_cells():
    rows = [_pred_row("sst2", "gdfo", s, [1] * 90 + [0] * 10) for s in (1, 2)]
    rows += [_pred_row("sst2", "bbt", s, [1] * 50 + [0] * 50) for s in (1, 2)]
    rows += [_row("sst2", "manual", s, 0.5) for s in (1, 2)]  # no per-row predictions recorded
    table = paired_table(rows, n_boot=200)
    assert "| gdfo − bbt | 2 | **+40.00** |" in table
    assert "(seeds only)" in table.split("gdfo − manual")[1].splitlines()[0]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| gdfo − bbt", "| gdfo − manual",
                                                                         "| bbt − manual"]


def test_paired_bootstrap_scores_f1_on_resampled_rows():
    from gdfo_ray.report import _metric

    label = np.array([1, 1, 0, 0])
    assert _metric(np.array([[1, 0, 1, 0]]), label, "f1")[0] == pytest.approx(0.5)
    assert _metric(np.array([[0, 0, 0, 0]]), label, "f1")[0] == 0.0


def test_calls_to_reach_pairs_seeds_and_counts_those_that_never_do():
    def curve(method, seed, points):
        return [{"task": "sst2", "method": method, "seed": seed, "calls": c, "dev_score": d} for c, d in points]

    curves = curve("bbt", 1, [(17, 0.5), (34, 0.7), (51, 0.6)]) + curve("bbt", 2, [(17, 0.8)])
    curves += curve("gdfo", 1, [(17, 0.72), (34, 0.6)]) + curve("gdfo", 2, [(17, 0.5), (34, 0.75)])
    rows = [_row("sst2", m, s, 0.5) for m in ("bbt", "gdfo") for s in (1, 2)]
    rows += [{**_row("sst2", "manual", s, 0.5), "dev_best": 0.75} for s in (1, 2)]
    reach = calls_to_reach(rows, curves)
    assert reach[("bbt", "sst2")] == ([34, 17], 2)
    assert reach[("gdfo", "sst2")] == ([17], 2)  # seed 2 never reached bbt's 0.8
    assert reach[("manual", "sst2")] == ([0], 2)
    assert "| gdfo | 17 (1/2) |" in reach_table(rows, curves)


def test_a_pair_with_one_seed_says_its_interval_covers_test_rows_only():
    rows = [_pred_row("sst2", "gdfo", 1, [1] * 60 + [0] * 40), _pred_row("sst2", "bbt", 1, [1] * 50 + [0] * 50)]
    assert "(1 seed: test rows only)" in paired_table(rows, n_boot=100)


def test_report_says_how_many_test_rows_each_task_scored_and_which_were_sampled():
    import json

    from gdfo_ray.report import _test_rows

    def cell(task, n, source):
        return {**_pred_row(task, "bbt", 1, [True] * n), "config_json": json.dumps({"task": {"max_test_examples": 5}}),
                "summary_json": json.dumps({"data_source": source})}

    rows = [cell("sst2", 3, "bbt dir"), cell("ag_news", 5, "bbt dir (test subsampled to 5 rows, seed 13)")]
    assert _test_rows(rows) == ("test rows scored: SST-2 3 (all); AG News 5 "
                                "(a seeded sample of the test set per seed: task.max_test_examples)")
    assert _test_rows([{**rows[0], "test_label": None}]) == "test rows per task at most 5"


@pytest.mark.parametrize("student, method, flagged", [("oracle", "gdfo", True), ("oracle:1.5", "gdfo", True),
                                                      ("oracle:1.5", "kd", True), ("sibling:4", "gdfo", False),
                                                      ("gp", "gdfo", False), ("oracle", "bbt", False)])
def test_every_oracle_but_no_other_student_is_flagged_as_not_a_black_box(student, method, flagged):
    import json

    from gdfo_ray.report import _oracle

    assert _oracle({"config_json": json.dumps({"method": method, "model": {"student": student}})}) is flagged
