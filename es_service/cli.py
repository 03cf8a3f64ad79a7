"""``es-service``: train, resume and evaluate ES runs; submit them to a Ray cluster.

Exit codes: 0 done, 1 the run failed (no workers, cluster unreachable, theta diverged, disk full),
2 bad input (config, data, checkpoint, run directory, arguments), 130 interrupted (a checkpoint was
written; `es-service resume RUN_DIR` continues; before the first generation nothing was: run the command
again). Every error is one line: the problem and the fix.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
from pathlib import Path

# Everything else is imported inside main(), where a SIGINT that arrives while it loads is answered
# with one line rather than a traceback.

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like every other refusal (argparse's usage block would bury it)."""
        self.exit(2, f"es-service: error: {self.prog}: {message}; see `{self.prog} --help`\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: use an integer >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (0 < value < math.inf):  # also refuses nan, which every comparison would let through
        raise argparse.ArgumentTypeError(f"{text}: use a finite number > 0")
    return value


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set es.noise_std=0.01 (repeatable)",
    )
    parser.add_argument("--address", help="Ray cluster address (default: a local embedded Ray, or $RAY_ADDRESS)")
    parser.add_argument("--executor", choices=("ray", "local"), help="override workers.executor")
    parser.add_argument("--data-dir", help="MNIST folder (raw or .gz files); overrides data_dir and $ES_DATA_DIR")
    parser.add_argument(
        "--stop-after",
        type=_positive_int,
        metavar="N",
        help="run at most N generations in this invocation, then checkpoint",
    )
    parser.add_argument(
        "--time-budget",
        type=_positive_float,
        metavar="SECONDS",
        help="stop after the generation that passes this wall time, then checkpoint",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--problem",
        metavar="MODULE:CLASS",
        help="train a Problem of your own (built with no arguments, e.g. examples.spirals:Spirals) instead of "
        "the seed's network; resume reads it from run.json",
    )


def _init_from_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--init-from",
        type=Path,
        metavar="CHECKPOINT",
        help="start from this checkpoint's theta (another run's, e.g. a backprop run's) instead of "
        "the seed's initialisation; the optimizer and schedules start fresh",
    )


def build_parser() -> argparse.ArgumentParser:
    from es_service import jobs
    from es_service.config import DEVICES, GRADIENTS

    parser = _Parser(prog="es-service", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="start a run from a YAML config")
    train.add_argument("--config", required=True, help="YAML config file (fields: docs/configuration.md)")
    train.add_argument("--run-dir", help="where the run writes (default runs/<config>-<time>)")
    train.add_argument("--force", action="store_true", help="replace an existing run directory")
    _init_from_option(train)
    _run_options(train)
    resume = commands.add_parser(
        "resume", help="continue a run (ES, a hybrid's warm start, or backprop) from its last checkpoint"
    )
    resume.add_argument("run_dir")
    _run_options(resume)
    evaluate = commands.add_parser("eval", help="train and test accuracy of a checkpoint (and test with no flushing)")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    backprop = commands.add_parser("backprop", help="the ablation's backprop row: same network, autograd + Adam")
    backprop.add_argument("--config", required=True)
    backprop.add_argument("--run-dir", required=True)
    backprop.add_argument("--force", action="store_true")
    backprop.add_argument("--epochs", type=_positive_int, default=10)
    backprop.add_argument("--learning-rate", type=_positive_float, default=1e-3)
    backprop.add_argument("--time-budget", type=_positive_float, metavar="SECONDS")
    backprop.add_argument("--device", choices=DEVICES, default="auto")
    backprop.add_argument(
        "--gradient",
        choices=GRADIENTS,
        default="masked",
        help="masked: autograd through the flushes (flushed elements pass no gradient); "
        "straight-through: the linear network's gradient, as the seed's TensorFlow computed it",
    )
    _init_from_option(backprop)
    backprop.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    report = commands.add_parser("report", help="table and learning-curve PNG comparing run directories")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--plot", default="report.png", help="PNG to write (default report.png)")
    jobs.add_commands(commands)
    return parser


def _overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.executor:
        overrides.append(f"workers.executor={args.executor}")
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    return overrides


def _dispatch(args) -> dict:
    from es_service import backprop_runs, jobs, runner
    from es_service.config import load
    from es_service.problems import load_problem
    from es_service.rundir import read_run_info

    if args.command in jobs.COMMANDS:
        return jobs.dispatch(args)
    if args.command == "train":
        config = load(args.config, _overrides(args))
        run_dir = Path(args.run_dir) if args.run_dir else runner.default_run_dir(args.config)
        problem = load_problem(args.problem) if args.problem else None
        return runner.train(
            config,
            run_dir,
            args.force,
            args.address,
            args.stop_after,
            args.time_budget,
            args.quiet,
            args.init_from,
            problem,
        )
    if args.command == "resume":
        spec = args.problem or (read_run_info(Path(args.run_dir)) or {}).get("problem")
        problem = load_problem(spec) if spec else None
        return runner.resume(
            Path(args.run_dir), _overrides(args), args.address, args.stop_after, args.time_budget, args.quiet, problem
        )
    if args.command == "eval":
        return runner.evaluate_checkpoint(Path(args.checkpoint), args.data_dir, args.device)
    if args.command == "backprop":
        config = load(args.config, args.overrides)
        return backprop_runs.backprop(
            config,
            Path(args.run_dir),
            args.force,
            args.epochs,
            args.learning_rate,
            args.time_budget,
            args.device,
            args.gradient,
            args.init_from,
        )
    if args.command == "report":
        from es_service.report import report

        print(report([Path(p) for p in args.run_dirs], Path(args.plot)))
        return None
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # SIGINT before a run installs its handlers (while loading, before the first generation): what
        # was being built is removed on the way out, and there is no checkpoint to continue from
        print("es-service: interrupted before the first generation; run the command again", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from es_service.checkpoint import CheckpointError
    from es_service.config import ConfigError
    from es_service.data import DataError
    from es_service.driver import Diverged
    from es_service.metrics import MetricsError
    from es_service.report import ReportError
    from es_service.rundir import LockedError, WriteError
    from es_service.runs import RunFailed, UsageError
    from es_service.stopping import Interrupted
    from es_workers.problem import ProblemError

    try:
        result = _dispatch(args)
    except (ConfigError, DataError, CheckpointError, UsageError, ReportError, MetricsError, LockedError) as err:
        print(f"es-service: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ProblemError as err:  # from a Ray worker it comes wrapped, its message in the cause
        print(f"es-service: error: {getattr(err, 'cause', err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as err:
        print(f"es-service: {err}; continue with `es-service resume`", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (Diverged, RunFailed, WriteError) as err:
        print(f"es-service: error: run failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:
        if err.errno != errno.ENAMETOOLONG:
            raise
        # a path argument no file system accepts: Path.exists and is_file raise rather than answer
        print(f"es-service: error: a path is too long ({err.strerror}); pass a shorter one", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        if type(err).__name__ != "NoWorkersError":  # ray_executor is imported only when Ray runs
            raise
        print(f"es-service: error: run failed: {err}; a checkpoint was written", file=sys.stderr)
        return EXIT_FAILED
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
