"""A Ray head for a test, on loopback (ray.cluster_utils.Cluster), started once more if its GCS
never came up.

Seen once in a full local run (2026-12-06): a head started two seconds after another test's
`tpserve serve` had shut its own Ray down waited 30 s for its GCS port file, and the GCS had
written no log at all: it never reached its own start-up. The next module's head started at once.
The retry restarts the head only (the feature under test has not run yet); what the failed attempt
spawned is killed first, so nothing outlives it."""
from __future__ import annotations

import os
import time
import warnings

import psutil

GCS_TIMEOUT = "Timed out waiting for file"


def _kill_children_since(t0: float) -> None:
    """This process's direct children started at or after t0 (a failed head's GCS and the like)."""
    for child in psutil.Process().children():
        try:
            if child.create_time() >= t0 - 1:
                child.kill()
                child.wait(5)  # reaped: no zombie left behind
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass


def start_head(**head_node_args):
    """ray.cluster_utils.Cluster(initialize_head=True, head_node_args=...), retried once on a GCS
    that never published its port."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    for attempt in (1, 2):
        t0 = time.time()
        try:
            return Cluster(initialize_head=True, head_node_args=head_node_args)
        except RuntimeError as e:
            if attempt == 2 or GCS_TIMEOUT not in str(e):
                raise
            warnings.warn(f"a Ray head's GCS never came up ({e}); starting it once more")
            _kill_children_since(t0)
