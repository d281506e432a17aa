"""Capacity planning: `tpserve profile` measures a machine, `tpserve plan` predicts each
configuration's latency and throughput on it (a roofline step cost driving the simulator)."""
