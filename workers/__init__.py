"""One tensor-parallel replica's inside: parallel layers, models, weight loading, workers.

This package never imports Ray or gRPC, so a worker group runs under the local launcher,
under Ray actors, or inside a test.
"""
