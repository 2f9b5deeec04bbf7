"""The students of the faithfulness ladder: oracle, sibling:K and gp, beside the default one."""

import json
import os

import numpy as np
import pytest
import torch

from gdfo_ray import ConfigError
from gdfo_ray.api import build_space, run
from gdfo_ray.config import parse_student
from gdfo_ray.losses import fitness
from gdfo_ray.metrics import spearman
from gdfo_ray.student import DistillBatch, GPStudent, SmoothField, StudentTrainer, make_student
from gdfo_ray.tasks import load_task
from gdfo_ray.teachers import TeacherPool, make_teacher


def _teacher_and_space(config, student):
    data = load_task(config.task, config.seed)
    teacher = TeacherPool([make_teacher(config, data)])
    _, space = build_space(config, teacher, student)
    return data, teacher, space


@pytest.mark.parametrize("name, kind, layers, noise", [
    ("oracle", "oracle", None, 0.0), ("oracle:1.5", "oracle", None, 1.5), ("oracle:0", "oracle", None, 0.0),
    ("gp", "gp", None, 0.0), ("sibling:3", "sibling", 3, 0.0), ("org/model", "model", None, 0.0)])
def test_student_names_parse(name, kind, layers, noise):
    spec = parse_student(name)
    assert (spec.kind, spec.layers, spec.noise) == (kind, layers, noise)
    assert spec.reads_teacher == (kind in ("oracle", "sibling"))


@pytest.mark.parametrize("bad", ["oracle:", "oracle:x", "oracle:-1", "oracle:nan", "oracle:inf"])
def test_a_bad_oracle_noise_is_refused_naming_the_form(tiny_config, bad):
    with pytest.raises(ConfigError, match=r"model.student=.*'oracle:S'"):
        tiny_config(**{"model.student": bad})


@pytest.mark.parametrize("bad", ["sibling", "sibling:", "sibling:0", "sibling:x", "sibling:-2"])
def test_a_bad_sibling_depth_is_refused_naming_the_form(tiny_config, bad):
    with pytest.raises(ConfigError, match=r"model.student=.*'sibling:K'"):
        tiny_config(**{"model.student": bad})


def test_students_cut_from_the_teacher_need_its_weights_and_the_oracle_stays_frozen(tiny_config):
    with pytest.raises(ConfigError, match="black-box service"):
        tiny_config(**{"model.student": "oracle", "model.teacher": "http://127.0.0.1:1"})
    with pytest.raises(ConfigError, match="train_body"):
        tiny_config(**{"model.student": "oracle", "student.train_body": True, "student.text_cache": False})
    with pytest.raises(ConfigError, match="z_shift"):
        tiny_config(**{"model.student": "oracle", "student.z_shift": True})
    config = tiny_config(**{"model.student": "sibling:5"})  # the tiny teacher has 2 blocks
    with pytest.raises(ConfigError, match="has 2. Choose K between 1 and 2"):
        StudentTrainer(config, load_task(config.task, config.seed))


