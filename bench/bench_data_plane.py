"""Data-plane benchmark: ingest, validate, quarantine, parse, dedup and split simulated log lines.

The pipeline (``ingest_objects`` -> ``label_records`` -> ``curate`` -> ``build_test_sets`` ->
``build_train_set``) runs against a straightforward pandas implementation of the same steps, in
the same run, at two sizes, each implementation in a fresh subprocess so that its peak RSS is
its own. Both read the same simulated log objects (one day partition of N lines, written once
per size into a local store and not timed) and write the same tables as Parquet; their row
counts are printed side by side and the ones that must agree are asserted.

"Dedup" is every rule of the task's curation config: the request-id dedup of ingestion,
curation's request-id, length, pattern, exact normalised-text, near-duplicate (word-set Jaccard
>= the task's threshold) and per-user cap rules. The baseline's near-duplicate rule is
datasketch's ``MinHashLSH`` (the same number of hash functions and bands) with the same exact
Jaccard verification; which rows each finds may differ by the few pairs either LSH misses, so
the near-duplicate count and the counts after it are shown side by side, not asserted equal.

After the timed stages the pipeline child measures the near-duplicate rule's quality: 3,000
near-duplicate edits of curated inputs (one word dropped and one added, Jaccard >= 0.8) and
3,000 edits that are not near duplicates (Jaccard < 0.8) arrive after the day's inputs; recall is
the share of the first found, and the false-positive rate the share of the second reported as a
near duplicate of its original, each with a 95% Wilson interval.

The pipeline also runs a second time with a small DuckDB memory_limit (``--memory-limit``): its
peak RSS at both sizes shows what bounds the pipeline's memory.

    python bench/bench_data_plane.py                      # 250k and 1M lines
    python bench/bench_data_plane.py --quick              # 20k and 50k lines, under a minute
    python bench/bench_data_plane.py --sizes 100000 400000 --repeat 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DAY = "2026-11-19"
SIM_SEED = 7
DEFAULT_SIZES = (250_000, 1_000_000)
QUICK_SIZES = (20_000, 50_000)
TRAIN_SIZE = "100%"
RESULTS = Path(__file__).parent / "results" / "data_plane.md"
# Counts both implementations must agree on exactly (test-set contents differ by design: each
# draws its own seeded sample, but the sizes agree).
MUST_MATCH = (
    "lines_in",
    "kept",
    "quarantined",
    "duplicate_request_ids",
    "labelled",
    "label_quarantined",
    "removed_before_near_duplicates",
)
SIDE_BY_SIDE = ("near_duplicates", "curated", "in_distribution_rows", "balanced_rows", "train_rows")
STAGES = ("ingest", "label", "dedup", "test sets", "train set")
NEAR_DUP_RULES_BEFORE = ("duplicate_request_id", "too_short", "too_long", "exact_duplicate")
INJECTED_PAIRS = 3_000


# --- shared ------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process, all its threads: robust to other work on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StageTimer:
    """Wall-clock and CPU seconds of each named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), cpu_seconds()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.cpu[name] = cpu_seconds() - cpu_start

    def totals(self, stages: tuple[str, ...]) -> dict[str, Any]:
        return {
            "seconds": sum(self.seconds[s] for s in stages),
            "cpu_seconds": sum(self.cpu[s] for s in stages),
            "stages": self.seconds,
            "stage_cpu": self.cpu,
        }


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB.

    VmHWM belongs to the process's own address space. ru_maxrss would not do: Linux carries it
    across fork and exec, so a child started by a parent holding a day of simulated traffic
    would report the parent's size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: this benchmark measures memory on Linux only")


def dedup_config(task: Any) -> Any:
    """The task's curation rules, the near-duplicate rule included."""
    if task.curation.near_duplicate_threshold is None:
        raise ValueError("the benchmark needs a task with a near-duplicate threshold")
    return task.curation


def removed_before_near_duplicates(removed_by_rule: dict[str, int]) -> dict[str, int]:
    return {
        rule: n
        for rule, n in removed_by_rule.items()
        if n and (rule in NEAR_DUP_RULES_BEFORE or rule.startswith("pattern:"))
    }


