"""The teacher leaderboard on the shared Jigsaw data: real GPT-4 and GPT-3.5 answers against gold labels.

``teacher_responses.parquet`` (read from ``jigsaw/`` under ``$DISTILL_SHARED_DATA``, by default
``../shared/data`` beside the checkout; never copied) holds the answers the playbook's teachers
gave, and ``is_bad``, the human label. They are replayed through
the project's OpenAI-compatible test server (each logged answer scripted for its model and
rendered prompt), so ``teacher_eval`` runs its real path: litellm over HTTP, the ledger, the
task's parser, token counts from the server and prices from litellm's price map. The same
scores are also computed directly from the logged answers, and must agree.

Test sets (gold = ``is_bad``):
- ``in_distribution``: the playbook's ``train.5k``, a uniform random sample of Kaggle train;
- ``balanced``: 1,000 toxic and 1,000 non-toxic comments outside ``train.5k`` with a GPT-4 answer
  (seeded by a hash of the id);
- ``sample.tiny``: the playbook's 20-comment sample, the only one every configuration answered.

Each configuration is scored on the rows it has answers for (one answer per comment: the first
logged). GPT-4's temperature was 0 in 8,121 of its 8,130 answers (the other 9 runs recorded
none); GPT-3.5's runs recorded none.

    python bench/teacher_leaderboard.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb

from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.task import load_task
from distill_pipeline.teachers.client import ClientSettings, TeacherClient, TeacherSpec
from distill_pipeline.teachers.evaluation import ConfigScore, GoldSet, evaluate_teachers, rank, score_responses
from distill_pipeline.teachers.ledger import Ledger
from distill_pipeline_tests.conftest import SHARED_JIGSAW as JIGSAW
from distill_pipeline_tests.openai_server import running_server

RESULTS = Path(__file__).parent / "results" / "teacher_leaderboard.md"
CONFIGS = [
    ("gpt-4-1106-preview", "simple_prompt", 0.0),
    ("gpt-3.5-turbo", "simple_prompt", None),
    ("gpt-3.5-turbo", "cot_prompt", None),
]
BALANCED_PER_LABEL = 1_000


def gold_rows() -> dict[str, list[tuple[str, str, int]]]:
    """Per test set: (id, comment, gold) rows."""
    responses, subsets = str(JIGSAW / "teacher_responses.parquet"), str(JIGSAW / "subsets.parquet")
    con = duckdb.connect()
    train5k = f"SELECT DISTINCT id FROM '{subsets}' WHERE source_file = 'data/dataset_subsets/train.5k.csv'"
    tiny = f"SELECT DISTINCT id FROM '{subsets}' WHERE source_file = 'data/dataset_subsets/sample.tiny.csv'"
    answered = f"SELECT DISTINCT id, comment_text, is_bad FROM '{responses}'"
    sets = {
        "in_distribution": f"SELECT a.* FROM ({answered}) a WHERE id IN ({train5k}) ORDER BY id",
        "balanced": f"""
            SELECT id, comment_text, is_bad FROM (
                SELECT *, row_number() OVER (PARTITION BY is_bad ORDER BY hash(id || 'balanced')) AS n
                FROM ({answered}) a WHERE id NOT IN ({train5k}) AND id NOT IN ({tiny})
                    AND id IN (SELECT id FROM '{responses}' WHERE teacher_model = 'gpt-4-1106-preview')
            ) WHERE n <= {BALANCED_PER_LABEL} ORDER BY id""",
        "sample.tiny": f"SELECT a.* FROM ({answered}) a WHERE id IN ({tiny}) ORDER BY id",
    }
    return {name: [(r[0], r[1], int(r[2])) for r in con.execute(sql).fetchall()] for name, sql in sets.items()}


def logged_answers() -> dict[tuple[str, str], dict[str, str]]:
    """(model, prompt id) -> comment id -> the first logged answer."""
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT teacher_model, prompt_id, id, first(raw_response ORDER BY source_file) "
        f"FROM '{JIGSAW / 'teacher_responses.parquet'}' GROUP BY ALL"
    ).fetchall()
    answers: dict[tuple[str, str], dict[str, str]] = {}
    for model, prompt_id, comment_id, response in rows:
        answers.setdefault((model, prompt_id), {})[comment_id] = response
    return answers


def main() -> None:
    if not (JIGSAW / "teacher_responses.parquet").is_file():
        print(f"no shared Jigsaw data at {JIGSAW}: nothing to rank")
        return
    task = load_task("toxicity")
    sets = gold_rows()
    answers = logged_answers()
    script = []
    for (model, prompt_id), by_id in answers.items():
        template = task.prompt(prompt_id)
        texts = {cid: text for rows in sets.values() for cid, text, _ in rows}
        for comment_id, response in by_id.items():
            if comment_id in texts:
                script.append({"model": model, "content": template.render(texts[comment_id]), "response": response})

    direct: list[ConfigScore] = []
    replayed: list[ConfigScore] = []
    with tempfile.TemporaryDirectory(prefix="teacher-leaderboard-") as tmp:
        work = Path(tmp)
        script_path = work / "script.jsonl"
        script_path.write_text("".join(json.dumps(entry) + "\n" for entry in script))
        with running_server(work / "server.log", script=script_path) as url:
            ledger = Ledger.open(LocalStore(work / "store"), work / "journal")
            client = TeacherClient(
                ClientSettings(api_base=url + "/v1", api_key="sk-replay", max_concurrency=16), ledger
            )
            started = time.monotonic()
            for model, prompt_id, temperature in CONFIGS:
                by_id = answers.get((model, prompt_id), {})
                covered = {
                    name: [(cid, text, gold) for cid, text, gold in rows if cid in by_id] for name, rows in sets.items()
                }
                gold_sets = [
                    GoldSet(name, [t for _, t, _ in rows], [g for *_, g in rows])
                    for name, rows in covered.items()
                    if rows
                ]
                spec = TeacherSpec(f"openai/{model}", prompt_id, temperature, max_tokens=256)
                replayed += evaluate_teachers(client, [spec], task, gold_sets).scores
                direct.append(
                    ConfigScore(
                        spec.model, prompt_id, temperature,
                        {name: score_responses(task.label, [g for *_, g in rows], [by_id[cid] for cid, _, _ in rows])
                         for name, rows in covered.items() if rows},
                        None, 0,
                    )
                )  # fmt: skip
            elapsed = time.monotonic() - started
            ledger.close()
    for a, b in zip(direct, replayed, strict=True):
        assert a.sets == b.sets, f"replay disagrees with the logged answers for {a.name}: {a.sets} vs {b.sets}"
    board = rank(replayed)
    sizes = ", ".join(f"{name} {len(rows):,} rows" for name, rows in sets.items())
    text = "\n".join(
        [
            f"Gold test sets: {sizes}. {client.totals.paid_calls:,} answers replayed through litellm and the test "
            f"server in {elapsed:.0f} s; the scores equal those computed directly from the logged answers.",
            "",
            board.markdown(),
            "Cost per 1,000 answers: tokens counted by the server (cl100k), priced by litellm's price map "
            "(gpt-4-1106-preview $10 / $30, gpt-3.5-turbo $0.50 / $1.50 per million input / output tokens).",
            "",
            "command: python bench/teacher_leaderboard.py",
        ]
    )
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
