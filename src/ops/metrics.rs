//! Prometheus metrics of the daemon, all named `eventsync_*` in base units.

use std::sync::OnceLock;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Every metric the daemon exports.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Events appended to the log, by stream and operation.
    pub events_appended: IntCounterVec,
    /// Change events read from MongoDB, by stream.
    pub changes_read: IntCounterVec,
    /// Changes that produced no event (already covered by an earlier lookup, no-ops).
    pub changes_skipped: IntCounterVec,
    /// Now minus the cluster time of the last change read, seconds.
    pub change_stream_lag: GaugeVec,
    /// Now minus the wall time of the last change appended to the log, seconds.
    pub replication_lag: GaugeVec,
    /// Changes per processed batch.
    pub batch_size: HistogramVec,
    /// Time to diff one change.
    pub diff_duration: HistogramVec,
    /// Time to append one batch (events, shadows, checkpoint).
    pub append_duration: HistogramVec,
    /// Errors by component and kind.
    pub errors: IntCounterVec,
    /// Changes sent to the dead letter collection, by stream and reason.
    pub dead_letters: IntCounterVec,
    /// Full re-reads after the resume point was lost, by stream.
    pub resyncs: IntCounterVec,
    /// Stream lifecycle events (drop, rename, dropdatabase, invalidate, other), by stream and kind.
    pub stream_events: IntCounterVec,
    /// 1 while this replica holds the stream's lease and consumes it, 0 otherwise
    /// (standing by, starting, failed); set by [`crate::ops::Health::set_role`] too.
    pub lease_held: IntGaugeVec,
    /// Lease acquisitions (a fast-growing value means flapping), by stream.
    pub lease_acquired: IntCounterVec,
    /// Streams this replica holds or is claiming (balanced leases).
    pub streams_held: IntGauge,
    /// Live replicas in this replica's membership view.
    pub live_replicas: IntGauge,
    /// This replica's fair share of the streams, `⌈streams / live replicas⌉`.
    pub fair_share: IntGauge,
    /// Streams moved by the balance, by kind: `handed_over` (released to a replica under
    /// its share), `orphan_taken` (claimed over the share after the grace).
    pub rebalances: IntCounterVec,
    /// Seconds since the stream's checkpoint was last stored, for streams this replica
    /// consumes. Recomputed from [`Metrics::checkpoint_timestamp`] at every scrape, so it
    /// keeps growing while nothing is stored (a stalled or idle stream).
    pub checkpoint_age: GaugeVec,
    /// Unix time of the last stored checkpoint, by stream.
    pub checkpoint_timestamp: GaugeVec,
    /// Sync API requests by route, method and status.
    pub http_requests: IntCounterVec,
    /// Sync API latency by route.
    pub http_duration: HistogramVec,
    /// Answers refused because of the request (4xx) or overload (503 busy), by status and
    /// code; not daemon errors (those are in `errors`).
    pub http_client_errors: IntCounterVec,
    /// Catch-ups (`POST /v1/sync/missing`) being served now.
    pub catchups_in_flight: IntGauge,
    /// Catch-ups refused by admission control (503 + Retry-After).
    pub catchups_rejected: IntCounterVec,
    /// Operator actions, by stream, action and outcome (`requested`, `done`, `failed`).
    pub admin_actions: IntCounterVec,
    /// 1 while an operator paused the stream (this replica consumes it), else 0.
    pub stream_paused: IntGaugeVec,
    /// Time between a change's wall (or cluster) time and its reading by the daemon:
    /// Debezium's MilliSecondsBehindSource, in base units (seconds).
    pub behind_source: HistogramVec,
    /// Age of the stream's stored resume token: now minus the cluster time it points at,
    /// seconds (set while this replica consumes the stream).
    pub resume_token_age: GaugeVec,
    /// Time span of the server's change history (oplog): newest minus oldest entry, seconds.
    /// Absent when the server exposes neither `replSetGetStatus` nor `local.oplog.rs`.
    /// (A vector without labels: no sample until the first value is set.)
    pub oplog_window: GaugeVec,
    /// How long until the stream's resume point falls off the oplog at the current window:
    /// cluster time of the resume point minus that of the oldest oplog entry, seconds.
    /// Absent when the oplog is not visible.
    pub oplog_headroom: GaugeVec,
    /// Open live subscriptions.
    pub live_subscribers: IntGauge,
    /// Queries of the event log (events or snapshots by position) made to serve sync
    /// clients, by reader: `tail` (the shared live tail of a stream), `subscriber` (a live
    /// subscriber behind the tail's buffer), `missing` (`/v1/sync/missing`).
    pub log_reads: IntCounterVec,
    /// Events compacted away.
    pub compacted: IntCounterVec,
    /// 1 while MongoDB answers the readiness ping (set by [`crate::ops::Health::set_mongo`]).
    pub mongodb_reachable: IntGauge,
    /// 1 while `/readyz` would answer 200 (set at every scrape of `/metrics`).
    pub ready: IntGauge,
    /// Build information (always 1).
    pub build_info: IntGaugeVec,
    /// Process start time.
    pub start_time: Gauge,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