def wilson(successes: int, trials: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion."""
    if trials == 0:
        return (0.0, 1.0)
    z, p = 1.959964, successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * ((p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5) / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def near_duplicate_quality(curated_path: Path, threshold: float) -> dict[str, Any]:
    """Recall and false positives of the near-duplicate rule on injected pairs (see the docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from distill_pipeline.core import duck
    from distill_pipeline.core.normalise import jaccard, normalised_text_sql, word_set_sql
    from distill_pipeline.data import minhash

    con = duck.connect()
    sets = (
        con.sql(
            f"SELECT {word_set_sql(normalised_text_sql('input'))} AS words FROM read_parquet({duck.sql_string(str(curated_path))})"
        )
        .to_arrow_table()
        .column("words")
        .to_pylist()
    )
    con.close()
    rng = np.random.default_rng(SIM_SEED)
    eligible = [i for i, words in enumerate(sets) if len(words) >= 9]
    near_sources = rng.choice(eligible, size=INJECTED_PAIRS, replace=False)
    far_sources = rng.choice(eligible, size=INJECTED_PAIRS, replace=False)
    near, far = [], []
    for n, i in enumerate(near_sources.tolist()):
        words = list(sets[i])
        near.append([*words[1:], f"injectednear{n}"])  # (k-1)/(k+1) >= 0.8 for k >= 9 words
    for n, i in enumerate(far_sources.tolist()):
        words = list(sets[i])
        cut = len(words) // 4 + 1  # a quarter and one replaced: below 0.8
        far.append(words[cut:] + [f"injectedfar{n}x{j}" for j in range(cut)])
    assert all(jaccard(frozenset(sets[i]), frozenset(w)) >= threshold for i, w in zip(near_sources, near, strict=True))
    assert all(jaccard(frozenset(sets[i]), frozenset(w)) < threshold for i, w in zip(far_sources, far, strict=True))
    texts = [words for words in sets if len(words) >= 4] + near + far
    index_of = {i: k for k, i in enumerate(i for i, words in enumerate(sets) if len(words) >= 4)}
    flat = pa.array([w for words in texts for w in words], pa.string())
    word_ids = pc.dictionary_encode(flat).indices.to_numpy().astype(np.int64)
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(w) for w in texts], out=offsets[1:])
    started = time.perf_counter()
    similar_to = minhash.near_duplicates(word_ids, offsets, threshold)
    seconds = time.perf_counter() - started
    base = len(texts) - 2 * INJECTED_PAIRS
    found = int((similar_to[base : base + INJECTED_PAIRS] >= 0).sum())
    partners = np.array([index_of[i] for i in far_sources.tolist()])
    false_positives = int((similar_to[base + INJECTED_PAIRS :] == partners).sum())
    flagged = similar_to >= 0
    verified = all(
        jaccard(frozenset(texts[a]), frozenset(texts[b])) >= threshold
        for b, a in zip(np.flatnonzero(flagged).tolist(), similar_to[flagged].tolist(), strict=True)
    )
    return {
        "texts": len(texts),
        "seconds": seconds,
        "recall": found / INJECTED_PAIRS,
        "recall_ci": wilson(found, INJECTED_PAIRS),
        "found": found,
        "false_positives": false_positives,
        "false_positive_ci": wilson(false_positives, INJECTED_PAIRS),
        "reported_pairs": int(flagged.sum()),
        "reported_pairs_all_at_threshold": verified,
    }


def log_keys(store: Any) -> list[str]:
    from distill_pipeline.logs.schema import log_object_prefix

    return sorted(info.key for info in store.list(log_object_prefix(DAY)))


# --- the pipeline ------------------------------------------------------------------------------


def run_pipeline(data_dir: Path, work: Path, *, near_dup: bool) -> dict[str, Any]:
    from distill_pipeline.core.store import LocalStore
    from distill_pipeline.core.task import load_task
    from distill_pipeline.data.curation import curate
    from distill_pipeline.data.ingest import ingest_objects
    from distill_pipeline.data.labels import label_records
    from distill_pipeline.data.splitting import TrainSize, build_test_sets, build_train_set

    task = load_task()
    store = LocalStore(data_dir / "store")
    keys = log_keys(store)
    rss_at_start = peak_rss_mb()
    timer = StageTimer()
    with timer.stage("ingest"):
        ingested = ingest_objects(store, keys, work / "ingest", work / "raw.parquet", work / "quarantine.parquet")
    with timer.stage("label"):
        labelled = label_records(
            work / "raw.parquet", task, work / "label", work / "labels.parquet", work / "label_quarantine.parquet"
        )
    with timer.stage("dedup"):
        curated = curate(
            [work / "labels.parquet"],
            dedup_config(task),
            work / "curate",
            work / "curated.parquet",
            work / "removed.parquet",
            seed=task.splits.seed,
        )
    tests = [work / "in_distribution.parquet", work / "balanced.parquet"]
    with timer.stage("test sets"):
        test_stats = build_test_sets(
            work / "curated.parquet",
            task.label.values,
            in_distribution_size=task.splits.in_distribution_test_size,
            balanced_size=task.splits.balanced_test_size,
            seed=task.splits.seed,
            workdir=work / "tests",
            in_distribution_path=tests[0],
            balanced_path=tests[1],
        )
    with timer.stage("train set"):
        train_stats = build_train_set(
            work / "curated.parquet",
            tests,
            TrainSize.parse(TRAIN_SIZE),
            seed=task.splits.seed,
            workdir=work / "train",
            train_path=work / "train.parquet",
        )
    peak = peak_rss_mb()

    quality = (
        near_duplicate_quality(work / "curated.parquet", task.curation.near_duplicate_threshold) if near_dup else None
    )
    return {
        **timer.totals(STAGES),
        "peak_rss_mb": peak,
        "rss_at_start_mb": rss_at_start,
        "near_duplicate_quality": quality,
        "counts": {
            "lines_in": ingested.lines_in,
            "kept": ingested.kept,
            "quarantined": ingested.quarantined,
            "duplicate_request_ids": ingested.duplicates,
            "labelled": labelled.labelled,
            "label_quarantined": labelled.quarantined,
            "curated": curated.kept,
            "removed_before_near_duplicates": removed_before_near_duplicates(curated.removed_by_rule),
            "near_duplicates": curated.removed_by_rule.get("near_duplicate", 0),
            "in_distribution_rows": test_stats.in_distribution_rows,
            "balanced_rows": test_stats.balanced_rows,
            "train_rows": train_stats.rows,
        },
    }


