"""The report's table: the papers' shape, partial cells marked, the average only over complete rows."""

from gdfo_ray.report import cost_table, score_table


def _row(task, method, seed, score, calls=10):
    return {"task": task, "method": method, "seed": seed, "test_score": score, "calls": calls, "dev_calls": 2,
            "wall_s": 3.0}


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


def test_missing_cells_are_those_asked_for_and_not_finished(tmp_path):
    import yaml

    from gdfo_ray.report import missing_cells

    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump({"invocations": [
        {"tasks": ["sst2", "rte"], "methods": ["bbt"], "seeds": [1, 2]},
        {"tasks": ["sst2"], "methods": ["bbtv2"], "seeds": [1]}]}))
    rows = [_row("sst2", "bbt", 1, 0.8), _row("sst2", "bbt", 2, 0.8), _row("rte", "bbt", 1, 0.5)]
    assert missing_cells(str(tmp_path), rows) == ["rte_bbt_seed2", "sst2_bbtv2_seed1"]
