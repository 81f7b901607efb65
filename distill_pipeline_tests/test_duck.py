"""DuckDB connections: the memory a stage lends to numpy while DuckDB sits idle comes back."""

from distill_pipeline.core import duck


def _limit(con) -> str:
    return con.execute("SELECT current_setting('memory_limit')").fetchone()[0]


def _used(con) -> int:
    return con.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()[0]


def test_set_aside_lowers_duckdbs_memory_and_gives_it_back_with_the_tables_intact(tmp_path):
    con = duck.connect(tmp_path, memory_limit="1GB")
    configured = _limit(con)
    # Strings of about 250 MB: more than DuckDB keeps while set aside, so most go to disk.
    con.execute("CREATE TABLE t AS SELECT range AS i, repeat('x', 240) || range AS s FROM range(1000000)")
    expected = con.execute("SELECT count(*), sum(length(s)), max(s) FROM t").fetchone()
    assert _used(con) > 200 * 2**20
    with duck.set_aside(con, memory_limit="1GB"):
        inside = _limit(con)
        used = _used(con)
    assert inside != configured and inside.endswith("MiB") and float(inside.split()[0]) <= 128
    assert used <= 128 * 2**20
    assert _limit(con) == configured
    assert con.execute("SELECT count(*), sum(length(s)), max(s) FROM t").fetchone() == expected