# --- the floor ---------------------------------------------------------------------------------


def run_floor(data_dir: Path) -> dict[str, Any]:
    """DuckDB's own NDJSON reader over the day's objects with the schema declared, and nothing else.

    Every line is parsed and every field typed (lines that do not fit are skipped); nothing is
    validated, reported, deduplicated or written. No implementation of the stages does less with
    DuckDB, so its lines per second bound what any of them can reach on this machine.
    """
    import duckdb

    from distill_pipeline.core.store import LocalStore
    from distill_pipeline.logs.schema import SCHEMA_FIELDS

    store = LocalStore(data_dir / "store")
    paths = [str(data_dir / "store" / key) for key in log_keys(store)]
    types = {"string": "VARCHAR", "integer": "BIGINT", "number": "DOUBLE", "object": "JSON"}
    columns = "{" + ", ".join(f"'{spec.name}': '{types[spec.json_type]}'" for spec in SCHEMA_FIELDS) + "}"
    con = duckdb.connect()
    # Loading the JSON extension is a fixed cost of the first JSON query, not of the lines.
    con.execute("SELECT json_valid('{}')").fetchone()
    timer = StageTimer()
    with timer.stage("parse"):
        rows, characters = con.execute(
            f"SELECT count(*), sum(length(input)) FROM read_json(?, format = 'newline_delimited', "
            f"columns = {columns}, ignore_errors = true)",
            [paths],
        ).fetchone()
    return {**timer.totals(("parse",)), "peak_rss_mb": peak_rss_mb(), "rows": rows, "characters": characters}


# --- the pandas baseline -----------------------------------------------------------------------
# Written the way a data scientist would: json.loads per line, checks in Python, one DataFrame,
# drop_duplicates, a per-row .apply of the project's own parse_label, str methods for the
# normalised text, df.sample for the test sets and an anti-join for the training set.

_PY_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "object": (dict,)}


def _python_type_ok(value: Any, json_type: str) -> bool:
    # bool is an int to Python but a boolean to JSON.
    return not isinstance(value, bool) and isinstance(value, _PY_TYPES[json_type])


def validate_record(obj: Any, max_request_id_chars: int) -> str | None:
    import datetime as dt

    from distill_pipeline.logs.schema import SCHEMA_FIELDS, SUPPORTED_SCHEMA_VERSIONS

    if not isinstance(obj, dict):
        return "not a JSON object"
    for spec in SCHEMA_FIELDS:
        value = obj.get(spec.name)
        if value is None:
            if spec.required:
                return f"missing required field {spec.name}"
        elif not _python_type_ok(value, spec.json_type):
            return f"field {spec.name} must be {spec.json_type}, not {type(value).__name__}"
    if obj["schema_version"] not in SUPPORTED_SCHEMA_VERSIONS:
        return f"unsupported schema_version {obj['schema_version']}"
    if not obj["request_id"].strip():
        return "empty request_id"
    if len(obj["request_id"]) > max_request_id_chars:
        return f"request_id longer than {max_request_id_chars} characters"
    try:
        dt.datetime.fromisoformat(obj["timestamp"])
    except ValueError:
        return "timestamp is not ISO 8601"
    if not obj["input"].strip():
        return "empty input"
    if obj.get("response") is None and obj.get("error") is None:
        return "neither response nor error"
    return None