const SECONDS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The `operation` label values of `eventsync_events_appended_total`.
const OPERATIONS: [&str; 4] = ["insert", "update", "replace", "delete"];

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let secs = SECONDS.to_vec();
        let m = Metrics {
            events_appended: counter(&r, "eventsync_events_appended_total", "Events appended to the log.", &["stream", "operation"]),
            changes_read: counter(&r, "eventsync_changes_read_total", "Change events read from MongoDB change streams.", &["stream"]),
            changes_skipped: counter(&r, "eventsync_changes_skipped_total", "Changes that produced no event because an earlier lookup already covered them or they changed nothing.", &["stream"]),
            change_stream_lag: gauge(&r, "eventsync_change_stream_lag_seconds", "Now minus the cluster time of the last change read.", &["stream"]),
            replication_lag: gauge(&r, "eventsync_replication_lag_seconds", "Now minus the wall time of the last change whose event reached the log.", &["stream"]),
            batch_size: histogram(&r, "eventsync_batch_size_changes", "Changes per processed batch.", &["stream"], vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0]),
            diff_duration: histogram(&r, "eventsync_diff_duration_seconds", "Time to decode and diff one change.", &["stream"], secs.clone()),
            append_duration: histogram(&r, "eventsync_append_duration_seconds", "Time to append one batch: events, shadows and checkpoint.", &["stream"], secs.clone()),
            errors: counter(&r, "eventsync_errors_total", "Errors by component and kind.", &["component", "kind"]),
            dead_letters: counter(&r, "eventsync_dead_letters_total", "Changes that could not become events and were recorded as dead letters.", &["stream", "reason"]),
            resyncs: counter(&r, "eventsync_resyncs_total", "Full re-reads of a collection (initial sync or after the resume point was lost).", &["stream", "reason"]),
            stream_events: counter(&r, "eventsync_stream_lifecycle_total", "Change stream lifecycle events by kind: drop, rename, dropdatabase, invalidate (the stream is re-opened), other (ignored).", &["stream", "kind"]),
            lease_held: {
                let g = IntGaugeVec::new(Opts::new("eventsync_lease_held", "1 while this replica holds the stream's lease and consumes it; 0 while it stands by, starts or restarts."), &["stream"]).expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            lease_acquired: counter(&r, "eventsync_lease_acquisitions_total", "Times this replica acquired a stream's lease.", &["stream"]),
            streams_held: {
                let g = IntGauge::new("eventsync_streams_held", "Streams (partitions included) whose lease this replica holds or is claiming.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            live_replicas: {
                let g = IntGauge::new("eventsync_live_replicas", "Live replicas (unexpired heartbeats) seen by this replica.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            fair_share: {
                let g = IntGauge::new("eventsync_fair_share_streams", "This replica's fair share of the streams: ceil(streams / live replicas).").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            rebalances: counter(&r, "eventsync_rebalances_total", "Streams moved by the lease balance: handed_over (released to a replica under its share), orphan_taken (claimed over the share after the grace).", &["kind"]),
            checkpoint_age: gauge(&r, "eventsync_checkpoint_age_seconds", "Seconds since this replica last stored the checkpoint of a stream it consumes (computed at scrape).", &["stream"]),
            checkpoint_timestamp: gauge(&r, "eventsync_checkpoint_timestamp_seconds", "Unix time at which the stream's checkpoint was last stored.", &["stream"]),
            http_requests: counter(&r, "eventsync_http_requests_total", "Sync API requests by route, method and status.", &["route", "method", "status"]),
            http_duration: histogram(&r, "eventsync_http_request_duration_seconds", "Sync API request latency.", &["route"], secs),
            http_client_errors: counter(&r, "eventsync_http_client_errors_total", "Sync API answers refused because of the request (4xx) or overload (503 busy), by status and code; not counted as daemon errors.", &["status", "code"]),
            catchups_in_flight: {
                let g = IntGauge::new("eventsync_catchups_in_flight", "Catch-ups (POST /v1/sync/missing) being served now.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            catchups_rejected: counter(&r, "eventsync_catchups_rejected_total", "Catch-ups refused by admission control (503 with Retry-After).", &["reason"]),
            admin_actions: counter(&r, "eventsync_admin_actions_total", "Operator actions by stream, action and outcome (requested, done, failed).", &["stream", "action", "outcome"]),
            stream_paused: {
                let g = IntGaugeVec::new(Opts::new("eventsync_stream_paused", "1 while an operator paused the stream this replica consumes, else 0."), &["stream"]).expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            behind_source: histogram(&r, "eventsync_behind_source_seconds", "Time between a change's wall (or cluster) time in MongoDB and its reading by the daemon (Debezium's MilliSecondsBehindSource, in seconds).", &["stream"], vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0]),
            resume_token_age: gauge(&r, "eventsync_resume_token_age_seconds", "Now minus the cluster time of the stream's last stored resume point, seconds.", &["stream"]),
            oplog_window: gauge(&r, "eventsync_oplog_window_seconds", "Newest minus oldest entry of the server's oplog, seconds; absent when the server exposes no oplog.", &[]),
            oplog_headroom: gauge(&r, "eventsync_oplog_headroom_seconds", "Cluster time of the stream's resume point minus that of the oldest oplog entry, seconds: how far the checkpoint is from falling off the oplog. Absent when the oplog is not visible.", &["stream"]),
            live_subscribers: {
                let g = IntGauge::new("eventsync_live_subscribers", "Open live subscriptions.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            log_reads: counter(&r, "eventsync_log_reads_total", "Queries of the event log (events or snapshots by position) made to serve sync clients, by reader: tail (the shared live tail of a stream), subscriber (a live subscriber behind the tail's buffer), missing (/v1/sync/missing).", &["reader"]),
            compacted: counter(&r, "eventsync_events_compacted_total", "Events removed by compaction.", &["stream"]),
            mongodb_reachable: {
                let g = IntGauge::new("eventsync_mongodb_reachable", "1 while MongoDB answers the readiness ping, else 0.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            ready: {
                let g = IntGauge::new("eventsync_ready", "1 while this replica is ready (/readyz answers 200), else 0.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            build_info: {
                let g = IntGaugeVec::new(Opts::new("eventsync_build_info", "Build information."), &["version"]).expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            start_time: {
                let g = Gauge::new("eventsync_process_start_time_seconds", "Start time of the process since the Unix epoch.").expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m.start_time.set(unix_now());
        for reader in ["tail", "subscriber", "missing"] {
            m.log_reads.with_label_values(&[reader]);
        }
        for kind in ["handed_over", "orphan_taken"] {
            m.rebalances.with_label_values(&[kind]);
        }
        m
    }

    /// Creates a stream's series at zero (counters, `lease_held` 0), so that a stream shows
    /// up before its first event and `rate()`/`increase()` see the first increments.
    pub fn init_stream(&self, stream: &str) {
        for op in OPERATIONS {
            self.events_appended.with_label_values(&[stream, op]);
        }
        self.changes_read.with_label_values(&[stream]);
        self.changes_skipped.with_label_values(&[stream]);
        self.lease_acquired.with_label_values(&[stream]);
        self.compacted.with_label_values(&[stream]);
        self.lease_held.with_label_values(&[stream]);
        for action in ["resync", "pause", "resume", "start_at"] {
            for outcome in ["requested", "done", "failed"] {
                self.admin_actions
                    .with_label_values(&[stream, action, outcome]);
            }
        }
        self.catchups_rejected
            .with_label_values(&["max_concurrent_catchups"]);
    }

    /// Values computed at scrape time: the checkpoint age of every stream this replica
    /// consumes (from the time its checkpoint was last stored); streams it does not consume
    /// have no age (their last checkpoint is another replica's business).
    fn refresh(&self) {
        let now = unix_now();
        for family in self.checkpoint_timestamp.collect() {
            for m in family.get_metric() {
                let Some(stream) = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "stream")
                    .map(|l| l.value())
                else {
                    continue;
                };
                let held = self
                    .lease_held
                    .get_metric_with_label_values(&[stream])
                    .map(|g| g.get() == 1)
                    .unwrap_or(false);
                if held {
                    let stored = m.get_gauge().get_value();
                    self.checkpoint_age
                        .with_label_values(&[stream])
                        .set((now - stored).max(0.0));
                } else {
                    let _ = self.checkpoint_age.remove_label_values(&[stream]);
                }
            }
        }
    }

    /// Counts an error of a component.
    pub fn error(&self, component: &str, kind: &str) {
        self.errors.with_label_values(&[component, kind]).inc();
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        self.refresh();
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
