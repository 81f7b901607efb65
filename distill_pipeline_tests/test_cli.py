"""The command line: a user's mistake is one line and exit status 2; a bug is one line and exit
status 1, its traceback shown only with ``--debug``; no command destroys the data it is given."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline import cli
from distill_pipeline.core.layout import GOLD_LABELS
from distill_pipeline.core.store import LocalStore
from distill_pipeline.data.gold import GOLD_HISTORY
from distill_pipeline.logs.schema import LOG_PREFIX

IMPORT = ["--constant", "model=openai/gpt-4o", "--constant", "prompt_template_id=simple_prompt"]


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: object) -> tuple[int, str, str]:
    """``distill-pipeline --store <tmp>/store ARGV`` in process: (exit status, stdout, stderr)."""
    try:
        code = cli.main(["--store", str(tmp_path / "store"), *map(str, argv)])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *phrases: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("distill-pipeline"), lines[0]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def calls_csv(tmp_path: Path) -> Path:
    return write(tmp_path / "calls.csv", "id,text,answer\n" + "".join(f"r{i},comment {i},{i % 2}\n" for i in range(6)))


def comments_jsonl(tmp_path: Path) -> Path:
    return write(tmp_path / "comments.jsonl", '{"comment": "you idiot"}\n{"comment": "nice post"}\n')


def fake_adapter(tmp_path: Path, weights: bytes) -> Path:
    """An adapter folder whose files are all there, its weights being ``weights``."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    write(folder / "adapter_config.json", json.dumps({"peft_type": "LORA"}))
    write(folder / "student.json", json.dumps({"student_kind": "encoder", "base_model": None}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def import_(source: Path, *, input_map: str = "input=text", day: str = "2024-01-01") -> list[object]:
    """``import SOURCE`` with a full mapping, but for ``--map INPUT_MAP`` and ``--day DAY``."""
    return ["import", source, "--map", input_map, "--map", "response=answer", "--day", day, *IMPORT]


def predict(tmp_path: Path, adapter: object, *extra: object) -> list[object]:
    return ["predict", "--adapter", adapter, "--input", comments_jsonl(tmp_path), "--text-column", "comment", *extra]


# Each case: the arguments for a user's mistake, and what its one line must say.
USER_ERRORS: dict[str, Callable[[Path], tuple[list[object], tuple[str, ...]]]] = {
    "import: a --map typo": lambda t: (
        import_(calls_csv(t), input_map="inptu=text"),
        ("no log field 'inptu'", "did you mean 'input'?"),
    ),
    "import: a --map without =": lambda t: (
        import_(calls_csv(t), input_map="input"),
        ("--map 'input' is not FIELD=COLUMN", "write e.g. --map input="),
    ),
    "import: a CSV that does not parse": lambda t: (
        import_(write(t / "broken.csv", "text,answer\nfine,0\ntoo,many,cells\n")),
        ("broken.csv' is not a readable csv file", "Expected 2 columns, got 3", "fix or re-export it"),
    ),
    "import: a bad --day": lambda t: (
        import_(calls_csv(t), day="2024-13-01"),
        ("the day '2024-13-01' is not a date", "YYYY-MM-DD"),
    ),
    "import: an unknown extension": lambda t: (
        import_(write(t / "calls.txt", '{"text": "hi", "answer": "0"}\n')),
        ("from its extension '.txt'", "rename it to end in one of .csv,"),
    ),
    "import: a boolean answer column": lambda t: (
        import_(write(t / "calls.jsonl", '{"text": "hi", "answer": true}\n{"text": "yo", "answer": false}\n')),
        ("column 'answer' (mapped to response) holds bool values (the first at row 0: True)", "takes text"),
    ),
    "gold: a missing text column": lambda t: (
        ["gold", write(t / "gold.csv", "input,gold_label\na,1\n"), "--text-column", "comment"],
        ("no column 'comment'", "name the right one with --text-column"),
    ),
    "gold: a header-only table": lambda t: (
        ["gold", write(t / "gold.csv", "input,gold_label\n")],
        ("gold.csv: the table has no rows",),
    ),
    "gold: an empty file": lambda t: (
        ["gold", write(t / "gold.csv", "")],
        ("gold.csv' is not a readable csv file: Empty CSV file",),
    ),
    "gold: one text labelled differently in two test sets": lambda t: (
        [
            "gold",
            write(t / "gold.csv", "input,gold_label,split\nyou idiot,1,balanced\nok,0,balanced\nyou idiot,0,ind\n"),
            *("--test-set-column", "split"),
        ],
        ("rows 0 and 2: the same text with labels 1 and 0 (test sets 'balanced' and 'ind')", "one label"),
    ),
    "predict: --batch-size 0": lambda t: (
        predict(t, "champion", "--output", t / "out.parquet", "--batch-size", "0"),
        ("argument --batch-size: '0' is not a positive whole number", "--help"),
    ),
    "predict: --prior 1.5": lambda t: (
        predict(t, "champion", "--output", t / "out.parquet", "--prior", "1.5"),
        ("argument --prior: '1.5' is not 'auto', 'train' or a share between 0 and 1", "--help"),
    ),
    "predict: a missing text column": lambda t: (
        ["predict", "--adapter", "champion", "--input", comments_jsonl(t), "--output", t / "out.parquet"],
        ("comments.jsonl' has no column 'input'; it has ['comment']", "--text-column"),
    ),
    "predict: a nonexistent relative adapter path": lambda t: (
        predict(t, "./no/such/adapter", "--output", t / "out.parquet"),
        ("no adapter './no/such/adapter': no such folder here", "champion"),
    ),
    "predict: a nonexistent absolute adapter path": lambda t: (
        predict(t, t / "no-such-adapter", "--output", t / "out.parquet"),
        ("no-such-adapter': no such folder here",),
    ),
    "predict: a folder that is no adapter": lambda t: (
        predict(t, t, "--output", t / "out.parquet"),
        ("is not an adapter folder: it holds no student.json",),
    ),
    "predict: nothing published under a prefix": lambda t: (
        predict(t, "students/adapters/size=5pct/nope", "--output", t / "out.parquet"),
        ("no such folder here, and nothing published under students/adapters/size=5pct/nope/",),
    ),
    "predict: the output is the input": lambda t: (
        predict(t, "champion", "--output", t / "comments.jsonl"),
        ("comments.jsonl' is the input table: write the labels to another file",),
    ),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line_and_exit_status_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, phrases = USER_ERRORS[case](tmp_path)
    code, _out, err = run(capsys, tmp_path, *argv)
    line = assert_one_line_error(code, err, *phrases)
    assert "source_format" not in line and "invalid store key" not in line


def test_corrupt_adapter_weights_are_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = fake_adapter(tmp_path, b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _out, err = run(capsys, tmp_path, *predict(tmp_path, adapter, "--output", tmp_path / "out.parquet"))
    assert_one_line_error(code, err, "adapter_model.safetensors is not readable safetensors", "export it again")
    assert not (tmp_path / "out.parquet").exists()


def test_a_pickled_adapter_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = fake_adapter(tmp_path, b"")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    code, _out, err = run(capsys, tmp_path, *predict(tmp_path, adapter, "--output", tmp_path / "out.parquet"))
    assert_one_line_error(code, err, "has no adapter_model.safetensors", "never from a pickled adapter_model.bin")


def test_predict_never_writes_over_its_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = comments_jsonl(tmp_path)
    before = source.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(source)
    (tmp_path / "sub").mkdir()
    for output in (source, tmp_path / "link.jsonl", tmp_path / "sub" / ".." / "comments.jsonl"):
        code, _out, err = run(capsys, tmp_path, *predict(tmp_path, "champion", "--output", output))
        assert_one_line_error(code, err, "is the input table")
        assert source.read_bytes() == before


def test_gold_refuses_an_empty_table_and_keeps_the_current_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = LocalStore(tmp_path / "store")
    assert run(capsys, tmp_path, "gold", write(tmp_path / "reviewed.csv", "input,gold_label\na,1\nb,0\n"))[0] == 0
    current = (store.root / GOLD_LABELS).read_bytes()
    for empty in ("input,gold_label\n", ""):
        code, _out, err = run(capsys, tmp_path, "gold", write(tmp_path / "empty.csv", empty))
        assert_one_line_error(code, err)
        assert (store.root / GOLD_LABELS).read_bytes() == current
    assert store.list(GOLD_HISTORY) == []


def test_gold_keeps_the_table_it_replaces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStore(tmp_path / "store")
    code, out, _err = run(capsys, tmp_path, "gold", write(tmp_path / "first.csv", "input,gold_label\na,1\nb,0\n"))
    assert code == 0 and "replaced" not in out
    first = (store.root / GOLD_LABELS).read_bytes()

    code, out, _err = run(capsys, tmp_path, "gold", write(tmp_path / "second.csv", "input,gold_label\nc,1\n"))

    assert code == 0
    (kept,) = store.list(GOLD_HISTORY)
    assert kept.key.endswith(".parquet") and store.get_bytes(kept.key) == first
    assert f"the gold table it replaced is kept at {store.url}/{kept.key}" in out
    assert pq.read_table(store.root / GOLD_LABELS).column("input").to_pylist() == ["c"]


def test_reimport_with_a_corrected_day_says_what_it_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = calls_csv(tmp_path)
    assert run(capsys, tmp_path, *import_(source, day="2024-01-15"), "--map", "request_id=id")[0] == 0
    code, out, _err = run(capsys, tmp_path, *import_(source, day="2024-01-16"), "--map", "request_id=id")
    assert code == 0 and "removed 1 object(s) an earlier import of this table wrote on 2024-01-15" in out
    store = LocalStore(tmp_path / "store")
    assert [info.key.split("/")[1] for info in store.list(f"{LOG_PREFIX}/")] == ["dt=2024-01-16"]


def test_a_bug_is_one_line_and_exit_status_1_and_debug_shows_its_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_args: object) -> int:
        raise KeyError("no such thing\non two lines")

    monkeypatch.setattr(cli, "_gold", broken)
    code, _out, err = run(capsys, tmp_path, "gold", "reviewed.csv")
    assert code == 1 and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith("distill-pipeline: a bug (KeyError: ") and line.endswith(
        "rerun with --debug for the traceback and report it"
    )

    code, _out, err = run(capsys, tmp_path, "--debug", "gold", "reviewed.csv")
    assert code == 1 and err.startswith("Traceback (most recent call last):") and "in broken" in err


def test_debug_shows_the_traceback_of_a_user_error_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run(capsys, tmp_path, "--debug", "gold", write(tmp_path / "g.csv", "input,gold_label\n"))
    assert code == 2 and "Traceback" in err and "GoldTableError" in err
    assert err.splitlines()[-1].startswith("distill-pipeline: ")


def test_the_installed_command_reports_a_user_error_in_one_line(tmp_path: Path) -> None:
    executable = shutil.which("distill-pipeline")
    assert executable, "the package is not installed in this environment"
    table = tmp_path / "calls.parquet"
    pq.write_table(pa.table({"text": ["hi"], "answer": [[1]]}), table)
    command = [executable, "--store", str(tmp_path / "store"), *map(str, import_(table))]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert_one_line_error(completed.returncode, completed.stderr, "column 'answer' (mapped to response) holds list")
    assert completed.stdout == ""
