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

"busiest 60 s" is the most requests the server received in any 60-second window of the phase.

    python bench/bench_teacher.py                 # 10,000 inputs at 600/min: about 22 minutes
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
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import load_task
from distill_pipeline.teachers.client import ClientSettings, TeacherClient, TeacherSpec, render_messages
from distill_pipeline.teachers.ledger import Ledger
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


@dataclass(frozen=True)
class Phase:
    """One phase as the server saw it (requests, 429s, paid duplicates, busiest minute) and the client."""

    name: str
    inputs: int
    answered: int
    requests: int
    rate_limited: int
    duplicate_paid: int
    busiest_minute: int
    seconds: float

    @classmethod
    def measure(
        cls, name: str, url: str, before: dict, since: float, started: float, inputs: int, answered: int
    ) -> Phase:
        seconds = time.monotonic() - started
        after = server_stats(url, since=since)
        return cls(
            name=name,
            inputs=inputs,
            answered=answered,
            requests=after["requests"] - before["requests"],
            rate_limited=after["by_status"].get("429", 0) - before["by_status"].get("429", 0),
            duplicate_paid=after["duplicate_paid"] - before["duplicate_paid"],
            busiest_minute=after["max_requests_per_60s"],
            seconds=seconds,
        )

    @property
    def lost(self) -> int:
        return self.inputs - self.answered

    @property
    def rate(self) -> float:
        return self.answered / self.seconds * 60 if self.seconds else 0.0

    def row(self, limit: int) -> str:
        paid = self.requests - self.rate_limited
        share = f"{self.rate / limit:.1%}" if paid else ""
        rate = f"{self.rate:,.0f}" if paid else ""
        return (
            f"| {self.name} | {self.inputs:,} | {self.requests:,} | {self.rate_limited:,} | {self.answered:,} | "
            f"{self.lost:,} | {self.duplicate_paid:,} | {self.busiest_minute:,} | {self.seconds:.1f} | {rate} | {share} |"
        )


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
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        work = Path(tmp)
        store = LocalStore(work / "store")
        journal = work / "journal"
        with running_server(work / "server.log", latency_ms=args.latency_ms) as url:
            control(url, rpm_limit=args.rpm)
            api_base = url + "/v1"

            # 1. a naive sequential loop on a sample, litellm's defaults (the OpenAI SDK's own retries)
            naive_inputs = make_inputs(args.naive_n, 1, "naive")
            before, since, started = server_stats(url), time.time(), time.monotonic()
            naive_ok = 0
            for text in naive_inputs:
                try:
                    litellm.completion(
                        model=MODEL, messages=render_messages(template, text), api_base=api_base, api_key="sk-bench",
                        temperature=0.0, max_tokens=32,
                    )  # fmt: skip
                    naive_ok += 1
                except Exception:  # the naive loop has no error handling of its own: a failure is a lost label
                    pass
            phases.append(
                Phase.measure("naive sequential loop (sample)", url, before, since, started, args.naive_n, naive_ok)
            )
            # Let the naive loop's requests leave the server's 60-second window before the pipeline starts.
            time.sleep(61.0)

            settings = ClientSettings(
                api_base=api_base, api_key="sk-bench", rpm=args.rpm, max_concurrency=args.concurrency
            )

            def pipeline(name: str, texts: list[str], storm: bool = False) -> tuple[Phase, TeacherClient]:
                ledger = Ledger.open(store, journal)
                client = TeacherClient(settings, ledger, progress=lambda m: print(m, flush=True))
                if storm:
                    control(url, storm={"duration_s": args.storm_s, "fraction": 0.5, "retry_after_s": 1.0})
                before, since, started = server_stats(url), time.time(), time.monotonic()
                answers = client.label(spec, template, texts)
                ledger.close()
                answered = sum(1 for a in answers if a.response is not None)
                return Phase.measure(name, url, before, since, started, len(texts), answered), client

            # 2. the pipeline at the limit, 3. through a storm of 429s, 4. everything again
            inputs, storm_inputs = make_inputs(args.n, 2, "main"), make_inputs(args.storm_n, 3, "storm")
            main, main_client = pipeline("pipeline", inputs)
            phases.append(main)
            time.sleep(1.0)
            storm, storm_client = pipeline(f"pipeline, 429 storm ({args.storm_s:g} s)", storm_inputs, storm=True)
            phases.append(storm)
            rerun, rerun_client = pipeline("re-run (ledger reopened)", inputs + storm_inputs)
            phases.append(rerun)
            final = server_stats(url)

    naive = phases[0]
    rows = [
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
        ("limit / latency", f"{args.rpm}/min enforced by the server (429 above it), {args.latency_ms:g} ms per answer"),
    ]
    table = [
        "| phase | inputs | requests | 429s | answered | lost | duplicate paid | busiest 60 s | seconds | answers/min "
        "| share of limit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(phase.row(args.rpm) for phase in phases),
    ]
    naive_minutes = args.n / naive.rate if naive.rate else float("inf")
    notes = [
        "",
        f"- naive loop extrapolated to {args.n:,} inputs at its measured rate: {naive_minutes:,.1f} minutes, "
        f"{naive.lost / naive.inputs:.1%} of labels lost; pipeline measured: {main.seconds / 60:,.1f} minutes, "
        f"{main.rate / naive.rate:.2f}x the naive loop's answers per minute."
        if naive.rate
        else "- the naive loop answered nothing",
        f"- storm: {storm_client.totals.retries:,} retries after {storm_client.totals.rate_limited:,} 429s; "
        f"lost {storm.lost}, duplicate paid {storm.duplicate_paid}.",
        f"- re-run: {rerun.requests} requests, {rerun_client.totals.cache_hits:,} answers from the ledger.",
        f"- server totals: {final['by_status']}, duplicate paid answers {final['duplicate_paid']}.",
        f"- cost of the pipeline phase ({MODEL}, litellm's price map): ${main_client.totals.cost_usd:.4f} for "
        f"{main_client.totals.prompt_tokens:,} prompt + {main_client.totals.completion_tokens:,} completion tokens.",
        f"- command: python bench/bench_teacher.py {' '.join(sys.argv[1:])}".rstrip(),
    ]
    text = "\n".join([*(f"- {k}: {v}" for k, v in rows), "", *table, *notes]) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
