"""Teacher-client benchmark: labelling throughput against a rate limit, a 429 storm, and a re-run.

Everything runs against the project's OpenAI-compatible test server on loopback
(``distill_pipeline_tests/openai_server.py``), reached by litellm over HTTP exactly as production
reaches OpenAI, with a fixed latency per answer and the provider's requests-per-minute limit
enforced by the server (a request over the limit in any 60-second window gets a 429). Phases:

1. **naive**: a plain sequential ``litellm.completion`` loop, with litellm's defaults, over a
   sample (``--naive-n``); its rate is extrapolated to the full size (stated in the table);
2. **pipeline**: ``TeacherClient`` over ``--n`` distinct inputs with ``rpm`` set to the limit:
   sustained answers per minute as a share of the limit (goal: at least 95%);
3. **storm**: ``--storm-n`` further inputs while the server refuses half of all requests with
   429 and ``Retry-After`` for ``--storm-s`` seconds: lost labels (inputs without an answer)
   and duplicate paid calls (the server answering the same request twice) must both be zero;
4. **re-run**: every input of phases 2 and 3 again, through a freshly opened ledger: the server
   must see zero requests.

    python bench/bench_teacher.py                 # 10,000 inputs at 600/min: about 20 minutes
    python bench/bench_teacher.py --n 600 --storm-n 300 --storm-s 10      # about 2 minutes
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_pipeline.ledger import Ledger
from distill_pipeline.store import LocalStore
from distill_pipeline.task import load_task
from distill_pipeline.teacher import ClientSettings, TeacherClient, TeacherSpec, render_messages
from distill_pipeline_tests.openai_server import control, running_server, server_stats

RESULTS = Path(__file__).parent / "results" / "teacher.md"
MODEL = "openai/gpt-4o-mini"
WORDS = [
    "the",
    "a",
    "article",
    "edit",
    "page",
    "talk",
    "please",
    "source",
    "you",
    "your",
    "idiot",
    "thanks",
    "wiki",
    "revert",
    "hate",
    "nice",
    "good",
    "stupid",
]


def make_inputs(n: int, seed: int, tag: str) -> list[str]:
    rng = random.Random(seed)
    return [f"{tag}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for i in range(n)]


def delta(after: dict, before: dict, name: str) -> int:
    return int(after[name]) - int(before[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="inputs of the throughput phase")
    parser.add_argument("--naive-n", type=int, default=900, help="inputs of the naive loop's sample")
    parser.add_argument("--storm-n", type=int, default=1_000, help="inputs of the storm phase")
    parser.add_argument("--storm-s", type=float, default=30.0, help="length of the 429 storm")
    parser.add_argument("--rpm", type=int, default=600, help="the provider's requests-per-minute limit")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    import litellm

    litellm.suppress_debug_info = True
    task = load_task("toxicity")
    template = task.prompt("simple_prompt")
    spec = TeacherSpec(MODEL, "simple_prompt", 0.0, max_tokens=32)
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        work = Path(tmp)
        store = LocalStore(work / "store")
        journal = work / "journal"
        with running_server(work / "server.log", latency_ms=args.latency_ms) as url:
            control(url, rpm_limit=args.rpm)
            api_base = url + "/v1"

            # 1. naive sequential loop on a sample
            naive_inputs = make_inputs(args.naive_n, 1, "naive")
            before = server_stats(url)
            started = time.monotonic()
            naive_ok = 0
            for text in naive_inputs:
                try:
                    litellm.completion(
                        model=MODEL, messages=render_messages(template, text), api_base=api_base, api_key="sk-bench",
                        temperature=0.0, max_tokens=32,
                    )  # fmt: skip
                    naive_ok += 1
                except Exception:  # the naive loop has no error handling: a failure is a lost label
                    pass
            naive_s = time.monotonic() - started
            after = server_stats(url)
            naive_requests = delta(after, before, "requests")
            naive_429 = after["by_status"].get("429", 0) - before["by_status"].get("429", 0)
            naive_rate = naive_ok / naive_s * 60
            naive_full_min = args.n / min(naive_rate, float(args.rpm)) if naive_ok else float("inf")
            # Let the naive loop's requests leave the server's 60-second window before the pipeline starts.
            time.sleep(min(60.0, naive_s) + 1.0)

            # 2. pipeline throughput
            settings = ClientSettings(
                api_base=api_base, api_key="sk-bench", rpm=args.rpm, max_concurrency=args.concurrency
            )
            inputs = make_inputs(args.n, 2, "main")
            before = server_stats(url)
            ledger = Ledger.open(store, journal)
            client = TeacherClient(settings, ledger, progress=lambda m: print(m, flush=True))
            started = time.monotonic()
            answers = client.label(spec, template, inputs)
            main_s = time.monotonic() - started
            ledger.close()
            after = server_stats(url)
            main_lost = sum(1 for a in answers if a.response is None)
            main_rate = (args.n - main_lost) / main_s * 60
            main_totals = client.totals

            # 3. the storm
            storm_inputs = make_inputs(args.storm_n, 3, "storm")
            time.sleep(1.0)
            storm_before = server_stats(url)
            ledger = Ledger.open(store, journal)
            client = TeacherClient(settings, ledger)
            control(url, storm={"duration_s": args.storm_s, "fraction": 0.5, "retry_after_s": 1.0})
            started = time.monotonic()
            storm_answers = client.label(spec, template, storm_inputs)
            storm_s = time.monotonic() - started
            ledger.close()
            storm_after = server_stats(url)
            storm_lost = sum(1 for a in storm_answers if a.response is None)
            storm_totals = client.totals

            # 4. re-run of everything through a fresh ledger
            rerun_before = server_stats(url)
            ledger = Ledger.open(store, journal)
            client = TeacherClient(settings, ledger)
            started = time.monotonic()
            rerun_answers = client.label(spec, template, inputs + storm_inputs)
            rerun_s = time.monotonic() - started
            ledger.close()
            rerun_after = server_stats(url)
            final = server_stats(url)

    rows += [
        ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {platform.system()}"),
        (
            "versions",
            f"Python {platform.python_version()}, litellm {version('litellm')}, openai {version('openai')}, "
            f"aiohttp {version('aiohttp')}",
        ),
        (
            "sizes",
            f"{args.n:,} inputs, naive sample {args.naive_n:,}, storm {args.storm_n:,} inputs / {args.storm_s:g} s",
        ),
        ("limit / latency", f"{args.rpm}/min enforced by the server, {args.latency_ms:g} ms per answer"),
    ]
    table = [
        "| phase | inputs | requests | 429s | answered | lost | duplicate paid | seconds | answers/min | share of limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| naive sequential loop (sample) | {args.naive_n:,} | {naive_requests:,} | {naive_429:,} | {naive_ok:,} | {args.naive_n - naive_ok:,} | | {naive_s:.1f} | {naive_rate:,.0f} | "
        f"{naive_rate / args.rpm:.1%} |",
        f"| pipeline | {args.n:,} | {main_totals.calls:,} | {main_totals.rate_limited:,} | {args.n - main_lost:,} | "
        f"{main_lost:,} | {delta(after, before, 'duplicate_paid'):,} | {main_s:.1f} | {main_rate:,.0f} | "
        f"{main_rate / args.rpm:.1%} |",
        f"| pipeline, 429 storm | {args.storm_n:,} | {storm_totals.calls:,} | {storm_totals.rate_limited:,} | "
        f"{args.storm_n - storm_lost:,} | {storm_lost:,} | "
        f"{delta(storm_after, storm_before, 'duplicate_paid'):,} | {storm_s:.1f} | "
        f"{(args.storm_n - storm_lost) / storm_s * 60:,.0f} | {(args.storm_n - storm_lost) / storm_s * 60 / args.rpm:.1%} |",
        f"| re-run (fresh ledger) | {args.n + args.storm_n:,} | {delta(rerun_after, rerun_before, 'requests'):,} | 0 | "
        f"{sum(1 for a in rerun_answers if a.response is not None):,} | "
        f"{sum(1 for a in rerun_answers if a.response is None):,} | 0 | {rerun_s:.1f} | | |",
    ]
    notes = [
        "",
        f"- naive loop extrapolated to {args.n:,} inputs: {naive_full_min:,.1f} minutes at its measured rate "
        f"(capped at the limit; above it the provider answers 429 and this loop, which has no retry of its own, "
        f"loses labels); pipeline: {main_s / 60:,.1f} minutes measured.",
        f"- pipeline vs naive: {main_rate / naive_rate:.2f}x the naive loop's answers per minute."
        if naive_rate
        else "- naive loop answered nothing",
        f"- most requests the server saw in any 60 s window over the whole run: {final['max_requests_per_60s']:,} "
        f"(limit {args.rpm}); server totals: {final['by_status']}, duplicate paid answers {final['duplicate_paid']}.",
        f"- storm: {storm_totals.retries:,} retries, {storm_totals.rate_limited:,} 429s answered, every input labelled "
        f"once: {storm_lost == 0 and delta(storm_after, storm_before, 'duplicate_paid') == 0}.",
        f"- cost of the pipeline phase ({MODEL}, litellm's price map): ${main_totals.cost_usd:.4f} for "
        f"{main_totals.prompt_tokens:,} prompt + {main_totals.completion_tokens:,} completion tokens.",
        f"- command: python bench/bench_teacher.py {' '.join(sys.argv[1:])}".rstrip(),
    ]
    text = "\n".join([*(f"- {k}: {v}" for k, v in rows), "", *table, *notes]) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