def datasketch_near_duplicates(norm: Any, threshold: float) -> list[Any]:
    """Index labels of the texts (in arrival order) at word-set Jaccard >= ``threshold`` with an
    earlier one: datasketch's MinHash + LSH with the pipeline's bands, then exact verification of
    at most ``CANDIDATES_CHECKED`` candidates per text (a templated bucket holds thousands)."""
    from datasketch import MinHash, MinHashLSH

    from distill_pipeline.core.normalise import jaccard
    from distill_pipeline.data import minhash

    words = norm.str.split().map(frozenset)
    words = words[words.map(len) >= 4]
    functions = minhash.BANDS * minhash.ROWS
    lsh = MinHashLSH(threshold=threshold, num_perm=functions, params=(minhash.BANDS, minhash.ROWS))
    signatures = MinHash.bulk([[w.encode() for w in ws] for ws in words], num_perm=functions)
    found = []
    for label, ws, signature in zip(words.index, words, signatures, strict=True):
        for checked, candidate in enumerate(lsh.query(signature)):
            if checked == CANDIDATES_CHECKED:
                break
            if jaccard(ws, words[candidate]) >= threshold:
                found.append(label)
                break
        lsh.insert(label, signature, check_duplication=False)
    return found


CANDIDATES_CHECKED = 32


def run_pandas(data_dir: Path, work: Path) -> dict[str, Any]:
    import json as jsonlib

    import pandas as pd

    from distill_pipeline.core.store import LocalStore
    from distill_pipeline.core.task import load_task
    from distill_pipeline.data.ingest import DEFAULT_MAX_LINE_BYTES
    from distill_pipeline.data.parsing import parse_label
    from distill_pipeline.logs.schema import MAX_REQUEST_ID_CHARS

    task = load_task()
    config = dedup_config(task)
    if config.scrub_pii or config.balance_labels:
        raise NotImplementedError("the baseline implements the toxicity task's curation rules only")
    seed = task.splits.seed
    store = LocalStore(data_dir / "store")
    keys = log_keys(store)
    rss_at_start = peak_rss_mb()
    timer = StageTimer()
    work.mkdir(parents=True, exist_ok=True)

    with timer.stage("ingest"):
        rows, bad = [], []
        lines_in = 0
        for key in keys:
            data = store.get_bytes(key)
            lines = data.split(b"\n")
            if lines and lines[-1] == b"":
                lines.pop()
            for line_no, raw in enumerate(lines, start=1):
                lines_in += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad.append({"source_key": key, "source_line": line_no, "reason": "invalid UTF-8"})
                    continue
                if len(raw) + 1 > DEFAULT_MAX_LINE_BYTES:
                    reason = "line too long"
                elif not text.strip():
                    reason = "blank line"
                else:
                    try:
                        obj = jsonlib.loads(text)
                    except ValueError:
                        reason = "not valid JSON"
                    else:
                        reason = validate_record(obj, MAX_REQUEST_ID_CHARS)
                if reason is not None:
                    bad.append({"source_key": key, "source_line": line_no, "reason": reason, "excerpt": text[:300]})
                    continue
                obj["source_key"] = key
                obj["source_line"] = line_no
                rows.append(obj)
        records = pd.DataFrame(rows)
        del rows
        duplicated = records.duplicated("request_id", keep="first")
        quarantine = pd.concat(
            [
                pd.DataFrame(bad),
                records.loc[duplicated, ["source_key", "source_line", "request_id"]].assign(
                    reason="duplicate request_id"
                ),
            ],
            ignore_index=True,
        )
        records = records[~duplicated].reset_index(drop=True)
        kept = len(records)
        records["timestamp"] = pd.to_datetime(records["timestamp"], utc=True, format="ISO8601")
        records["day"] = records["timestamp"].dt.date
        records["prompt_tokens"] = records["usage"].str.get("prompt_tokens")
        records["completion_tokens"] = records["usage"].str.get("completion_tokens")
        records.to_parquet(work / "raw.parquet", index=False)
        quarantine.to_parquet(work / "quarantine.parquet", index=False)

    with timer.stage("label"):
        # Missing responses are NaN in a DataFrame; parse_label wants None.
        parsed = records["response"].apply(
            lambda response: parse_label(response if isinstance(response, str) else None, task.label)
        )
        records["label"] = parsed.map(lambda result: result.label)
        records["parse_method"] = parsed.map(lambda result: result.method)
        other_task = records["task"].notna() & (records["task"] != task.id)
        provider_error = records["error"].notna() & records["response"].isna()
        unparseable = records["label"].isna()
        # Later masks win: the first reason that applies is the one given, as in label_records.
        records["reason"] = (
            pd.Series(None, index=records.index, dtype="object")
            .mask(unparseable, "unparseable response")
            .mask(provider_error, "provider error")
            .mask(other_task, "record of another task")
        )
        is_labelled = records["reason"].isna()
        labels = records[is_labelled].drop(columns=["reason"]).reset_index(drop=True)
        labels["label"] = labels["label"].astype("int64")
        label_quarantine = records.loc[~is_labelled, ["request_id", "source_key", "source_line", "reason"]]
        labels.to_parquet(work / "labels.parquet", index=False)
        label_quarantine.to_parquet(work / "label_quarantine.parquet", index=False)
        del records

    with timer.stage("dedup"):
        # Arrival order, as curation defines it: the earliest copy of anything is the one kept.
        pool = labels.sort_values(["timestamp", "request_id", "source_key", "source_line"], ignore_index=True)
        pool["removed_by"] = None

        def remove(rule: str, mask: pd.Series) -> None:
            pool.loc[pool["removed_by"].isna() & mask, "removed_by"] = rule

        def survivors() -> pd.DataFrame:
            return pool[pool["removed_by"].isna()]

        remove("duplicate_request_id", pool.duplicated("request_id", keep="first"))
        remove("too_short", pool["input"].str.strip().str.len() < config.min_chars)
        remove("too_long", pool["input"].str.len() > config.max_chars)
        for name, pattern in config.drop_patterns.items():
            remove(f"pattern:{name}", pool["input"].str.contains(pattern, regex=True))
        pool["norm"] = pool["input"].str.lower().str.replace(r"[\W_]+", " ", regex=True).str.strip()
        remove("exact_duplicate", survivors().duplicated("norm", keep="first").reindex(pool.index, fill_value=False))
        if config.near_duplicate_threshold is not None:
            remove(
                "near_duplicate",
                pool.index.isin(datasketch_near_duplicates(survivors()["norm"], config.near_duplicate_threshold)),
            )
        if config.max_examples_per_user is not None:
            shuffled = survivors().sample(frac=1.0, random_state=seed)
            rank = shuffled.groupby("user_id").cumcount()
            remove("user_cap", (rank >= config.max_examples_per_user).reindex(pool.index, fill_value=False))
        curated = survivors().drop(columns=["removed_by"])
        removed = pool.loc[pool["removed_by"].notna(), ["removed_by", "request_id", "user_id", "label"]]
        curated.drop(columns=["norm"]).to_parquet(work / "curated.parquet", index=False)
        removed.to_parquet(work / "removed.parquet", index=False)
        removed_by_rule = {rule: int(n) for rule, n in removed["removed_by"].value_counts().items()}

    with timer.stage("test sets"):
        in_distribution = curated.sample(n=min(task.splits.in_distribution_test_size, len(curated)), random_state=seed)
        rest = curated[
            ~curated["request_id"].isin(in_distribution["request_id"]) & ~curated["norm"].isin(in_distribution["norm"])
        ]
        per_label = task.splits.balanced_test_size // len(task.label.values)
        balanced = rest.groupby("label", group_keys=False).sample(n=per_label, random_state=seed)
        in_distribution.drop(columns=["norm"]).to_parquet(work / "in_distribution.parquet", index=False)
        balanced.drop(columns=["norm"]).to_parquet(work / "balanced.parquet", index=False)

    with timer.stage("train set"):
        test_rows = pd.concat([in_distribution, balanced])
        pool_rows = curated[
            ~curated["request_id"].isin(test_rows["request_id"]) & ~curated["norm"].isin(test_rows["norm"])
        ]
        train = pool_rows.sample(frac=1.0, random_state=seed)
        train.drop(columns=["norm"]).to_parquet(work / "train.parquet", index=False)

    return {
        **timer.totals(STAGES),
        "peak_rss_mb": peak_rss_mb(),
        "rss_at_start_mb": rss_at_start,
        "counts": {
            "lines_in": lines_in,
            "kept": kept,
            "quarantined": len(quarantine),
            "duplicate_request_ids": int(duplicated.sum()),
            "labelled": len(labels),
            "label_quarantined": len(label_quarantine),
            "curated": len(curated),
            "removed_before_near_duplicates": removed_before_near_duplicates(removed_by_rule),
            "near_duplicates": removed_by_rule.get("near_duplicate", 0),
            "in_distribution_rows": len(in_distribution),
            "balanced_rows": len(balanced),
            "train_rows": len(train),
        },
    }


