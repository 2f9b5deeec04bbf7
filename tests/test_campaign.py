"""gdfo bench / gdfo report: cells as Ray tasks, the Parquet dataset, skip-finished resume, failures, the report."""

import json
import os

import numpy as np
import pytest

from gdfo_ray import ConfigError
from gdfo_ray.campaign import CampaignConfig, cell_path, plan, read_results, run_campaign
from gdfo_ray.report import build_report

pytestmark = pytest.mark.ray

ROWS = [("the movie was very good", 1), ("it was very bad", 0), ("the plot was fun", 1), ("the acting was dull", 0),
        ("the story was great", 1), ("it was awful", 0), ("the film was fine", 1), ("the plot was not good", 0)]


@pytest.fixture(scope="module")
def campaign_data(tmp_path_factory):
    """sst2 with splits 13 and 42; yelp_polarity with 42 and 87 only (seed 13 must borrow split 87)."""
    root = tmp_path_factory.mktemp("campaign_data")
    for task, seeds in (("sst2", (13, 42)), ("yelp_polarity", (42, 87))):
        for seed in seeds:
            folder = root / task / "16-shot" / str(seed)
            folder.mkdir(parents=True)
            for split, offset in (("train", 0), ("dev", 1)):
                rows = [ROWS[(i + offset + seed) % len(ROWS)] for i in range(8)]
                (folder / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows))
        (root / task / "test.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in ROWS))
    return str(root)


def _campaign(tmp, tiny_models, data_dir, **overrides):
    base = {"model": {"teacher": tiny_models["causal"], "student": tiny_models["encoder"], "dtype": "float32"},
            "task": {"data_dir": data_dir}, "prompt": {"intrinsic_dim": 4, "n_prompt_tokens": 2},
            "search": {"popsize": 4, "eval_every_calls": 4},
            "student": {"k_steps": 1, "batch_rows": 8, "precision": "float32"}}
    settings = dict(results_dir=str(tmp), tasks=("sst2", "yelp_polarity"), seeds=(13, 42), methods=("manual", "bbt"),
                    budget=8, base=base, cell_cpus=1)
    settings.update(overrides)
    return CampaignConfig(**settings)


@pytest.fixture(scope="module")
def finished(local_ray, tiny_models, campaign_data, tmp_path_factory):
    results = tmp_path_factory.mktemp("campaign")
    campaign = _campaign(results, tiny_models, campaign_data)
    lines = []
    outcome = run_campaign(campaign, say=lines.append)
    return campaign, outcome, lines


def test_every_cell_lands_in_the_partitioned_dataset_with_its_config(finished):
    campaign, outcome, lines = finished
    assert not outcome.failed and len(outcome.finished) == 8 and not outcome.skipped
    rows = read_results(campaign.results_dir)
    assert sorted((r["task"], r["method"], r["seed"]) for r in rows) == sorted(
        (t, m, s) for t in campaign.tasks for m in campaign.methods for s in campaign.seeds)
    for r in rows:
        config = json.loads(r["config_json"])
        assert (config["task"]["name"], config["method"], config["seed"]) == (r["task"], r["method"], r["seed"])
        assert r["control"] == config["harmonize"]["control"]  # the setting reaches the results, not only a label
        assert r["calls"] == (8 if r["method"] == "bbt" else 0)
        assert json.loads(r["versions_json"])["torch"] and r["wall_s"] > 0
        assert json.loads(r["machine_json"])["matmul_gflops"] > 0  # the machine it ran on, and its arithmetic
        assert r["method"] == "manual" or r["s_per_call_over_floor"] > 0
    split = {(r["task"], r["seed"]): r["split_seed"] for r in rows}
    assert split == {("sst2", 13): 13, ("sst2", 42): 42, ("yelp_polarity", 13): 87, ("yelp_polarity", 42): 42}
    curves = read_results(campaign.results_dir, "curves")
    assert {(c["task"], c["method"]) for c in curves} == {("sst2", "bbt"), ("yelp_polarity", "bbt")}
    assert any("8/8" in line for line in lines)  # progress names each finished cell
    # One CPU per cell on a 2-CPU Ray: cells ran side by side.
    spans = sorted((r["started_at"], r["finished_at"]) for r in rows)
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))


