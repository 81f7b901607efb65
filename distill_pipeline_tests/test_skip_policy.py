"""The skip policy of conftest.py: under CI=true a skip fails the run unless its reason is allowlisted.

Each test runs a tiny inner pytest session (pytester, in process) with the project's conftest
loaded as a plugin, so the hooks under test are the ones the real suite runs with.
"""

from __future__ import annotations

import pytest

from distill_pipeline_tests import conftest

pytest_plugins = ["pytester"]

INNER_SUITE = f"""
import pytest

def test_runs():
    pass

def test_missing_tool():
    pytest.skip("chromedriver is not installed")

def test_needs_a_gpu():
    pytest.skip({conftest.GPU_SKIP_REASON!r})

@pytest.mark.xfail(reason="a known bug, not a skip")
def test_known_bug():
    assert False
"""


def run_inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None, source: str):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_inprocess(
        "-p", "distill_pipeline_tests.conftest", "-rs", "-W", "ignore::pytest.PytestUnknownMarkWarning"
    )


def test_under_ci_a_skip_off_the_allowlist_fails_the_run_and_is_named(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_inner(pytester, monkeypatch, "true", INNER_SUITE)

    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*skips not allowed under CI*",
            "test_inner.py::test_missing_tool: chromedriver is not installed",
            "1 skip(s)*",
        ]
    )
    assert "test_inner.py::test_needs_a_gpu:" not in result.stdout.str()  # the allowlisted one is not blamed
    assert "test_known_bug" not in result.stdout.str()  # an xfail is not a skip


def test_under_ci_allowlisted_skips_pass(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    source = INNER_SUITE.replace('pytest.skip("chromedriver is not installed")', "pass")

    result = run_inner(pytester, monkeypatch, "true", source)

    result.assert_outcomes(passed=2, skipped=1, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    assert "skips not allowed under CI" not in result.stdout.str()


def test_outside_ci_skips_are_only_reported(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_inner(pytester, monkeypatch, None, INNER_SUITE)

    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["SKIPPED*chromedriver is not installed"])


def test_under_ci_a_module_skipped_at_collection_fails_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = (
        'import pytest\n\npytest.importorskip("a_training_stack_that_is_not_installed")\n\ndef test_x():\n    pass\n'
    )

    result = run_inner(pytester, monkeypatch, "true", source)

    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skips not allowed under CI*", "test_inner.py: could not import*"])


def test_a_gpu_test_without_cuda_skips_for_the_allowlisted_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conftest, "cuda_available", lambda: False)
    source = "import pytest\n\n@pytest.mark.gpu\ndef test_on_gpu():\n    assert False, 'must not run without a GPU'\n"

    result = run_inner(pytester, monkeypatch, "true", source)

    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines([f"SKIPPED*{conftest.GPU_SKIP_REASON}"])