def test_oracle_gradient_is_the_teachers_exact_gradient_and_it_ranks_like_the_teacher(tiny_config):
    config = tiny_config(**{"model.student": "oracle"})
    data = load_task(config.task, config.seed)
    oracle = make_student(config, data)
    with pytest.raises(RuntimeError, match="set_prompt_space"):
        oracle.grad_z(np.zeros(8))
    data, teacher, space = _teacher_and_space(config, oracle)
    rows = np.arange(len(data.train))
    z = np.random.default_rng(0).normal(size=8)
    loss, grad = oracle.grad_z(z)
    t_loss, grad_p = teacher.loss_and_grad(space.project(z)[0], "train", rows, data.train.label, "ce")
    assert loss == pytest.approx(t_loss, rel=1e-5)
    np.testing.assert_allclose(grad, space.A @ grad_p.reshape(-1), rtol=1e-4, atol=1e-6)
    # Against a finite difference along the gradient: the derivative it claims is the one the loss has.
    u = grad / np.linalg.norm(grad)
    eps = 1e-2
    plus, minus = (teacher.query(space.project(z + s * eps * u), "train", rows) for s in (1, -1))
    fd = (fitness(plus, data.train.label, "ce")[0] - fitness(minus, data.train.label, "ce")[0]) / (2 * eps)
    assert fd == pytest.approx(float(np.linalg.norm(grad)), rel=2e-2)
    Z = np.random.default_rng(1).normal(size=(6, 8))
    predicted = oracle.predict_fitness(Z, rows)
    np.testing.assert_allclose(predicted, fitness(teacher.query(space.project(Z), "train", rows),
                                                  data.train.label, "ce"), rtol=1e-5)
    # Nothing to distil: steps change nothing and report no loss.
    before = oracle.grad_z(z)[1]
    batch = DistillBatch(Z[:4], rows[:4], np.zeros((4, 2), np.float32), data.train.label[:4])
    assert np.isnan(oracle.train_steps([batch]))
    np.testing.assert_array_equal(oracle.grad_z(z)[1], before)


def test_a_smooth_field_has_unit_variance_and_forgets_beyond_its_length():
    field = SmoothField(dim=20, length=3.0, seed=0, n_features=4096)
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.normal(size=(2000, 20)) * 10, dtype=torch.float32)
    values = field(X).numpy()
    assert values.std() == pytest.approx(1.0, abs=0.1)
    u = torch.as_tensor(rng.normal(size=(2000, 20)), dtype=torch.float32)
    near = field(X + 0.1 * u / u.norm(dim=1, keepdim=True)).numpy()
    far = field(X + 6.0 * u / u.norm(dim=1, keepdim=True)).numpy()  # exp(-36/18) = 0.14
    assert np.corrcoef(values, near)[0, 1] > 0.99
    assert abs(np.corrcoef(values, far)[0, 1] - np.exp(-2)) < 0.1


def test_a_noisy_oracle_ranks_worse_as_its_noise_grows_and_its_gradient_is_its_own(tiny_config):
    Z = np.random.default_rng(4).normal(size=(40, 8))
    z = Z[0]
    ranks, fitnesses = {}, {}
    for name in ("oracle", "oracle:0.3", "oracle:3"):
        config = tiny_config(**{"model.student": name})
        student = make_student(config, load_task(config.task, config.seed))
        data, teacher, space = _teacher_and_space(config, student)
        rows = np.arange(len(data.train))
        exact = fitness(teacher.query(space.project(Z), "train", rows), data.train.label, "ce")
        fitnesses[name] = student.predict_fitness(Z, rows)
        ranks[name] = spearman(fitnesses[name], exact)
        # Ranking and gradient come from one function: the derivative it claims is the one its fitness has
        # (single candidates: a population of one leaves the noise's amplitude as the last population set it).
        loss, grad = student.grad_z(z)
        assert loss == pytest.approx(float(student.predict_fitness(z[None], rows)[0]), rel=1e-5)
        u, eps = grad / np.linalg.norm(grad), 1e-3
        plus, minus = (student.predict_fitness((z + s * eps * u)[None], rows)[0] for s in (1, -1))
        assert (plus - minus) / (2 * eps) == pytest.approx(float(np.linalg.norm(grad)), rel=5e-2)
    assert ranks["oracle"] == pytest.approx(1.0)
    assert ranks["oracle"] > ranks["oracle:0.3"] > ranks["oracle:3"]
    assert ranks["oracle:0.3"] > 0.8 and ranks["oracle:3"] < 0.6
    # The noise is fixed by the run's seed: a second student of the same config predicts the same.
    config = tiny_config(**{"model.student": "oracle:3"})
    again = make_student(config, load_task(config.task, config.seed))
    _teacher_and_space(config, again)
    np.testing.assert_allclose(again.predict_fitness(Z), fitnesses["oracle:3"], rtol=1e-5)


