"""Resources shared by every stage: the object store and the task configuration."""

import os

import dagster as dg

from distill_pipeline.core.store import DEFAULT_LOCAL_STORE, ObjectStore, open_store
from distill_pipeline.core.task import Task, load_task


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
            client = S3Resource(endpoint_url=self.endpoint_url, region_name=self.region_name).get_client()
            return open_store(url, s3_client=client)
        return open_store(url)


class TaskResource(dg.ConfigurableResource):
    """The task being distilled (``DISTILL_TASK``: a built-in task id or a task folder)."""

    name: str | None = None

    def load(self) -> Task:
        return load_task(self.name)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"store": StoreResource(), "task": TaskResource()})
