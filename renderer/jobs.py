"""Running as a Ray job (`ray job submit ... -- freescale-render ...`).

Ray's job supervisor starts the entrypoint as a shell command with, among its environment:
* RAY_ADDRESS: the cluster's GCS address, which `ray.init()` (so `cluster.placement.connect`) joins;
* RAY_JOB_CONFIG_JSON_ENV_VAR: `{"runtime_env": {...}, "metadata": {"job_submission_id": ID, "job_name": ID, ...}}`,
  the job's config, which `ray.init()` applies to the driver (Ray 2.x, `dashboard/modules/job/job_supervisor.py`;
  the key is `ray.dashboard.modules.job.common.JOB_ID_METADATA_KEY`).
Child processes of the entrypoint inherit both. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import os

JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SUBMISSION_ID_KEY = "job_submission_id"


def submission_id(environ: dict[str, str] | None = None) -> str | None:
    """The Ray Jobs submission id (`--submission-id`, or Ray's `raysubmit_...`) when this process runs
    under `ray job submit` (or the Jobs SDK / a KubeRay RayJob), else None."""
    text = (os.environ if environ is None else environ).get(JOB_CONFIG_VARIABLE)
    if not text:
        return None
    try:
        metadata = json.loads(text).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    value = metadata.get(SUBMISSION_ID_KEY) if isinstance(metadata, dict) else None
    return str(value) if value else None