def test_a_rerun_skips_finished_cells_and_redoes_only_missing_ones(finished):
    campaign, _, _ = finished
    again = run_campaign(campaign, say=lambda _: None)
    assert len(again.skipped) == 8 and not again.finished
    before = {(r["task"], r["method"], r["seed"]): r["test_score"] for r in read_results(campaign.results_dir)}
    cell = next(c for c in plan(campaign) if c.task == "sst2" and c.label == "bbt" and c.seed == 42)
    os.remove(cell_path(campaign.results_dir, "cells", cell))  # as if killed before the cell was recorded
    third = run_campaign(campaign, say=lambda _: None)
    assert [r["seed"] for r in third.finished] == [42] and len(third.skipped) == 7
    assert third.finished[0]["resumed"]  # continued from the cell's checkpoint, not started over
    after = {(r["task"], r["method"], r["seed"]): r["test_score"] for r in read_results(campaign.results_dir)}
    assert after == before


def test_a_finished_cell_with_another_config_is_refused(finished, tiny_models, campaign_data):
    campaign, _, _ = finished
    changed = _campaign(campaign.results_dir, tiny_models, campaign_data, budget=12)
    with pytest.raises(ConfigError, match=r"search.budget_calls"):
        run_campaign(changed, say=lambda _: None)


