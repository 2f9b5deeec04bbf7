"""``gdfo``: the command line. Parsing happens in :func:`main`, never at import."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Optional, Sequence

from gdfo_ray.config import (METHODS, GDFOConfig, build_config_dict, deep_merge, flatten_config, parse_sets,
                             read_config_file, resumed_config_dict, setting_differences)
from gdfo_ray.exceptions import GDFOError, ResumeError

log = logging.getLogger("gdfo_ray")


class _BaseCommand:
    help = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def take_action(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


class _Run(_BaseCommand):
    help = "Tune a prompt for one task with one method (a YAML config plus flag overrides)."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", help="YAML file with a GDFOConfig (sections task, model, search, ...)")
        parser.add_argument("--task", help="preset (sst2, yelp_polarity, ag_news, dbpedia, mrpc, snli, rte) or custom name")
        parser.add_argument("--method", choices=METHODS)
        parser.add_argument("--teacher", help="HF model id or local path of the black-box teacher, the URL of a "
                            "service (gdfo serve; its token comes from $GDFO_TEACHER_TOKEN), or a .npz of answers "
                            "recorded with --set model.record_answers=FILE, played back")
        parser.add_argument("--student", help="HF model id or local path of the student, or oracle, oracle:S, sibling:K, gp")
        parser.add_argument("--budget", type=int, help="black-box calls on the train batch")
        parser.add_argument("--seed", type=int)
        parser.add_argument("--data-dir", help="BBT-layout data root (default: $GDFO_DATA_DIR, else the HF Hub)")
        parser.add_argument("--train-file")
        parser.add_argument("--dev-file")
        parser.add_argument("--test-file")
        parser.add_argument("--output-dir", help="results directory (default runs/<task>_<method>_seed<seed>)")
        parser.add_argument("--backend", choices=("ray", "local"))
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in --output-dir with the settings it was saved with")
        parser.add_argument("--overwrite", action="store_true", help="start over in a directory holding a run")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="any config field, e.g. --set search.popsize=10 (repeatable)")

    def take_action(self, args: argparse.Namespace) -> int:
        config = build_config(args)
        from gdfo_ray.api import run

        run(config, resume=args.resume, overwrite=args.overwrite,
            progress=lambda line: print(line, file=sys.stderr, flush=True))
        return 0


def defaults(cls: type) -> dict:
    """A dataclass's field defaults: the one source of the CLI's defaults for its settings."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


RUN_FLAGS = {"task": "task.name", "method": "method", "teacher": "model.teacher", "student": "model.student",
             "budget": "search.budget_calls", "seed": "seed", "data_dir": "task.data_dir",
             "train_file": "task.train_file", "dev_file": "task.dev_file", "test_file": "task.test_file",
             "output_dir": "output_dir", "backend": "pool.backend"}


def build_config(args: argparse.Namespace) -> GDFOConfig:
    """The YAML file (if any), then the flags, then ``--set`` overrides, validated once at the end.

    With ``--resume``, over the settings the run in the output directory was saved with rather
    than the defaults: a flag given beside it must agree with them, and one that would change
    the run's result is refused by name.
    """
    data = read_config_file(args.config) if args.config else {}
    given: dict = {}  # dotted key -> (value, how the user gave it)
    for attr, key in RUN_FLAGS.items():
        value = getattr(args, attr)
        if value is not None:
            given[key] = (value, "--" + attr.replace("_", "-"))
    given.update({key: (value, f"--set {key}") for key, value in parse_sets(args.set).items()})
    overrides = {key: value for key, (value, _) in given.items()}

    def over(base: dict) -> GDFOConfig:
        return GDFOConfig.from_dict(build_config_dict(overrides=overrides, sections=deep_merge(base, data)))

    if not getattr(args, "resume", False):
        return over(GDFOConfig().to_dict())
    from gdfo_ray.api import saved_run_config

    out = args.output_dir or data.get("output_dir") or over(GDFOConfig().to_dict()).default_output_dir()
    saved = saved_run_config(out)
    if saved is None:
        raise GDFOError(f"Nothing to resume: {out} holds no saved run (no checkpoint.pkl). Pass the --output-dir of "
                        "the run to continue.")
    resumed = over({**resumed_config_dict(saved), "output_dir": out})
    conflicts = setting_differences(saved, resumed)
    if conflicts:
        file_keys = set(flatten_config(data))
        named = [given[k][1] if k in given else (f"{k} in --config {args.config}" if k in file_keys else k)
                 for k in conflicts]
        raise ResumeError(f"Cannot resume {out}: {', '.join(named)} would change the saved run "
                          f"({', '.join(conflicts)}). Resume with --output-dir and --resume alone to take its "
                          "settings, or start a new run in another --output-dir.")
    return resumed


