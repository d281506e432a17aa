"""`tpserve bench`: a load-test harness with the serving field's standard metric definitions."""

HARNESS_VERSION = "0.1.0"
