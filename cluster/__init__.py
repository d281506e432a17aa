"""Everything that spans replicas or faces clients: CLI, Ray controller, gRPC frontend."""