class _Serve(_BaseCommand):
    help = "Serve a local LM as a black box over HTTP (verbalizer logits only; bearer token; batching)."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from gdfo_ray.serve import ServeConfig

        d = ServeConfig(model="x")
        parser.add_argument("--model", help="HF model id or local path to serve")
        parser.add_argument("--host", default=d.host, help="interface to listen on (0.0.0.0 for every one)")
        parser.add_argument("--port", type=int, default=d.port, help="0 picks a free port")
        parser.add_argument("--token", help="bearer token clients must send (default: $GDFO_SERVE_TOKEN, "
                            "else a generated one, printed once)")
        parser.add_argument("--kind", default=d.kind, choices=("auto", "causal_lm", "masked_lm"))
        parser.add_argument("--dtype", default=d.dtype, choices=("auto", "float32", "bfloat16", "float16"),
                            help="auto: bfloat16 where the processor computes it natively")
        parser.add_argument("--device", default=d.device)
        parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: every core)")
        parser.add_argument("--max-batch-rows", type=int, default=d.max_batch_rows,
                            help="(prompt x input) rows one forward takes across concurrent requests")
        parser.add_argument("--max-inputs", type=int, default=d.max_inputs, help="inputs per request")
        parser.add_argument("--max-text-chars", type=int, default=d.max_text_chars)
        parser.add_argument("--max-text-tokens", type=int, default=d.max_text_tokens)
        parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
        parser.add_argument("--max-queue", type=int, default=d.max_queue, help="queued calls before 429")
        parser.add_argument("--rate-limit", type=float, help="calls per second accepted (429 above)")
        parser.add_argument("--rate-burst", type=int, default=d.rate_burst,
                            help="units the limit lets through at once (the heaviest request it can ever admit)")
        parser.add_argument("--rate-unit", default=d.rate_unit, choices=("calls", "rows", "tokens"),
                            help="what --rate-limit counts: calls (default), rows (prompt x input) or tokens")
        parser.add_argument("--max-body-mb", type=float, default=d.max_body_mb, help="largest request body")
        parser.add_argument("--body-timeout", type=float, default=d.body_timeout_s, dest="body_timeout_s",
                            help="seconds a request's body may take to arrive (408 after)")
        parser.add_argument("--idempotency-cache", type=int, default=d.idempotency_cache,
                            help="answers kept for retried calls (by Idempotency-Key)")
        parser.add_argument("--idempotency-cache-mb", type=float, default=d.idempotency_cache_mb,
                            help="memory those answers may take together (MB)")
        parser.add_argument("--simulate-latency", type=float, dest="simulate_latency_s",
                            help="serve a simulated black box with this latency (s) instead of a model")
        parser.add_argument("--simulate-hidden", type=int, default=d.simulate_hidden,
                            help="hidden size of the simulated black box")
        parser.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace_s, dest="shutdown_grace_s",
                            help="seconds requests in flight may take to finish after Ctrl-C")

    def take_action(self, args: argparse.Namespace) -> int:
        from gdfo_ray.serve import ServeConfig, serve

        fields = ("model", "host", "port", "token", "kind", "dtype", "device", "threads", "max_batch_rows",
                  "max_inputs", "max_text_chars", "max_text_tokens", "max_prompt_tokens", "max_queue", "rate_limit",
                  "rate_burst", "rate_unit", "max_body_mb", "body_timeout_s", "idempotency_cache",
                  "idempotency_cache_mb", "simulate_latency_s", "simulate_hidden", "shutdown_grace_s")
        serve(ServeConfig(**{f: getattr(args, f) for f in fields}),
              say=lambda line: print(line, file=sys.stderr, flush=True))
        return 0