# --- the driver --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the results: an implementation, and the environment it runs in."""

    name: str
    implementation: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    near_dup: bool = False  # also time curation's near-duplicate rule (pipeline only)


def simulate(size: int, data_dir: Path) -> dict[str, Any]:
    """Write one day of ``size`` simulated log lines into a local store (not timed)."""
    from distill_pipeline.core.store import LocalStore
    from distill_pipeline.core.task import load_task
    from distill_pipeline.demo.simulator import simulate_traffic

    store = LocalStore(data_dir / "store")
    summary = simulate_traffic(store, days=[DAY], records_per_day=size, seed=SIM_SEED, task=load_task())
    sizes = [info.size for info in store.list(f"logs/dt={DAY}/")]
    return {
        "lines": summary.lines_written,
        "bytes": sum(sizes),
        "objects": len(sizes),
        "malformed": sum(summary.malformed.values()),
    }


def simulate_in_child(size: int, data_dir: Path) -> dict[str, Any]:
    """``simulate`` in a subprocess: this process stays small, and so do the children it forks."""
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--simulate", str(size), "--data", str(data_dir)]
    subprocess.run(command, check=True)
    return json.loads((data_dir / "input.json").read_text())


def run_child(variant: Variant, data_dir: Path, work: Path) -> dict[str, Any]:
    """Run one variant in a fresh interpreter, so that its peak RSS is its own."""
    work.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--child", variant.implementation, "--data", str(data_dir)]
    if variant.near_dup:
        command.append("--near-dup")
    load_before = os.getloadavg()[0]
    completed = subprocess.run(
        [*command, "--work", str(work)], env={**os.environ, **variant.env}, stderr=subprocess.PIPE, text=True
    )
    sys.stderr.write(completed.stderr)
    if completed.returncode != 0:
        # A variant that fails (out of memory, say) is a result of the run, reported as such.
        errors = [line for line in completed.stderr.splitlines() if "Error" in line or "Exception" in line]
        return {"failed": (errors[-1] if errors else f"exit status {completed.returncode}").strip()}
    result = json.loads((work / "result.json").read_text())
    # Other work on the machine shows in the load: wall seconds are only as good as it is low.
    result["load"] = max(load_before, os.getloadavg()[0])
    return result


