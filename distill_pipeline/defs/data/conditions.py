"""When the stages after ingestion run by themselves (declarative automation).

Ingestion runs are launched by the fresh-logs sensor; everything here follows from them. Each
condition waits for the blocking checks of what it reads, so a day whose quarantine or parse
failure rate is out of bounds stops the flow until someone looks.
"""

import dagster as dg

AC = dg.AutomationCondition

# "Every dependency passed its blocking checks" for a dependency with many day partitions. The
# built-in all_deps_blocking_checks_passed() maps a dependency's passing partitions onto the
# unpartitioned child, so one passing day would do; here a single failed blocking check on any
# day is enough to wait.
_NO_DEP_FAILED_A_BLOCKING_CHECK = ~AC.any_deps_match(
    AC.any_checks_match(AC.check_failed(), blocking_only=True).with_label("a_blocking_check_failed")
).with_label("a_dependency_failed_a_blocking_check")

#: Recompute when any dependency partition updated, once nothing upstream is in progress and no
#: dependency failed a blocking check. Unlike ``eager()`` it does not wait for missing dependency
#: partitions (days without logs).
AFTER_ANY_UPSTREAM_UPDATE = (
    AC.any_deps_updated().since_last_handled()
    & ~AC.any_deps_in_progress()
    & ~AC.in_progress()
    & _NO_DEP_FAILED_A_BLOCKING_CHECK
).with_label("after_any_upstream_update")

#: For the frozen test sets and the training sets: eager, behind the curated pool's blocking checks.
EAGER_BEHIND_CHECKS = (AC.eager() & AC.all_deps_blocking_checks_passed()).with_label("eager_behind_checks")

#: For the frozen test sets: made once, when curated data first passes its blocking checks. Later
#: curation leaves them alone (reusing them would only record a no-op materialisation); a rebuild
#: is launched by hand with ``rebuild: true``.
ONCE_BEHIND_CHECKS = (
    AC.missing()
    & AC.any_deps_updated().since_last_handled()
    & ~AC.any_deps_missing()
    & ~AC.any_deps_in_progress()
    & ~AC.in_progress()
    & AC.all_deps_blocking_checks_passed()
).with_label("once_behind_checks")