class _Bench(_BaseCommand):
    help = ("Run a campaign: every task x seed x method cell as a Ray task, results in a Parquet dataset; "
            "a rerun skips finished cells.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tasks", nargs="+", required=True, help="presets or custom task names")
        parser.add_argument("--seeds", nargs="+", required=True, help="run seeds (also the few-shot split seeds)")
        from gdfo_ray.config import RUN_LABELS

        parser.add_argument("--methods", nargs="+", required=True, choices=RUN_LABELS, metavar="METHOD",
                            help=f"any of {list(RUN_LABELS)} (gdfo_random: gdfo with harmonize.control=random)")
        parser.add_argument("--budget", type=int, help="black-box calls per cell (default: the config's)")
        parser.add_argument("--results", default="campaign", help="campaign directory (default: ./campaign)")
        parser.add_argument("--config", help="YAML config every cell starts from")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config field of every cell (repeatable)")
        from gdfo_ray.campaign import SPLIT_SEED_MODES, CampaignConfig

        d = defaults(CampaignConfig)
        parser.add_argument("--split-seeds", default=d["split_seeds"], choices=SPLIT_SEED_MODES,
                            help="auto: a task without a split for a seed uses one of its other splits")
        parser.add_argument("--cell-cpus", type=float, default=d["cell_cpus"],
                            help="CPUs per cell (also its torch threads); default: a whole node per cell "
                                 "(campaign.cell_threads: measured with benchmarks/campaign_fill.py)")
        parser.add_argument("--cell-gpus", type=float, default=d["cell_gpus"], help="GPUs per cell")
        parser.add_argument("--max-retries", type=int, default=d["max_retries"],
                            help="reruns of a cell whose worker died")
        parser.add_argument("--reuse", metavar="DIR",
                            help="an earlier campaign directory: its finished cells whose settings match are copied "
                                 "in instead of run again (a bbt cell pairs with a new student's gdfo cells)")
        parser.add_argument("--ray-address",
                            help="cluster to join, or 'local' to start Ray here (default: $RAY_ADDRESS, else the "
                                 "one `ray start` registered on this machine, else Ray starts here)")

    @staticmethod
    def campaign(args: argparse.Namespace):
        """The :class:`~gdfo_ray.campaign.CampaignConfig` the flags describe."""
        from gdfo_ray.campaign import CampaignConfig, seeds_from

        return CampaignConfig(args.results, tuple(args.tasks), seeds_from(args.seeds), tuple(args.methods),
                              budget=args.budget, base=build_config_dict(args.config, sets=args.set),
                              split_seeds=args.split_seeds, cell_cpus=args.cell_cpus, cell_gpus=args.cell_gpus,
                              max_retries=args.max_retries, ray_address=args.ray_address, reuse=args.reuse)

    def take_action(self, args: argparse.Namespace) -> int:
        from gdfo_ray.campaign import run_campaign

        campaign = self.campaign(args)
        result = run_campaign(campaign, say=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"[bench] {len(result.finished)} cells finished now, {len(result.skipped)} before, "
              f"{len(result.failed)} failed; results in {campaign.results_dir}", file=sys.stderr)
        if result.failed:
            print("[bench] failed cells (rerun the same command to retry them): "
                  + ", ".join(sorted(result.failed)), file=sys.stderr)
            return 1
        return 0