def machine() -> dict[str, str]:
    import duckdb
    import numpy
    import pandas
    import pyarrow

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "CPU": f"{model}, {len(os.sched_getaffinity(0))} usable cores ({os.cpu_count()} online)",
        "memory": f"{memory_gib:.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "pyarrow": pyarrow.__version__,
        "pandas": pandas.__version__,
        "numpy": numpy.__version__,
        "DuckDB memory_limit": os.environ.get("DISTILL_DUCKDB_MEMORY_LIMIT", "2GB (project default)"),
    }


def describe(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key} {count:,}" for key, count in sorted(value.items()))
    return f"{value:,}"


def check_same_work(size: int, runs: dict[str, dict[str, Any]]) -> list[str]:
    """The counts of every variant side by side; a mismatch in any MUST_MATCH count is an error."""
    names = [name for name, run in runs.items() if "failed" not in run]
    lines = ["| count | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    mismatches = []
    for count in MUST_MATCH:
        values = [runs[name]["counts"][count] for name in names]
        lines.append(f"| {count} | " + " | ".join(describe(v) for v in values) + " |")
        if any(v != values[0] for v in values):
            mismatches.append(f"{size:,} lines: {count} differs: " + ", ".join(map(str, values)))
    for count in SIDE_BY_SIDE:
        values = [runs[name]["counts"][count] for name in names]
        lines.append(f"| {count} (may differ) | " + " | ".join(describe(v) for v in values) + " |")
    if mismatches:
        raise AssertionError("the implementations did different work:\n" + "\n".join(mismatches))
    return lines


def report(
    command: str,
    repeat: int,
    inputs: dict[int, dict[str, Any]],
    results: dict[int, dict[str, dict[str, Any]]],
    same_work: dict[int, list[str]],
    floors: dict[int, dict[str, Any]],
) -> str:
    out = ["# Data-plane benchmark: pipeline vs pandas", "", f"`{command}`", ""]
    out += [
        "Ingest + validate + quarantine + parse + dedup + split of one simulated day partition "
        f"(seed {SIM_SEED}); training set {TRAIN_SIZE}. Each variant runs in its own subprocess "
        f"(peak RSS is its own); best of {repeat} run(s) by wall time. Dedup = request id (ingest and "
        "curation), the length and pattern rules, exact normalised text, near duplicates (MinHash + LSH, "
        "exact Jaccard verification) and the per-user cap: every stage is in the totals. pandas runs only "
        "where its memory fits the machine's share (`--pandas-max-lines`). CPU s is the process's user + "
        "system time over all its threads; `load` is the 1-minute load average around the run (this "
        "machine is shared: wall seconds inflate with it, CPU seconds much less).",
        "",
    ]
    out += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in machine().items()), ""]
    out += ["## Input", "", "| lines | objects | bytes | malformed lines |", "|---:|---:|---:|---:|"]
    out += [f"| {i['lines']:,} | {i['objects']} | {i['bytes']:,} | {i['malformed']:,} |" for i in inputs.values()]
    out += ["", "## Totals", ""]
    out += [
        "| lines | implementation | seconds | CPU s | rows/s | rows per CPU s | peak RSS MB "
        "| speed-up vs pandas | CPU ratio vs pandas | load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, runs in results.items():
        baseline = runs.get("pandas")
        baseline = None if baseline is None or "failed" in baseline else baseline
        lines = inputs[size]["lines"]
        for name, run in runs.items():
            if "failed" in run:
                out.append(f"| {size:,} | {name} | failed: {run['failed']} | | | | | | | |")
                continue
            ratios = (
                f"{baseline['seconds'] / run['seconds']:.1f}x | {baseline['cpu_seconds'] / run['cpu_seconds']:.1f}x"
                if baseline
                else "not run | not run"
            )
            out.append(
                f"| {size:,} | {name} | {run['seconds']:.2f} | {run['cpu_seconds']:.2f} | "
                f"{lines / run['seconds']:,.0f} | {lines / run['cpu_seconds']:,.0f} | {run['peak_rss_mb']:,.0f} | "
                f"{ratios} | {run['load']:.1f} |"
            )
    out += ["", "## Seconds per stage (wall / CPU, share of the total wall time)", ""]
    out += ["| lines | implementation | " + " | ".join(STAGES) + " |", "|---:|---|" + "---:|" * len(STAGES)]
    for size, runs in results.items():
        for name, run in runs.items():
            if "failed" in run:
                continue
            cells = [
                f"{run['stages'][s]:.2f} / {run['stage_cpu'][s]:.2f} ({run['stages'][s] / run['seconds']:.0%})"
                for s in STAGES
            ]
            out.append(f"| {size:,} | {name} | " + " | ".join(cells) + " |")
    out += ["", "## The floor: DuckDB's NDJSON reader alone", ""]
    out += [
        "Every line parsed and every field typed by `read_json` with the schema declared, counted and "
        "nothing else: no validation report, no dedup, nothing written. No DuckDB implementation of "
        "the stages reads faster, so this bounds the lines per second any of them can reach here.",
        "",
        "| lines | seconds | CPU s | rows/s | rows per CPU s | the pipeline's rows/s as a share of it |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for size, floor in floors.items():
        if "failed" in floor:
            out.append(f"| {size:,} | failed: {floor['failed']} | | | | |")
            continue
        lines = inputs[size]["lines"]
        pipeline = results[size].get("pipeline", {})
        share = f"{floor['seconds'] / pipeline['seconds']:.1%}" if "seconds" in pipeline else "pipeline failed"
        out.append(
            f"| {size:,} | {floor['seconds']:.2f} | {floor['cpu_seconds']:.2f} | {lines / floor['seconds']:,.0f} | "
            f"{lines / floor['cpu_seconds']:,.0f} | {share} |"
        )
    out += ["", "## Near-duplicate rule: quality on injected pairs (pipeline)", ""]
    out += [
        "| lines | texts compared | near-dup pairs found (recall, 95% CI) | non-near-dup pairs reported "
        "(rate, 95% CI) | pairs reported | all reported pairs at Jaccard >= threshold | seconds |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for size, runs in results.items():
        quality = runs.get("pipeline", {}).get("near_duplicate_quality")
        if quality:
            low, high = quality["recall_ci"]
            fp_low, fp_high = quality["false_positive_ci"]
            out.append(
                f"| {size:,} | {quality['texts']:,} | {quality['found']:,} / {INJECTED_PAIRS:,} "
                f"({quality['recall']:.2%}, {low:.2%}-{high:.2%}) | {quality['false_positives']:,} / {INJECTED_PAIRS:,} "
                f"({quality['false_positives'] / INJECTED_PAIRS:.2%}, {fp_low:.2%}-{fp_high:.2%}) | "
                f"{quality['reported_pairs']:,} | {'yes' if quality['reported_pairs_all_at_threshold'] else 'NO'} | "
                f"{quality['seconds']:.2f} |"
            )
    out += ["", "## Same work", ""]
    for size in results:
        out += [f"{size:,} lines:", "", *same_work[size], ""]
    out += ["## Goals", ""]
    sizes = sorted(results)
    finished = {size: {n: r for n, r in runs.items() if "failed" not in r} for size, runs in results.items()}
    sizes = [size for size in sizes if "pipeline" in finished[size]]
    if not sizes:
        out += ["- The pipeline finished at no size.", ""]
        return "\n".join(out)
    smallest, largest = sizes[0], sizes[-1]
    results = finished
    with_pandas = [size for size in sizes if "pandas" in results[size]]
    if with_pandas:
        compared = with_pandas[-1]
        pipeline, baseline = results[compared]["pipeline"], results[compared]["pandas"]
        speedup = baseline["seconds"] / pipeline["seconds"]
        cpu_ratio = baseline["cpu_seconds"] / pipeline["cpu_seconds"]
        out.append(
            f"- At least 10x pandas: {speedup:.1f}x wall, {cpu_ratio:.1f}x CPU at {compared:,} lines: "
            f"{'met' if speedup >= 10 else 'missed'}."
        )
    for size in sizes:
        run = results[size]["pipeline"]
        rate, cpu_rate = inputs[size]["lines"] / run["seconds"], inputs[size]["lines"] / run["cpu_seconds"]
        out.append(
            f"- At least 500k rows/s on 2 cores at {size:,} lines: {rate:,.0f} rows/s wall, "
            f"{cpu_rate:,.0f} rows per CPU second: {'met' if rate >= 500_000 else 'missed'}"
            + (
                f" (DuckDB's NDJSON reader alone: {inputs[size]['lines'] / floors[size]['seconds']:,.0f} rows/s)."
                if "seconds" in floors.get(size, {})
                else "."
            )
        )
    if largest != smallest:
        growth = largest / smallest
        small, big = results[smallest]["pipeline"], results[largest]["pipeline"]
        out.append(
            f"- Cost growth for x{growth:.1f} the lines: x{big['cpu_seconds'] / small['cpu_seconds']:.2f} CPU s, "
            f"x{big['seconds'] / small['seconds']:.2f} wall (linear: x{growth:.1f}); peak RSS "
            f"{small['peak_rss_mb']:,.0f} MB -> {big['peak_rss_mb']:,.0f} MB (x{big['peak_rss_mb'] / small['peak_rss_mb']:.2f})."
        )
        for stage in STAGES:
            out.append(f"  - {stage}: x{big['stage_cpu'][stage] / max(small['stage_cpu'][stage], 1e-9):.2f} CPU s")
    out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help=f"log lines per run (default {DEFAULT_SIZES})")
    parser.add_argument("--quick", action="store_true", help=f"small sizes {QUICK_SIZES}, under a minute")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant and size; the fastest counts")
    parser.add_argument(
        "--memory-limit",
        default="512MB",
        help="also run the pipeline with this DuckDB memory_limit, to show memory bounded by it ('' to skip)",
    )
    parser.add_argument(
        "--pandas-max-lines",
        type=int,
        default=1_000_000,
        help="run the pandas baseline only up to this many lines (it holds the day in memory: ~6 GB per 1M)",
    )
    parser.add_argument("--workdir", type=Path, help="where to put the data (default: a temporary directory)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the markdown report")
    parser.add_argument("--child", choices=("pipeline", "pandas", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--near-dup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--simulate", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.simulate:
        (args.data / "input.json").write_text(json.dumps(simulate(args.simulate, args.data)))
        return
    if args.child:
        if args.child == "pipeline":
            result = run_pipeline(args.data, args.work, near_dup=args.near_dup)
        elif args.child == "floor":
            result = run_floor(args.data)
        else:
            result = run_pandas(args.data, args.work)
        (args.work / "result.json").write_text(json.dumps(result))
        return

    variants = [Variant("pipeline", "pipeline", near_dup=True)]
    if args.memory_limit:
        variants.append(
            Variant(
                f"pipeline, memory_limit {args.memory_limit}",
                "pipeline",
                {"DISTILL_DUCKDB_MEMORY_LIMIT": args.memory_limit},
            )
        )
    variants.append(Variant("pandas", "pandas"))
    sizes = sorted(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    # The report names the run's options, not this machine's directories.
    command = " ".join(
        ["python bench/bench_data_plane.py", *("DIR" if arg == str(args.workdir) else arg for arg in sys.argv[1:])]
    )
    inputs: dict[int, dict[str, Any]] = {}
    results: dict[int, dict[str, dict[str, Any]]] = {}
    same_work: dict[int, list[str]] = {}
    floors: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_plane_", dir=args.workdir) as tmp:
        root = Path(tmp)
        for size in sizes:
            data_dir = root / f"data_{size}"
            started = time.perf_counter()
            inputs[size] = simulate_in_child(size, data_dir)
            elapsed = time.perf_counter() - started
            print(f"{size:,} lines: simulated {inputs[size]['bytes'] / 1e6:,.0f} MB in {elapsed:.1f}s", flush=True)
            results[size] = {}
            for variant in variants:
                if variant.implementation == "pandas" and size > args.pandas_max_lines:
                    continue
                runs = []
                for attempt in range(args.repeat):
                    work = root / f"work_{size}_{len(results[size])}_{attempt}"
                    run = run_child(variant, data_dir, work)
                    shutil.rmtree(work, ignore_errors=True)
                    if "failed" in run:
                        print(f"  {variant.name}: failed: {run['failed']}", flush=True)
                        runs.append(run)
                        break
                    print(
                        f"  {variant.name}: {run['seconds']:.2f}s ({run['cpu_seconds']:.2f} CPU s), "
                        f"peak RSS {run['peak_rss_mb']:,.0f} MB, load {run['load']:.1f}; "
                        + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in run["stages"].items()),
                        flush=True,
                    )
                    runs.append(run)
                finished = [run for run in runs if "failed" not in run]
                results[size][variant.name] = min(finished, key=lambda run: run["seconds"]) if finished else runs[-1]
            same_work[size] = check_same_work(size, results[size])
            floors[size] = run_child(Variant("floor", "floor"), data_dir, root / f"work_{size}_floor")
            if "failed" not in floors[size]:
                print(f"  DuckDB NDJSON reader alone: {floors[size]['seconds']:.2f}s", flush=True)
            shutil.rmtree(data_dir, ignore_errors=True)
    text = report(command, args.repeat, inputs, results, same_work, floors)
    print()
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
