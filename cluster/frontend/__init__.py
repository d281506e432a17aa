"""The gRPC frontend: tpserve.v1, the KServe v2 protocol, health, reflection, metrics."""
