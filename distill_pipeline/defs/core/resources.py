"""Resources shared by every stage: the object store and the task configuration.

The code location distils one task, ``DISTILL_TASK`` (a built-in id or a task folder), read once
here: its training sizes are the size partitions, its monitoring cadences the schedules' and
sensors', and the ``task`` resource serves the same task to every asset, so partitions, cadences
and the runs' configuration cannot disagree.
"""

import functools
import os

import dagster as dg

from distill_pipeline.core.store import DEFAULT_LOCAL_STORE, S3_MAX_ATTEMPTS, ObjectStore, open_store
from distill_pipeline.core.task import Task, TaskConfigError, load_task


class StoreResource(dg.ConfigurableResource):
    """The object store (``DISTILL_STORE``): a local directory by default, or ``s3://bucket/prefix``."""

    url: str | None = None
    endpoint_url: str | None = None
    region_name: str | None = None

    def open(self) -> ObjectStore:
        url = self.url or os.environ.get("DISTILL_STORE") or DEFAULT_LOCAL_STORE
        if url.startswith("s3://"):
            from dagster_aws.s3 import S3Resource

            # boto3 reads AWS_ENDPOINT_URL and the region from the environment when these are unset.
            # S3Resource configures botocore's "standard" retry mode, so with the same attempts its
            # client retries as make_s3_client's (core.store.S3_RETRY_CONFIG). botocore reads its
            # "max_attempts" as retries after the first call, hence the 1 less.
            client = S3Resource(
                endpoint_url=self.endpoint_url, region_name=self.region_name, max_attempts=S3_MAX_ATTEMPTS - 1
            ).get_client()
            return open_store(url, s3_client=client)
        return open_store(url)


@functools.cache
def location_task() -> Task:
    """The code location's task (``DISTILL_TASK``), read once per process."""
    return load_task()


class TaskResource(dg.ConfigurableResource):
    """The task being distilled (``DISTILL_TASK``: a built-in task id or a task folder).

    ``name`` may point at another folder of the same task (tests, a tuned copy), but not at a task
    with a training size that is not one of the location's size partitions: those were fixed when it loaded.
    """

    name: str | None = None

    def load(self) -> Task:
        if self.name is None:
            return location_task()
        task = load_task(self.name)
        fixed = location_task()
        unknown = sorted(set(task.splits.train_sizes) - set(fixed.splits.train_sizes))
        if unknown:
            raise TaskConfigError(
                f"task {self.name!r} has training sizes {unknown} that are not size partitions of this code "
                f"location, whose partitions come from DISTILL_TASK ({fixed.id}: {list(fixed.splits.train_sizes)}); "
                "set DISTILL_TASK and reload the location instead"
            )
        return task


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"store": StoreResource(), "task": TaskResource()})