class _Tune(_BaseCommand):
    help = ("Ray Tune sweep of a method's hyperparameters on the dev set (Optuna proposes, ASHA stops weak "
            "trials); writes trials.parquet and best_config.yaml.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", help="YAML config every trial starts from")
        parser.add_argument("--task", help="preset or custom task name")
        parser.add_argument("--method", choices=METHODS)
        parser.add_argument("--teacher", help="HF model id, local path or service URL of the black box")
        parser.add_argument("--budget", type=int, help="train calls per trial (ASHA's maximum)")
        parser.add_argument("--seed", type=int)
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config field of every trial (repeatable)")
        from gdfo_ray.tune import TuneSettings

        d = defaults(TuneSettings)
        parser.add_argument("--samples", type=int, default=d["num_samples"], help="number of trials")
        parser.add_argument("--space", help="YAML {dotted.key: {uniform|loguniform|randint|choice: args}} "
                            "replacing the method's default space")
        parser.add_argument("--name", default=d["name"], help="experiment name")
        parser.add_argument("--storage", default=d["storage_dir"], help="where experiments are kept")
        parser.add_argument("--resume", action="store_true",
                            help="continue the experiment --name in --storage with its saved settings (Tuner.restore)")
        parser.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
        parser.add_argument("--grace-calls", type=int, help="calls before ASHA may stop a trial (default budget/4)")
        parser.add_argument("--reduction-factor", type=int, default=d["reduction_factor"])
        parser.add_argument("--total-calls", type=int, help="train calls all trials may spend together")
        parser.add_argument("--trial-cpus", type=float, default=d["trial_cpus"],
                            help="CPUs per trial (pool.backend=local)")
        parser.add_argument("--trial-gpus", type=float, default=d["trial_gpus"])
        parser.add_argument("--search-seed", type=int, default=d["seed"], help="Optuna sampler seed")

    def take_action(self, args: argparse.Namespace) -> int:
        from gdfo_ray.tune import TuneSettings, tune_run

        def say(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        if args.resume:  # the sweep's own settings, whatever the other flags say
            tune_run(TuneSettings.load(args.storage, args.name), resume=True, say=say)
            return 0
        tune_run(self.settings(args), say=say)
        return 0

    @staticmethod
    def settings(args: argparse.Namespace):
        """The :class:`~gdfo_ray.tune.TuneSettings` the flags describe."""
        from gdfo_ray.tune import TuneSettings

        overrides = {"pool.backend": "local"}  # trials run their pools in-process unless --set says otherwise
        flags = {"task": "task.name", "method": "method", "teacher": "model.teacher", "budget": "search.budget_calls",
                 "seed": "seed"}
        overrides.update({key: getattr(args, attr) for attr, key in flags.items() if getattr(args, attr) is not None})
        base = build_config_dict(args.config, overrides, sets=args.set)
        space = read_config_file(args.space) if args.space else None
        return TuneSettings(base, space=space, num_samples=args.samples, storage_dir=args.storage, name=args.name,
                            max_concurrent=args.max_concurrent, grace_calls=args.grace_calls,
                            reduction_factor=args.reduction_factor, total_calls=args.total_calls,
                            trial_cpus=args.trial_cpus, trial_gpus=args.trial_gpus, seed=args.search_seed)


class _Report(_BaseCommand):
    help = "Summarize a campaign: a Markdown table (mean ± std over seeds per task and method) and PNG plots."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("results", nargs="+", help="campaign directory of gdfo bench (several with --ladder)")
        parser.add_argument("--out", help="where report.md and the plots go (default: RESULTS/report)")
        parser.add_argument("--ladder", action="store_true",
                            help="one campaign directory per student: gdfo − bbt against each student's median "
                                 "fidelity (ladder.md, ladder.png; --out is required)")
        parser.add_argument("--control", metavar="DIR",
                            help="with --ladder: a campaign whose gdfo_random cells pair with every rung that ran "
                                 "none (the random control does not read its student)")

    def take_action(self, args: argparse.Namespace) -> int:
        from gdfo_ray.report import build_report, ladder_report

        if args.ladder:
            if not args.out:
                raise GDFOError("gdfo report --ladder needs --out DIR for ladder.md and ladder.png.")
            path = ladder_report(args.results, args.out, control_dir=args.control)
        elif args.control:
            raise GDFOError("gdfo report --control pairs a ladder's rungs with a shared control: it needs --ladder.")
        elif len(args.results) > 1:
            raise GDFOError("gdfo report takes one campaign directory; pass --ladder to compare several students.")
        else:
            path = build_report(args.results[0], args.out)
        with open(path) as f:
            print(f.read())
        print(f"[report] written to {path}", file=sys.stderr)
        return 0


_COMMANDS = {"run": _Run, "serve": _Serve, "tune": _Tune, "bench": _Bench, "report": _Report}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gdfo", description="Prompt tuning of black-box LMs by GDFO on Ray.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, cls in _COMMANDS.items():
        command = cls()
        command.add_arguments(sub.add_parser(name, help=cls.help, description=cls.help))
        commands[name] = command
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    try:
        return commands[args.command].take_action(args)
    except GDFOError as e:
        if args.debug:
            raise
        print(f"gdfo {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gdfo: interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