def test_a_noisy_oracles_noise_follows_each_population_it_ranks_and_survives_a_restart(tiny_config):
    config = tiny_config(**{"model.student": "oracle:2"})
    student = make_student(config, load_task(config.task, config.seed))
    data, _, _ = _teacher_and_space(config, student)
    rows = np.arange(len(data.train))
    rng = np.random.default_rng(5)
    center = rng.normal(size=8)
    for width in (1.0, 0.05):  # the first population, and one after the search has narrowed twentyfold
        Z = center + width * rng.normal(size=(17, 8))
        noisy = student.predict_fitness(Z, rows)
        exact = student._exact_fitness(student._z(Z), rows).detach().numpy()
        noise = noisy - exact
        assert noise.std() == pytest.approx(2 * exact.std(), rel=1e-2)  # S times the oracle's spread, at every width
    restarted = make_student(config, data)
    restarted.load_state(student.state())
    z = rng.normal(size=8)
    np.testing.assert_allclose(restarted.grad_z(z)[1], student.grad_z(z)[1], rtol=1e-5)


def test_a_sibling_starts_as_the_teachers_first_blocks_and_distils_its_projection_and_head(tiny_config, tiny_models):
    from transformers import AutoModelForCausalLM

    config = tiny_config(**{"model.student": "sibling:1"})
    data = load_task(config.task, config.seed)
    sibling = make_student(config, data)
    assert len(sibling.model.lm.transformer_layers()) == 1
    data, teacher, space = _teacher_and_space(config, sibling)
    # Before any step: the first block, the final norm and the verbalizer rows of the head, fed the teacher's prompt.
    full = AutoModelForCausalLM.from_pretrained(tiny_models["causal"])
    lm = sibling.model.lm
    z = np.random.default_rng(2).normal(size=8)
    enc, row = lm.encoded["train"], 3
    embeds = torch.cat([lm.embeddings(torch.tensor(enc.before[row], dtype=torch.long)),
                        torch.as_tensor(space.project(z)[0]), lm.embeddings(torch.tensor(enc.after[row], dtype=torch.long))])
    with torch.no_grad():
        hidden = full.model(inputs_embeds=embeds[None], output_hidden_states=True).hidden_states[1]
        expected = full.lm_head(full.model.norm(hidden))[0, len(enc.before[row]) + 2 + enc.slot[row]]
    got = sibling.predict(z, "train", np.array([row]))[0]
    np.testing.assert_allclose(got, expected[lm.verbalizer_ids].numpy(), rtol=1e-4, atol=1e-5)
    # Distillation moves the projection and the residual head, and lowers the KD loss on what it saw.
    rows = np.arange(len(data.train))
    Z = np.random.default_rng(3).normal(size=(4, 8))
    answers = teacher.query(space.project(Z), "train", rows)
    batch = DistillBatch(np.repeat(Z, len(rows), 0), np.tile(rows, 4), answers.reshape(-1, 2).astype(np.float32),
                         np.tile(data.train.label, 4))
    first = sibling.train_steps([batch])
    last = sibling.train_steps([batch] * 30)
    assert last < first
    assert not np.allclose(sibling.model.A.detach().numpy(), space.A)
    assert float(sibling.model.lm.head.weight.detach().abs().sum()) > 0