def test_cells_finished_before_a_setting_existed_match_only_its_old_behaviour(finished, tiny_models, campaign_data,
                                                                               tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdfo_ray.campaign import _saved_differences

    campaign, _, _ = finished
    results = str(tmp_path / "results")
    shutil.copytree(campaign.results_dir, results)
    kd = _campaign(results, tiny_models, campaign_data, methods=("kd",))
    cell = next(c for c in plan(kd) if c.task == "sst2" and c.seed == 42)
    source = next(c for c in plan(campaign) if c.task == "sst2" and c.seed == 42 and c.label == "bbt")
    path = cell_path(results, "cells", source)
    table = pq.read_table(path)
    config = json.loads(table.column("config_json")[0].as_py())
    config["method"] = "kd"  # a kd cell as an older gdfo-ray wrote it: no student.text_cache in the config
    del config["student"]["text_cache"]
    at = table.column_names.index("config_json")
    pq.write_table(table.set_column(at, "config_json", pa.array([json.dumps(config)])), path)
    # The default now (true) is not what that cell ran; false, the behaviour before the setting, is.
    assert _saved_differences(path, cell) == ["student.text_cache"]
    old = {**kd.base, "student": {**kd.base["student"], "text_cache": False}}
    cell = next(c for c in plan(_campaign(results, tiny_models, campaign_data, methods=("kd",), base=old))
                if c.task == "sst2" and c.seed == 42)
    assert _saved_differences(path, cell) == []


def test_a_new_students_campaign_reuses_the_finished_cells_it_can_pair_with(finished, tiny_models, campaign_data,
                                                                             tmp_path):
    import yaml

    campaign, _, _ = finished
    base = {**campaign.base, "model": {**campaign.base["model"], "student": "gp"},
            "student": {**campaign.base["student"], "k_steps": 3}}
    lines = []
    new = _campaign(tmp_path / "gp", tiny_models, campaign_data, methods=("bbt",), base=base,
                    reuse=campaign.results_dir)
    outcome = run_campaign(new, say=lines.append)
    # bbt builds no student: the student's settings cannot change its cells, so all four are copied, none run.
    assert not outcome.finished and len(outcome.skipped) == 4
    assert any("reused 4 finished cells" in line for line in lines)
    old = {(r["task"], r["seed"]): r["test_score"] for r in read_results(campaign.results_dir) if r["method"] == "bbt"}
    assert {(r["task"], r["seed"]): r["test_score"] for r in read_results(new.results_dir)} == old
    saved = yaml.safe_load(open(os.path.join(new.results_dir, "campaign.yaml")))["invocations"][-1]
    assert saved["reuse"] == os.path.relpath(campaign.results_dir, new.results_dir)  # relative: the folder travels
    assert "commit" in saved
    # A setting that changes the search is not reused: the cell is named and left to run.
    lines = []
    base["search"] = {**base["search"], "sigma0": 0.5}
    other = _campaign(tmp_path / "sigma", tiny_models, campaign_data, methods=("bbt",), seeds=(42,), base=base,
                      tasks=("sst2",), reuse=campaign.results_dir, budget=4)
    run_campaign(other, say=lines.append)
    assert any("not reusing sst2_bbt_seed42" in line and "search.sigma0" in line for line in lines)
    with pytest.raises(ConfigError, match="not a campaign directory"):
        _campaign(tmp_path / "x", tiny_models, campaign_data, reuse=str(tmp_path / "nowhere"))


def test_a_test_cap_the_finished_cells_never_reached_keeps_them(finished, tiny_models, campaign_data):
    campaign, _, _ = finished
    base = {**campaign.base, "task": {**campaign.base["task"], "max_test_examples": 100}}  # test sets hold 8 rows
    again = run_campaign(_campaign(campaign.results_dir, tiny_models, campaign_data, base=base), say=lambda _: None)
    assert len(again.skipped) == 8 and not again.finished
    base["task"]["max_test_examples"] = 4  # would score fewer rows than the finished cells did
    with pytest.raises(ConfigError, match=r"task.max_test_examples"):
        run_campaign(_campaign(campaign.results_dir, tiny_models, campaign_data, base=base), say=lambda _: None)


def test_a_failing_cell_is_recorded_and_the_others_finish(local_ray, tiny_models, campaign_data, tmp_path):
    campaign = _campaign(tmp_path, tiny_models, campaign_data, tasks=("sst2", "no_such_task"), seeds=(42,),
                         methods=("manual",))
    outcome = run_campaign(campaign, say=lambda _: None)
    assert [r["task"] for r in outcome.finished] == ["sst2"]
    assert list(outcome.failed) == ["no_such_task_manual_seed42"]
    assert "no_such_task" in outcome.failed["no_such_task_manual_seed42"]
    with open(tmp_path / "failed" / "no_such_task_manual_seed42.json") as f:
        assert json.load(f)["config"]["task"]["name"] == "no_such_task"
    report = open(build_report(str(tmp_path))).read()
    assert "## Failed cells" in report and "no_such_task_manual_seed42" in report
    assert "## Cells not finished" not in report  # a failed cell is listed once, as failed


def test_split_seeds_match_refuses_a_missing_split(tiny_models, campaign_data, tmp_path):
    campaign = _campaign(tmp_path, tiny_models, campaign_data, split_seeds="match")
    with pytest.raises(ConfigError, match=r"yelp_polarity.*no few-shot split for seed 13.*\[42, 87\]"):
        plan(campaign)


def test_report_table_and_plots(finished, tmp_path):
    campaign, _, _ = finished
    path = build_report(campaign.results_dir, str(tmp_path))
    text = open(path).read()
    rows = read_results(campaign.results_dir)
    scores = [r["test_score"] for r in rows if r["task"] == "sst2" and r["method"] == "bbt"]
    expected = f"{100 * np.mean(scores):.2f} ± {100 * np.std(scores, ddof=1):.2f}"
    bbt_line = next(line for line in text.splitlines() if line.startswith("| bbt |"))
    assert expected in bbt_line
    assert "| method | SST-2 | Yelp P. | Avg. |" in text
    assert "## Cells not finished" not in text and "## Failed cells" not in text
    for task in ("sst2", "yelp_polarity"):
        with open(tmp_path / f"dev_{task}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"(dev_{task}.png)" in text


def test_gdfo_random_is_gdfo_with_the_random_direction_control(tiny_models, campaign_data, tmp_path):
    campaign = _campaign(tmp_path, tiny_models, campaign_data, methods=("gdfo", "gdfo_random"), seeds=(42,),
                         tasks=("sst2",))
    gdfo, control = plan(campaign)
    assert (gdfo.label, gdfo.config.method, gdfo.config.harmonize.control) == ("gdfo", "gdfo", "none")
    assert (control.label, control.config.method, control.config.harmonize.control) == ("gdfo_random", "gdfo", "random")
    assert control.config.output_dir.endswith("sst2_gdfo_random_seed42")
    with pytest.raises(ConfigError, match="methods \\['gdfo_rand'\\] are unknown"):
        _campaign(tmp_path, tiny_models, campaign_data, methods=("gdfo_rand",))


def test_the_ladder_states_its_threshold_as_a_bracket_of_fidelity():
    from gdfo_ray.report import ladder_threshold

    def rungs(*pairs):  # (student, fidelity, lower end of gdfo − bbt's interval), by fidelity
        return [{"student": s, "fidelity": f, "vs_bbt": {"lo": lo}} for s, f, lo in pairs]

    text = ladder_threshold(rungs(("a", 0.1, -1.0), ("b", 0.3, -0.5), ("c", 0.4, 0.2), ("d", 1.0, 0.4)))
    assert "from median fidelity +0.40 (c) up, and includes zero at +0.30 (b)" in text
    assert "Below it gdfo does not pay off." in text
    text = ladder_threshold(rungs(("a", 0.1, 0.3), ("b", 0.3, -0.5), ("c", 0.4, 0.2)))
    assert "from median fidelity +0.40 (c) up" in text and "+0.10 (a) beat bbt all the same" in text
    text = ladder_threshold(rungs(("a", 0.1, 0.3), ("c", 0.4, 0.2)))
    assert "at every rung, down to median fidelity +0.10 (a)" in text
    assert "not at the most faithful one" in ladder_threshold(rungs(("a", 0.1, 0.3), ("c", 0.4, -0.2)))
    assert "at no rung" in ladder_threshold(rungs(("a", 0.1, -0.3), ("c", 0.4, -0.2)))


def test_the_ladder_sets_gdfo_minus_bbt_against_each_students_fidelity(finished, tiny_models, campaign_data, tmp_path):
    from gdfo_ray import GDFOError
    from gdfo_ray.report import _judged, ladder_report, ladder_rows, ladder_threshold

    campaign, _, _ = finished
    dirs = []
    # The oracle's rung runs the random control too; the gp's rung borrows it (its search would be the same),
    # and runs one seed of the oracle's two, as the ladder's rungs run three of its five.
    for student, methods, seeds in (("oracle", ("bbt", "gdfo", "gdfo_random"), (13, 42)),
                                    ("gp", ("bbt", "gdfo"), (42,))):
        base = {**campaign.base, "model": {**campaign.base["model"], "student": student}}
        rung = _campaign(tmp_path / student, tiny_models, campaign_data, tasks=("sst2",), methods=methods,
                         seeds=seeds, base=base, reuse=campaign.results_dir)
        outcome = run_campaign(rung, say=lambda _: None)
        assert len(outcome.finished) == len(seeds) * (len(methods) - 1) and not outcome.failed  # bbt copied in
        dirs.append(rung.results_dir)
    oracle_dir = dirs[0]

    def scores(folder, method):
        return {x["seed"]: x["test_score"] for x in read_results(folder) if x["method"] == method}

    rungs = ladder_rows(dirs, n_boot=200, control_dir=oracle_dir)
    assert [r["student"] for r in rungs][-1] == "oracle"  # by fidelity: the oracle ranks as the teacher does
    assert rungs[-1]["fidelity"] == pytest.approx(1.0) and rungs[-1]["cells"] == 2
    bbt, oracle = scores(oracle_dir, "bbt"), scores(oracle_dir, "gdfo")
    assert rungs[-1]["vs_bbt_shared"]["cells"] == 1  # again on the one cell both rungs have: seed 42
    assert rungs[-1]["vs_bbt_shared"]["diff"] == pytest.approx(oracle[42] - bbt[42])
    control = scores(oracle_dir, "gdfo_random")
    for r in rungs:  # the rung's gdfo − bbt is the paired difference of its own cells; the control is the oracle's
        gdfo, bbt = scores(r["dir"], "gdfo"), scores(r["dir"], "bbt")
        assert r["vs_bbt"]["diff"] == pytest.approx(np.mean([gdfo[s] - bbt[s] for s in gdfo]))
        assert r["vs_random"]["diff"] == pytest.approx(np.mean([gdfo[s] - control[s] for s in gdfo]))
        assert r["control"] == oracle_dir
    assert ladder_rows(dirs, n_boot=200)[0]["vs_random"] is None  # without --control the gp rung has none
    with pytest.raises(GDFOError, match="no finished gdfo_random cell"):
        ladder_rows(dirs, control_dir=dirs[1])
    path = ladder_report(dirs, str(tmp_path / "ladder"), n_boot=200, control_dir=oracle_dir)
    text = open(path).read()
    assert "| oracle † |" in text and "breaks the black-box premise" in text
    assert "gdfo − bbt on the 1 cell every rung has" in text and "gdfo − bbt per task" in text
    assert "gdfo − gdfo_random of gp: paired with the gdfo_random cells of `../oracle`" in text
    assert "Over the tasks: " + ladder_threshold(rungs) in text and os.path.exists(tmp_path / "ladder" / "ladder.png")
    # The threshold task by task too, judged on each task's own intervals.
    sst2 = _judged(rungs, lambda r: r["vs_bbt"]["tasks"]["sst2"])
    assert "- SST-2: " + ladder_threshold(sst2) in text
    # How to remake it, from its own folder: paths relative to it, never this machine's.
    assert "gdfo report --ladder --control ../oracle ../oracle ../gp --out ." in text and str(tmp_path) not in text
    pay = [{**r, "vs_bbt": {**r["vs_bbt"], "lo": lo}} for r, lo in zip(rungs, (-0.01, 0.02))]
    assert "from median fidelity +1.00 (oracle) up, and includes zero at" in ladder_threshold(pay)
    assert "at no rung" in ladder_threshold([{**r, "vs_bbt": {**r["vs_bbt"], "lo": -0.1}} for r in rungs])
    # With uneven seeds the page judges the shared cells too, which can disagree with each rung's own seeds.
    assert "On the 1 cell every rung has: " + ladder_threshold(_judged(rungs, lambda r: r["vs_bbt_shared"])) in text
    shared = [{**r, "vs_bbt_shared": {**r["vs_bbt_shared"], "lo": lo}} for r, lo in zip(rungs, (0.02, -0.01))]
    assert "not at the most faithful one" in ladder_threshold(_judged(shared, lambda r: r["vs_bbt_shared"]))
    assert ladder_threshold(_judged(shared, lambda r: r["vs_bbt_shared"])) != ladder_threshold(pay)
    with pytest.raises(GDFOError, match="no finished gdfo cell"):
        ladder_rows([campaign.results_dir])


def test_a_gdfo_cells_curve_keeps_rho_and_its_candidates_rank_for_the_rank_benchmark(
        local_ray, tiny_models, campaign_data, tmp_path, capsys, monkeypatch):
    import pathlib

    base = {**_campaign(tmp_path, tiny_models, campaign_data).base}
    base["model"] = {**base["model"], "student": "oracle"}
    campaign = _campaign(tmp_path / "c", tiny_models, campaign_data, tasks=("sst2",), methods=("gdfo",),
                         seeds=(42,), base=base)
    assert not run_campaign(campaign, say=lambda _: None).failed
    curve = read_results(campaign.results_dir, "curves")
    assert all(r["rho"] is not None for r in curve)
    assert curve[0]["z_gd_rank"] is None and all(1 <= r["z_gd_rank"] <= 4 for r in curve[1:])  # popsize 4
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import candidate_ranks

    assert candidate_ranks.main([campaign.results_dir]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sst2 | gdfo | 42 |")]
    assert len(table) == 1 and f"| {len(curve) - 1} |" in table[0]


def test_the_white_box_benchmark_reads_train_loss_and_dev_peak_from_the_curve(
        local_ray, tiny_models, campaign_data, tmp_path, capsys, monkeypatch):
    import pathlib
    import shutil

    campaign = _campaign(tmp_path, tiny_models, campaign_data, tasks=("sst2",), methods=("white_box", "bbt"),
                         seeds=(42,), budget=12)
    assert not run_campaign(campaign, say=lambda _: None).failed
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    import white_box_curves

    found = white_box_curves.curves(campaign.results_dir)
    assert list(found) == [("sst2", 42)]  # bbt's curve is not read
    rows = found[("sst2", 42)]
    s = white_box_curves.summary(rows)
    dev = [(int(r["calls"]), r["dev_score"]) for r in rows if r["dev_score"] is not None]
    assert s["steps"] == 12 and s["evals"] == len(dev) == 3  # a dev evaluation every 4 steps
    assert s["dev_first"] == dev[0] and s["dev_last"] == dev[-1] and s["dev_peak"][1] == max(d[1] for d in dev)
    assert s["loss_last"] <= s["loss_first"] == rows[0]["fitness_best"]
    assert white_box_curves.main([campaign.results_dir]) == 0
    test = next(r["test_score"] for r in read_results(campaign.results_dir) if r["method"] == "white_box")
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| sst2 | 42 | 12 |"))
    assert line.endswith(f"| {100 * test:.2f} |")
    shutil.rmtree(tmp_path / "curves" / "task=sst2" / "method=white_box")
    with pytest.raises(SystemExit):  # a campaign without white_box cells is named, not an empty table
        white_box_curves.main([campaign.results_dir])
    assert "has no white_box cell" in capsys.readouterr().err


def test_a_campaigns_outputs_hold_no_path_of_the_machine_that_ran_it(finished, campaign_data, tmp_path):
    import yaml

    campaign, _, _ = finished
    build_report(campaign.results_dir)
    machine = (str(campaign.results_dir), str(campaign_data), str(tmp_path.parent.parent))
    strings = []

    def collect(value):
        if isinstance(value, str):
            try:  # the JSON columns: their leaves are checked
                parsed = json.loads(value) if value[:1] in "[{" else None
            except ValueError:
                parsed = None
            if parsed is None:
                strings.append(value)
            else:
                collect(parsed)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    for kind in ("cells", "curves"):
        collect(read_results(campaign.results_dir, kind))
    collect(yaml.safe_load(open(os.path.join(campaign.results_dir, "campaign.yaml"))))
    models = {v for v in json.loads(read_results(campaign.results_dir)[0]["config_json"])["model"].values()
              if isinstance(v, str)}
    report = open(os.path.join(campaign.results_dir, "report", "report.md")).read()
    for model in models:  # local model paths the user gave are names of their own
        report = report.replace(model, "<model>")
    strings.append(report)
    leaked = [s for s in strings if s not in models and any(m in s for m in machine)]
    assert not leaked, leaked[:5]
    row = read_results(campaign.results_dir)[0]
    config = json.loads(row["config_json"])
    assert config["output_dir"].startswith("runs" + os.sep) and config["task"]["data_dir"] == "$GDFO_DATA_DIR"
    assert json.loads(row["summary_json"])["data_source"].startswith("$GDFO_DATA_DIR")


def test_a_cell_takes_a_whole_node_unless_cell_cpus_says_otherwise():
    from gdfo_ray.campaign import cell_threads

    assert [cell_threads(n) for n in (1, 2, 16)] == [1, 2, 16]
    assert cell_threads(0) == 1
