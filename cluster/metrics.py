"""Prometheus metrics of a frontend (names in the style tpserve_<what>_<unit>)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.ttft = Histogram("tpserve_time_to_first_token_seconds", "Time from admission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tpserve_inter_token_latency_seconds", "Gap between successive token deliveries",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tpserve_e2e_request_latency_seconds", "Admission to the final token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("tpserve_requests_running", "Requests admitted and not finished", registry=r)
        self.waiting = Gauge("tpserve_requests_waiting", "Requests queued in replica engines", registry=r)
        self.refused = Counter("tpserve_requests_refused_total", "Requests refused with RESOURCE_EXHAUSTED", registry=r)
        self.aborted = Counter("tpserve_requests_aborted_total", "Requests cancelled or past their deadline", registry=r)
        self.resumed = Counter("tpserve_requests_resumed_total",
                               "Requests continued on another replica after theirs was lost", registry=r)
        self.unauthenticated = Counter("tpserve_requests_unauthenticated_total",
                                       "Calls refused for a missing or wrong bearer token", registry=r)
        self.generated = Counter("tpserve_generation_tokens_total", "Tokens generated", registry=r)
        self.kv_usage = Gauge("tpserve_kv_cache_usage_ratio", "Share of KV blocks in use", ["replica"], registry=r)
        self.replica_in_flight = Gauge("tpserve_replica_requests_in_flight",
                                       "Requests this frontend has placed on a replica and not finished",
                                       ["replica"], registry=r)
        self.replica_outstanding = Gauge("tpserve_replica_outstanding_tokens",
                                         "Tokens this frontend still expects a replica to prefill or generate",
                                         ["replica"], registry=r)
        self.routed = Counter("tpserve_routing_decisions_total",
                              "Placements by what decided them: cache (a prefix hit won), load (no cache "
                              "advantage), balance (the balance guard overrode the cache), round-robin",
                              ["reason"], registry=r)
        self.index_blocks = Gauge("tpserve_routing_index_blocks",
                                  "Block keys the frontend's KV index holds for a replica", ["replica"], registry=r)
        self.prefix_hit_ratio = Gauge("tpserve_prefix_cache_hit_ratio",
                                      "Prompt tokens a replica served from its prefix cache / prompt tokens it was sent",
                                      ["replica"], registry=r)
        self.prefix_hits = Gauge("tpserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                 ["replica"], registry=r)

    def serve(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def update_replicas(self, statuses: list[dict]) -> None:
        waiting = 0
        for s in statuses:
            st = s["stats"]
            waiting += st.waiting
            if st.num_blocks:
                self.kv_usage.labels(s["replica_id"]).set(1 - st.free_blocks / st.num_blocks)
            self.prefix_hits.labels(s["replica_id"]).set(st.prefix_hit_tokens)
            if st.prefix_queried_tokens:
                self.prefix_hit_ratio.labels(s["replica_id"]).set(st.prefix_hit_tokens / st.prefix_queried_tokens)
            self.index_blocks.labels(s["replica_id"]).set(s.get("index_blocks", 0))
            self.replica_in_flight.labels(s["replica_id"]).set(s["in_flight"])
            self.replica_outstanding.labels(s["replica_id"]).set(s["outstanding"])
        self.waiting.set(waiting)
