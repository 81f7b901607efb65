"""The command line: ``distill-pipeline demo | simulate | import | gold | predict | serve``.

A mistake of the user's (a path, a column, a value: :class:`UsageError` from the domain code, a
missing file, a bad option) is one line on stderr with exit status 2; anything else is a bug,
reported in one line (exit status 1) unless ``--debug`` asks for its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import NoReturn

from distill_pipeline.core.errors import UsageError

PROG = "distill-pipeline"
#: The exceptions that are the user's to fix; each names the problem and the fix in its message.
USER_ERRORS = (UsageError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _demo(args: argparse.Namespace) -> int:
    from distill_pipeline.core.store import open_store
    from distill_pipeline.core.task import load_task
    from distill_pipeline.data.splitting import TrainSize
    from distill_pipeline.demo.main_job import (
        TARGETS,
        StageFailed,
        plan_runs,
        prepare_dagster_home,
        results_tables,
        run_plan,
        summary_table,
    )
    from distill_pipeline.demo.simulator import simulate_traffic
    from distill_pipeline.logs.freshness import recent_days
    from distill_pipeline.students.devices import visible_gpus

    started = time.perf_counter()
    home = prepare_dagster_home(args.dagster_home)
    store = open_store(args.store)
    task = load_task(args.task)
    # The Dagster resources read these, so the runs use the same store and task as this command.
    os.environ["DISTILL_STORE"] = store.url
    os.environ["DISTILL_TASK"] = str(task.source)
    days = recent_days(args.days)
    print(f"store: {store.url}\nDAGSTER_HOME: {home}\ntask: {task.id}")
    if not args.no_simulate:
        summary = simulate_traffic(
            store,
            days=days,
            records_per_day=args.records_per_day,
            seed=args.seed,
            task=task,
            gold_fraction=args.gold_fraction,
        )
        print(
            f"simulated {summary.lines_written:,} log lines over {len(days)} days ({days[0]} .. {days[-1]}) "
            f"from {summary.users:,} users, {sum(summary.malformed.values()):,} malformed on purpose; "
            f"the simulated teacher is right on {summary.teacher_accuracy:.1%} of its answers"
        )
        if summary.gold_rows:
            print(
                f"gold table: the true labels of {summary.gold_rows:,} distinct inputs, as if people had labelled them"
            )
    from distill_pipeline.definitions import defs as load_defs

    definitions = load_defs()
    runs = plan_runs(definitions, TARGETS[args.stages], days)
    if args.stages == "all" and not visible_gpus():
        print(
            f"NOTICE: no GPU found: the {len(task.splits.train_sizes)} students train on CPU ({os.cpu_count()} cores), "
            f"{task.student.epochs} epoch(s) of the {task.student.student_kind} student each"
        )
    try:
        outcomes = run_plan(definitions, runs)
    except StageFailed as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 1
    print("\n" + summary_table(outcomes))
    if args.stages == "all":
        print("\n" + results_tables(store, [TrainSize.parse(size).key for size in task.splits.train_sizes]))
    print(f"\ndone in {time.perf_counter() - started:.1f}s. See the runs: DAGSTER_HOME={home} dagster dev")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from distill_pipeline.core.store import open_store
    from distill_pipeline.core.task import load_task
    from distill_pipeline.demo.simulator import simulate_traffic
    from distill_pipeline.logs.freshness import recent_days

    days = args.day or recent_days(args.days)
    summary = simulate_traffic(
        open_store(args.store),
        days=days,
        records_per_day=args.records_per_day,
        seed=args.seed,
        task=load_task(args.task),
        corpus_path=args.corpus,
        gold_fraction=args.gold_fraction,
    )
    gold = f"; gold table of {summary.gold_rows:,} inputs" if summary.gold_rows else ""
    print(f"wrote {summary.lines_written:,} lines in {len(summary.object_keys)} objects{gold}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from distill_pipeline.core.store import open_store
    from distill_pipeline.core.task import load_task
    from distill_pipeline.logs.importer import import_table, jigsaw_mapping, mapping_from_options

    if args.preset == "jigsaw":
        if args.map or args.constant:
            raise UsageError("--preset jigsaw sets the whole mapping: leave out --map and --constant")
        mapping = jigsaw_mapping()
    else:
        mapping = mapping_from_options(args.map, args.constant)
    summary = import_table(open_store(args.store), args.table, mapping, default_day=args.day, task=load_task(args.task))
    print(
        f"read {summary.rows_read:,} rows, wrote {summary.rows_written:,} log records in "
        f"{len(summary.object_keys)} objects; skipped {summary.skipped or 'none'}"
    )
    if summary.objects_removed:
        days = sorted({key.split("/")[1].removeprefix("dt=") for key in summary.objects_removed})
        print(
            f"removed {len(summary.objects_removed)} object(s) an earlier import of this table wrote on "
            f"{', '.join(days)}; re-materialise raw_logs for those days"
        )
    return 0


def _gold(args: argparse.Namespace) -> int:
    from distill_pipeline.core.layout import GOLD_LABELS
    from distill_pipeline.core.store import open_store
    from distill_pipeline.core.task import load_task
    from distill_pipeline.data.gold import GoldTableError, gold_table_from, publish_gold_table
    from distill_pipeline.logs.importer import read_source_table

    task = load_task(args.task)
    try:
        gold = gold_table_from(
            read_source_table(args.table),
            task.label,
            text_column=args.text_column,
            label_column=args.label_column,
            test_set_column=args.test_set_column,
        )
    except GoldTableError as exc:
        raise GoldTableError(f"{args.table}: {exc}") from exc
    store = open_store(args.store)
    kept = publish_gold_table(store, gold)
    counts = gold.group_by("gold_label").aggregate([("gold_label", "count")]).to_pylist()
    by_label = ", ".join(f"{task.label.name_of(c['gold_label'])} {c['gold_label_count']:,}" for c in counts)
    print(f"wrote {gold.num_rows:,} gold rows ({by_label}) to {store.url}/{GOLD_LABELS}")
    if kept:
        print(f"the gold table it replaced is kept at {store.url}/{kept}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from distill_pipeline.core.store import open_store
    from distill_pipeline.students.adapters import resolve_adapter
    from distill_pipeline.students.predict import (
        label_table,
        load_adapter_student,
        read_table_to_label,
        student_predictor,
    )

    # The table is read and checked before the model loads: a typo costs no wait.
    table, texts = read_table_to_label(Path(args.input), args.text_column, Path(args.output))
    with tempfile.TemporaryDirectory(prefix="distill-predict-") as directory:
        store = None if Path(args.adapter).expanduser().exists() else open_store(args.store)
        adapter = resolve_adapter(args.adapter, store, Path(directory))
        student = load_adapter_student(adapter, device=args.device, log=lambda message: print(message, file=sys.stderr))
        predictor = student_predictor(student, args.batch_size, prior=args.prior, log=print)
        rows = label_table(predictor, student.labels.names, table, texts, Path(args.output))
    print(f"labelled {rows:,} rows into {args.output}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from distill_pipeline.core.store import open_store
    from distill_pipeline.core.task import load_task
    from distill_pipeline.serving.app import HttpLimits
    from distill_pipeline.serving.server import ServeConfig, TeacherSettings, serve
    from distill_pipeline.serving.students import LoadSettings, SmokeSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # litellm logs every call at INFO; the server's own records say what each call did.
    for noisy in ("LiteLLM", "litellm", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    env = os.environ
    teacher_model = args.teacher or (env.get("DISTILL_TEACHERS", "").split(",")[0].strip() or None)
    teacher = None
    if teacher_model:
        teacher = TeacherSettings(
            model=teacher_model,
            prompt_id=args.teacher_prompt,
            api_base=args.teacher_api_base or env.get("DISTILL_TEACHER_API_BASE") or None,
            # Only from the environment: a key on the command line would show in `ps`.
            api_key=env.get("DISTILL_TEACHER_API_KEY") or None,
            rpm=args.teacher_rpm,
            max_concurrency=args.teacher_concurrency,
            timeout_s=args.teacher_timeout,
            deadline_s=args.teacher_timeout * 1.5,
            budget_usd=args.teacher_budget,
        )
    deployments = Path(args.deployments) if args.deployments else None
    if deployments is not None and not deployments.is_file():
        raise UsageError(f"no deployment file {args.deployments}: name a TOML or JSON file of [deployments.<name>]")
    config = ServeConfig(
        store=open_store(args.store),
        task=load_task(args.task),
        deployments_file=deployments,
        default_mode=args.mode,
        teacher=teacher,
        load=LoadSettings(
            device=args.device,
            decoder_upstream=args.decoder_upstream or env.get("DISTILL_SERVE_DECODER_UPSTREAM") or None,
            decoder_api_key=env.get("DISTILL_SERVE_DECODER_API_KEY") or None,
            smoke=SmokeSettings(tolerance=args.smoke_tolerance, max_rows=args.smoke_rows),
        ),
        poll_s=args.poll_s,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        limits=HttpLimits(
            max_body_bytes=args.max_body_bytes,
            max_input_chars=args.max_input_chars,
            input_mode=args.input_mode,
            max_in_flight=args.max_in_flight,
            admin_token=env.get("DISTILL_SERVE_ADMIN_TOKEN") or None,
        ),
        log_calls=not args.no_log,
        log_flush_s=args.log_flush_s,
    )
    serve(config, args.host, args.port)
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _prior(text: str) -> float | str | None:
    if text in ("auto", "train"):
        return None if text == "train" else text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto', 'train' or a share between 0 and 1")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line: the problem, and where the usage is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--store", help="store URL (default: $DISTILL_STORE or ./.distill_store)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--task", help="task id or folder (default: $DISTILL_TASK or toxicity)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="simulate traffic, then materialise every stage headless")
    demo.add_argument("--days", type=int, default=3, help="days of traffic, ending today (default 3)")
    demo.add_argument("--records-per-day", type=int, default=4_000)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--dagster-home", help="default: $DAGSTER_HOME or ./.dagster_home")
    demo.add_argument("--no-simulate", action="store_true", help="use the logs already in the store")
    demo.add_argument(
        "--gold-fraction",
        type=float,
        default=1.0,
        help="share of the simulated inputs whose true labels become the gold table (default 1: all)",
    )
    demo.add_argument(
        "--stages",
        choices=["all", "data"],
        default="all",
        help="all: through students, evaluation, ablation and champion (default); data: up to train_sets",
    )
    demo.set_defaults(run=_demo)

    simulate = commands.add_parser("simulate", help="write simulated teacher traffic into the store")
    simulate.add_argument("--days", type=int, default=1)
    simulate.add_argument("--day", action="append", help="a day to simulate (repeatable); overrides --days")
    simulate.add_argument("--records-per-day", type=int, default=10_000)
    simulate.add_argument("--seed", type=int, default=7)
    simulate.add_argument("--corpus", help="draw inputs and true labels from this table instead")
    simulate.add_argument(
        "--gold-fraction", type=float, default=0.0, help="write the true labels of this share of inputs as gold"
    )
    simulate.set_defaults(run=_simulate)

    importer = commands.add_parser("import", help="turn an existing table (CSV, Parquet, JSONL) into log objects")
    importer.add_argument("table")
    importer.add_argument("--preset", choices=["jigsaw"], help="a known column mapping")
    importer.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN")
    importer.add_argument("--constant", action="append", default=[], metavar="FIELD=VALUE")
    importer.add_argument("--day", help="day for rows without a timestamp (YYYY-MM-DD)")
    importer.set_defaults(run=_import)

    gold = commands.add_parser("gold", help="put a human-labelled table in the store for teacher_eval")
    gold.add_argument("table", help="a CSV, Parquet or JSONL file")
    gold.add_argument("--text-column", default="input")
    gold.add_argument("--label-column", default="gold_label", help="the task's label values or names")
    gold.add_argument("--test-set-column", help="names each row's test set (default: the frozen test sets' rows)")
    gold.set_defaults(run=_gold)

    predict = commands.add_parser("predict", help="label a table's texts with a trained student adapter")
    predict.add_argument(
        "--adapter",
        required=True,
        help="a local adapter folder, a published adapter prefix in the store, or 'champion'",
    )
    predict.add_argument("--input", required=True, help="a CSV, Parquet or JSONL table")
    predict.add_argument("--output", required=True, help="the .parquet file to write (not the input)")
    predict.add_argument("--text-column", default="input")
    predict.add_argument("--batch-size", type=_positive_int, default=32)
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument(
        "--prior",
        type=_prior,
        default="auto",
        help="the share of the positive label the table is expected to have (e.g. 0.1); 'auto' (default) "
        "estimates it from the table itself (EM on the student's probabilities, 100 rows or more); "
        "'train' keeps the training set's share",
    )
    predict.set_defaults(run=_predict)

    serve = commands.add_parser(
        "serve",
        help="serve the champion behind an OpenAI-compatible API, with the teacher as rollout and fallback",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--deployments", help="TOML or JSON file of [deployments.<name>] (mode, band, shares); re-read on change"
    )
    serve.add_argument(
        "--mode",
        choices=["dark", "hybrid", "canary", "full"],
        default="dark",
        help="without --deployments: the rollout of the one deployment, named after the task (default dark)",
    )
    serve.add_argument("--teacher", help="the teacher as a litellm model string (default: first of $DISTILL_TEACHERS)")
    serve.add_argument("--teacher-prompt", default="simple_prompt", help="the task prompt /v1/classify asks it with")
    serve.add_argument(
        "--teacher-api-base", help="default: $DISTILL_TEACHER_API_BASE; the key: $DISTILL_TEACHER_API_KEY"
    )
    serve.add_argument("--teacher-rpm", type=_positive_float, help="requests per minute the teacher allows")
    serve.add_argument("--teacher-concurrency", type=_positive_int, default=64, help="teacher calls in flight")
    serve.add_argument("--teacher-timeout", type=_positive_float, default=20.0, help="seconds per teacher call")
    serve.add_argument("--teacher-budget", type=_positive_float, help="the most this server may spend (USD)")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N for an in-process student")
    serve.add_argument(
        "--decoder-upstream",
        help="OpenAI-compatible server (vLLM --enable-lora, LoRAX) that serves decoder students by train id "
        "(default: $DISTILL_SERVE_DECODER_UPSTREAM)",
    )
    serve.add_argument("--poll-s", type=_positive_float, default=30.0, help="how often champion/current.json is read")
    serve.add_argument("--smoke-tolerance", type=float, default=0.02, help="accuracy a new champion may lose")
    serve.add_argument("--smoke-rows", type=_positive_int, help="test rows in the smoke test (default: all)")
    serve.add_argument("--max-batch", type=_positive_int, default=32, help="texts per forward pass")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for company")
    serve.add_argument("--max-queue", type=_positive_int, default=1024, help="texts waiting before 429s")
    serve.add_argument("--max-in-flight", type=_positive_int, default=512, help="requests at once before 503s")
    serve.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20)
    serve.add_argument("--max-input-chars", type=_positive_int, default=20_000)
    serve.add_argument("--input-mode", choices=["truncate", "refuse"], default="truncate", help="for longer inputs")
    serve.add_argument("--log-flush-s", type=_positive_float, default=5.0, help="longest a log record waits")
    serve.add_argument("--no-log", action="store_true", help="log no calls (a benchmark of the server alone)")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        _say(_user_message(exc))
        return 2
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        _say(f"a bug ({type(exc).__name__}: {exc}); rerun with --debug for the traceback and report it")
        return 1


def _user_message(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {(exc.strerror or str(exc)).lower()}"
    return str(exc)


def _say(message: str) -> None:
    """One line on stderr, whatever the message holds (a parser's message may quote a newline)."""
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
