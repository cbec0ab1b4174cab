"""What the Flink runbooks share: which job (parameters) and its lock target, so flink-job-crashed
and flink-job-degraded never act on one job at once."""

from pydantic import Field

from blocks.flink import FlinkCluster
from runbooks.params import BlockName, RunbookParams
from runbooks.safety import Target
from tasks.flink import get_jobmanager_address


class FlinkJobParams(RunbookParams):
    """The job a Flink runbook acts on and how to run it again."""

    flink_block: BlockName = Field(
        "default", description="Name of the Runbooks Flink Cluster block."
    )
    job_name: str = Field(
        "enrichment-job", description="Name of the Flink job, as in the dashboard."
    )
    jar: str = Field(
        "enrichment-job.jar",
        description="Jar to run, already uploaded to the cluster: its file name or its /jars id.",
    )
    entry_class: str | None = Field(
        None, description="Main class to run; empty uses the one in the jar's manifest."
    )
    program_args: list[str] = Field(
        default_factory=list, description="Arguments passed to the job's main method."
    )


def job_target(flink: FlinkCluster, job_name: str) -> Target:
    """The job's lock target: the JobManager's address (resolved) and the job's name."""
    return Target(
        "flink-job",
        f"{flink.rest_url.rstrip('/')}/{job_name}",
        f"{get_jobmanager_address(flink)} job {job_name}",
    )
