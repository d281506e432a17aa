"""Figures the reliability tests record for docs/reliability.md.

With TPSERVE_RELIABILITY_OUT set (scripts/reliability_report.py sets it), each `record` call
appends one JSON line there; otherwise it does nothing. The report is made from real test runs,
so the table and the tests cannot disagree.
"""
from __future__ import annotations

import json
import os


def record(kind: str, figures: dict) -> None:
    path = os.environ.get("TPSERVE_RELIABILITY_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, **figures}) + "\n")