def test_gp_student_interpolates_the_answers_and_its_gradient_is_the_posterior_means(tiny_config):
    config = tiny_config(**{"model.student": "gp", "student.gp_nugget": 1e-6})
    data = load_task(config.task, config.seed)
    gp = make_student(config, data)
    assert isinstance(gp, GPStudent)
    rows = np.arange(len(data.train))
    assert gp.grad_z(np.zeros(8))[1].tolist() == [0.0] * 8  # no answers yet: the prior, flat
    rng = np.random.default_rng(4)
    Z = rng.normal(size=(12, 8))
    logits = rng.normal(size=(12, len(rows), 2))
    gp.observe(Z[:6], logits[:6], rows)
    gp.observe(Z[6:], logits[6:], rows)
    np.testing.assert_allclose(gp.predict_fitness(Z, rows), fitness(logits, data.train.label, "ce"), rtol=1e-3)
    sub = rows[[1, 4]]
    np.testing.assert_allclose(gp.predict_fitness(Z[:3], sub), fitness(logits[:3][:, sub], data.train.label[sub], "ce"),
                               rtol=1e-3)
    z = Z.mean(0) + 0.1
    loss, grad = gp.grad_z(z)
    eps = 1e-5
    fd = [(gp.predict_fitness((z + eps * e)[None])[0] - gp.predict_fitness((z - eps * e)[None])[0]) / (2 * eps)
          for e in np.eye(8)]
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-7)
    assert loss == pytest.approx(gp.predict_fitness(z[None])[0])
    assert gp.predict(z, "test", np.arange(3)) is None
    restored = GPStudent(config, data)
    restored.load_state(gp.state())
    np.testing.assert_array_equal(restored.grad_z(z)[1], grad)
    with pytest.raises(ValueError, match="every train row"):
        gp.observe(Z[:1], logits[:1, :3], rows[:3])


def test_gp_student_takes_read_only_arrays_from_the_object_store_without_a_warning(tiny_config):
    import warnings

    config = tiny_config(**{"model.student": "gp"})
    data = load_task(config.task, config.seed)
    gp, rows = make_student(config, data), np.arange(len(data.train))
    Z = np.random.default_rng(0).normal(size=(4, 8))
    logits = np.random.default_rng(1).normal(size=(4, len(rows), 2))
    rows = rows.copy()
    for array in (Z, logits, rows):
        array.flags.writeable = False  # as ray.get returns a numpy array
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gp.observe(Z, logits, rows)
        gp.predict_fitness(Z, rows)
        gp.grad_z(Z[0])


def test_gp_keeps_only_the_newest_answers(tiny_config):
    config = tiny_config(**{"model.student": "gp", "student.buffer_candidates": 5})
    data = load_task(config.task, config.seed)
    gp = make_student(config, data)
    rows = np.arange(len(data.train))
    Z = np.arange(7 * 8, dtype=float).reshape(7, 8)
    gp.observe(Z, np.zeros((7, len(rows), 2)), rows)
    np.testing.assert_array_equal(gp.state()["X"], Z[2:])


@pytest.mark.parametrize("student", ["oracle", "oracle:1", "sibling:1", "gp"])
def test_gdfo_runs_with_every_student_and_resumes_after_a_crash(tiny_config, tmp_path, crash_after, student):
    full = run(tiny_config(output_dir=str(tmp_path / "full"), **{"model.student": student}), progress=None)
    summary = json.load(open(os.path.join(full.output_dir, "summary.json")))
    assert summary["calls"] <= 24 and summary["median_fidelity"] is not None
    assert ("student" in summary["test"]) == (student != "gp")  # a GP has no test score of its own
    if student == "oracle":
        assert summary["median_fidelity"] == pytest.approx(1.0)
        assert all(np.isnan(r["kd_loss"]) for r in full.history)
    # Cut after generation 2, resumed: the same run (the student's state, space and answers travel).
    config = tiny_config(output_dir=str(tmp_path / "cut"), **{"model.student": student})
    crash_after(2)
    with pytest.raises(crash_after.error):
        run(config, progress=None)
    crash_after(None)
    resumed = run(config, resume=True, progress=None)
    np.testing.assert_allclose([r["rho"] for r in resumed.history], [r["rho"] for r in full.history], rtol=1e-5)
    np.testing.assert_allclose(resumed.best_z, full.best_z, rtol=1e-5)
