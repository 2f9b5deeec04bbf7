import pytest

from gdfo_ray import ConfigError, GDFOConfig
from gdfo_ray.config import CONTROLS, METHODS, RUN_LABELS, apply_overrides, label_settings, run_label


@pytest.mark.parametrize("data, match", [
    ({"method": "sgd"}, "method must be one of"),
    ({"seed": -1}, "seed must be an integer"),
    ({"prompt": {"intrinsic_dim": 0}}, "prompt.intrinsic_dim"),
    ({"prompt": {"init": "ones"}}, "prompt.init must be one of"),
    ({"search": {"popsize": 1}}, "search.popsize"),
    ({"search": {"loss": "mse"}}, "search.loss must be one of"),
    ({"search": {"sigma0": float("nan")}}, "search.sigma0"),
    ({"search": {"cma_options": {"popsize": 3}}}, "configured by their own fields"),
    ({"harmonize": {"gamma": 1.5}}, r"harmonize.gamma must be in \[0, 1\]"),
    ({"harmonize": {"control": "zero"}}, "harmonize.control"),
    ({"student": {"train_body": True}}, "student.text_cache=false to train the body"),
    ({"pool": {"backend": "spark"}}, "pool.backend"),
    ({"model": {"teacher_kind": "seq2seq"}}, "model.teacher_kind"),
    ({"model": {"device": "tpu"}}, "model.device"),
    ({"task": {"metric": "auc"}}, "task.metric"),
    ({"task": {"test_file": "t.jsonl"}}, "without task.train_file"),
    ({"student": {"tau": 0}}, "student.tau"),
    ({"searhc": {}}, "'searhc' is not a valid config key"),
    ({"search": {"budget": 5}}, "Similar valid keys: \\['budget_calls'\\]"),
])
def test_invalid_values_are_refused_by_name(data, match):
    with pytest.raises(ConfigError, match=match):
        GDFOConfig.from_dict(data)


def test_budget_smaller_than_one_generation_is_refused():
    with pytest.raises(ConfigError, match="smaller than one generation"):
        GDFOConfig.from_dict({"search": {"budget_calls": 5, "popsize": 6}})
    GDFOConfig.from_dict({"method": "white_box", "search": {"budget_calls": 1}})  # one call is one step
    GDFOConfig.from_dict({"method": "manual", "search": {"budget_calls": 0}})


def test_the_default_popsize_is_pycmas_own_for_the_dimension():
    import cma

    for d in (10, 100, 500):
        es = cma.CMAEvolutionStrategy([0.0] * d, 1.0, {"verbose": -9})
        assert GDFOConfig.from_dict({"prompt": {"intrinsic_dim": d}}).popsize == es.popsize


def test_overrides_roundtrip_and_unknown_keys():
    config = GDFOConfig().with_overrides({"search.popsize": 10, "task.name": "rte"})
    assert config.search.popsize == 10 and config.task.name == "rte"
    assert GDFOConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="not a valid config key"):
        GDFOConfig().with_overrides({"search.pop": 3})


def test_one_token_rule_and_one_limiter_rule(monkeypatch):
    from gdfo_ray import TeacherError

    config = GDFOConfig.from_dict({"model": {"teacher": "http://127.0.0.1:9"}, "service": {"token_env": "MY_TOKEN"}})
    monkeypatch.delenv("MY_TOKEN", raising=False)
    with pytest.raises(TeacherError, match=r"http://127.0.0.1:9: set \$MY_TOKEN"):
        config.service_token()
    monkeypatch.setenv("MY_TOKEN", "from-env")
    assert config.service_token() == "from-env" and config.service_token("given") == "given"
    assert not config.pool.limited
    assert config.with_overrides({"pool.max_in_flight": 2}).pool.limited
    assert config.with_overrides({"pool.calls_per_s": 5.0}).pool.limited


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("control", CONTROLS)
def test_a_run_label_stands_for_its_method_and_control(method, control):
    """The label names gdfo's control and nothing else; reading it back gives the settings that made it."""
    label = run_label(method, control)
    config = GDFOConfig.from_dict(apply_overrides(GDFOConfig().to_dict(), {**label_settings(label)}))
    assert config.method == method
    assert config.harmonize.control == (control if method == "gdfo" else "none")
    assert config.label == label
    assert label in RUN_LABELS


def test_one_rule_says_which_differences_from_a_saved_run_matter():
    from gdfo_ray.config import setting_differences

    gdfo = GDFOConfig(method="gdfo")
    saved = gdfo.with_overrides({"pool.backend": "local", "task.data_dir": "/elsewhere", "output_dir": "x",
                                 "model.record_answers": "a.npz", "student.lr": 0.5, "seed": 7,
                                 "task.max_test_examples": 100}).to_dict()
    # Where it ran never matters; the student does for gdfo; the test cap only once the test set was scored.
    assert setting_differences(saved, gdfo) == ["seed", "student.lr"]
    assert setting_differences(saved, gdfo, finished=True, scored_rows=50) == ["seed", "student.lr"]
    assert setting_differences(saved, gdfo, finished=True, scored_rows=100) == [
        "seed", "student.lr", "task.max_test_examples"]  # the cap cut its test set
    assert "task.max_test_examples" in setting_differences(saved, gdfo, finished=True)  # unknown rows: it matters
    bbt = GDFOConfig(method="bbt", seed=7)
    saved_bbt = bbt.with_overrides({"student.lr": 0.5, "model.student": "gp", "harmonize.gate": "none"}).to_dict()
    assert setting_differences(saved_bbt, bbt) == []  # bbt uses neither student nor update
    old = {k: v for k, v in bbt.to_dict().items()}
    old["student"] = {k: v for k, v in old["student"].items() if k != "text_cache"}  # saved before it existed
    assert setting_differences(old, bbt.with_overrides({"method": "gdfo"})) == ["method", "student.text_cache"]
