"""Prometheus metrics of a frontend (names in the style tpserve_<what>_<unit>)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.errors import PortInUse

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
        self.refused = Counter("tpserve_requests_refused_total", "Requests refused with RESOURCE_EXHAUSTED", registry=r)
        self.aborted = Counter("tpserve_requests_aborted_total", "Requests cancelled or past their deadline", registry=r)
        self.resumed = Counter("tpserve_requests_resumed_total",
                               "Requests continued on another replica after theirs was lost", registry=r)
        self.quarantined = Counter("tpserve_requests_quarantined_total",
                                   "Requests not resumed again: in flight on 2 replicas that failed", registry=r)
        self.unauthenticated = Counter("tpserve_requests_unauthenticated_total",
                                       "Calls refused for a missing or wrong bearer token", registry=r)
        self.generated = Counter("tpserve_generation_tokens_total", "Tokens generated", registry=r)
        self.routed = Counter("tpserve_routing_decisions_total",
                              "Placements by what decided them: cache (a prefix hit won), load (no cache "
                              "advantage), balance (the balance guard overrode the cache), round-robin",
                              ["reason"], registry=r)

    def serve(self, port: int, host: str) -> None:
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise PortInUse("metrics-port", f"cannot listen on {host}:{port} ({e.strerror}); pick another with "
                                            f"--metrics-port (0 turns metrics off)") from None

    def watch(self, router) -> None:
        """Per-replica series, read from the router at each scrape (so a Prometheus-only
        deployment sees them, and a replaced replica's series go with it)."""
        self.registry.register(ReplicaCollector(router))


class ReplicaCollector(Collector):
    """What the frontend knows of each replica it routes to, as of this scrape: the engine's own
    load and counters (from its latest KVEvents and step outputs) and this frontend's books."""

    def __init__(self, router):
        self.router = router

    def collect(self):
        r = self.router
        handles = list(r.replicas.values())
        sizes = r.index.sizes()

        def family(name, doc):
            return GaugeMetricFamily(name, doc, labels=["replica"])

        kv = family("tpserve_kv_cache_usage_ratio", "Share of a replica's KV blocks in use")
        hits = family("tpserve_prefix_cache_hit_tokens", "Prompt tokens a replica served from its prefix cache")
        ratio = family("tpserve_prefix_cache_hit_ratio",
                       "Prompt tokens a replica served from its prefix cache / prompt tokens it was sent")
        index = family("tpserve_routing_index_blocks", "Block keys the frontend's KV index holds for a replica")
        in_flight = family("tpserve_replica_requests_in_flight",
                           "Requests this frontend has placed on a replica and not finished")
        load_tokens = family("tpserve_replica_load_tokens",
                             "Tokens a replica still has to prefill or may generate: its engine's load "
                             "plus this frontend's placements the engine has not yet counted")
        # Speculative decoding (vLLM's spec_decode_* names; zero where a replica does not speculate).
        def counter(name, doc):
            return CounterMetricFamily(name, doc, labels=["replica"])

        drafts = counter("tpserve_spec_decode_num_drafts", "Sequence-steps that verified proposed tokens")
        draft_tokens = counter("tpserve_spec_decode_num_draft_tokens", "Tokens proposed for verification")
        accepted = counter("tpserve_spec_decode_num_accepted_tokens", "Proposed tokens the target model accepted")
        paused = counter("tpserve_spec_decode_num_paused",
                         "Times a request's proposals were paused because too few were accepted")
        declined = counter("tpserve_spec_decode_num_declined",
                           "Sequence-steps left without proposals because verifying them was not expected "
                           "to pay at this step's measured cost")
        mean_len = family("tpserve_spec_decode_mean_accepted_length",
                          "Tokens a verifying sequence-step emitted on average: 1 + accepted / drafts")
        waiting = 0
        for h in handles:
            rid, load, st = h.replica_id, h.client.load, h.client.stats
            waiting += load.waiting
            if load.num_blocks:
                kv.add_metric([rid], 1 - load.free_blocks / load.num_blocks)
            hits.add_metric([rid], st.prefix_hit_tokens)
            if st.prefix_queried_tokens:
                ratio.add_metric([rid], st.prefix_hit_tokens / st.prefix_queried_tokens)
            index.add_metric([rid], sizes.get(rid, 0))
            in_flight.add_metric([rid], h.book.in_flight)
            load_tokens.add_metric([rid], h.load())
            drafts.add_metric([rid], st.spec_drafts)
            draft_tokens.add_metric([rid], st.spec_draft_tokens)
            accepted.add_metric([rid], st.spec_accepted_tokens)
            paused.add_metric([rid], st.spec_paused)
            declined.add_metric([rid], st.spec_declined)
            if st.spec_drafts:
                mean_len.add_metric([rid], 1 + st.spec_accepted_tokens / st.spec_drafts)
        yield from (kv, hits, ratio, index, in_flight, load_tokens, drafts, draft_tokens, accepted, paused, declined,
                    mean_len)
        yield GaugeMetricFamily("tpserve_requests_waiting", "Requests queued in replica engines", value=waiting)
        yield GaugeMetricFamily("tpserve_replicas_ready", "Replicas this frontend can route to", value=len(r.ready))
        yield CounterMetricFamily("tpserve_replica_restarts", "Replicas the controller replaced (failed, hung "
                                  "or lost), as of the frontend's last look", value=r.restarts)
        yield CounterMetricFamily("tpserve_replica_reconnects", "Channels to a still-listed replica rebuilt "
                                  "after a transient error", value=r.reconnects)
