//! Metric names, in one place, and the Prometheus recorder.
//!
//! Names carry the `evictd_` prefix and a unit suffix; labels are low
//! cardinality (table, op, outcome), never a key.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Row changes decoded from the source, by `table` and `op`.
pub const CHANGES_RECEIVED: &str = "evictd_changes_received_total";
/// Row changes whose batch Redis acknowledged.
pub const CHANGES_APPLIED: &str = "evictd_changes_applied_total";
/// Keys invalidated, by `table` and `mode`: `exact` (key by key: a
/// rendered key, a tag, a refresh), `pattern` (keys a pattern standing for
/// one change matched), `coarse` (keys a coarse invalidation matched).
pub const KEYS_INVALIDATED: &str = "evictd_keys_invalidated_total";
/// Redis commands sent, by `outcome` (`ok`, `error`: the batch is retried).
pub const REDIS_COMMANDS: &str = "evictd_redis_commands_total";
/// Failed attempts to apply a batch to Redis (each retry counts, whatever
/// the batch holds): what `EvictdRedisFailing` watches.
pub const REDIS_FAILURES: &str = "evictd_redis_failures_total";
/// How long the batch at the head has waited for its transactions to
/// become visible on the primary (0 when none waits).
pub const VISIBILITY_WAIT: &str = "evictd_visibility_wait_seconds";
/// Batches that had to wait for their transactions to become visible.
pub const VISIBILITY_HELD: &str = "evictd_visibility_held_batches_total";
/// Whether evictd can read a read replica's replay position, by `replica`
/// (1 yes, 0 no).
pub const REPLICA_UP: &str = "evictd_replica_up";
/// How long a replica has been short of the position the oldest held
/// batch waits for, by `replica` (0 when it is not).
pub const REPLICA_WAIT: &str = "evictd_replica_wait_seconds";
/// Bytes of WAL a replica has still to replay to reach that position, by
/// `replica`.
pub const REPLICA_BEHIND: &str = "evictd_replica_behind_bytes";
/// Second invalidations applied, by `outcome`: `replayed` (every replica
/// had replayed the batch), `timed_out` (`postgres.replica_max_wait_ms`
/// passed first).
pub const REPLICA_INVALIDATIONS: &str = "evictd_replica_invalidations_total";
/// Keys, tags and counters held for second invalidations.
pub const REPLICA_HELD_KEYS: &str = "evictd_replica_held_keys";
/// Keys held for a second invalidation that turned into their family's
/// pattern because `postgres.replica_pending_keys` was reached.
pub const REPLICA_FOLDED_KEYS: &str = "evictd_replica_folded_keys_total";
/// Commands per applied batch.
pub const BATCH_COMMANDS: &str = "evictd_batch_commands";
/// Time to apply one batch, retries included.
pub const APPLY_DURATION: &str = "evictd_apply_duration_seconds";
/// Commit timestamp in the source to Redis acknowledgement, per batch from
/// its oldest transaction.
pub const COMMIT_TO_APPLY_LAG: &str = "evictd_commit_to_apply_lag_seconds";
/// The source sending that transaction to Redis acknowledgement: evictd's
/// own part of the lag.
pub const SENT_TO_APPLY_LAG: &str = "evictd_sent_to_apply_lag_seconds";
/// WAL the server has sent beyond what is acknowledged.
pub const REPLICATION_LAG_BYTES: &str = "evictd_replication_lag_bytes";
/// The acknowledged (flush) LSN, as a number.
pub const ACK_LSN: &str = "evictd_ack_lsn";
/// 1 while the source streams.
pub const STREAMING: &str = "evictd_streaming";
/// Source reconnects after a transient error.
pub const RECONNECTS: &str = "evictd_reconnects_total";
/// WAL the slot keeps on the database server (from restart_lsn).
pub const SLOT_RETAINED_WAL_BYTES: &str = "evictd_slot_retained_wal_bytes";
/// Transactions applied as a coarse invalidation of their tables.
pub const COARSE_INVALIDATIONS: &str = "evictd_coarse_invalidations_total";
/// Lost continuity (every mapped table invalidated once), by `cause`.
pub const CONTINUITY_LOST: &str = "evictd_continuity_lost_total";
/// The `cause` labels of [`CONTINUITY_LOST`].
pub const CONTINUITY_CAUSES: &[&str] = &[
    "slot_invalidated",
    "slot_missing",
    "slot_ahead",
    "slot_reset",
    "database_replaced",
    "offsets_removed",
];
/// Problems with what keeps the slot through a failover or on a standby
/// (`postgres.failover_slot`, decoding on a standby); 0 once fixed.
pub const SLOT_SETUP_PROBLEMS: &str = "evictd_slot_setup_problems";
/// Problems between the mappings and the live schema, by `table` (a mapped
/// table, or `publication <name>`); 0 once fixed.
pub const SCHEMA_PROBLEMS: &str = "evictd_schema_problems";
/// Keys deleted by pattern because a placeholder's value was unknown or the
/// key too long, by `table`.
pub const PATTERN_FALLBACKS: &str = "evictd_pattern_fallbacks_total";
/// Kafka records taken, by `outcome`: `change`, `message` (an invalidation
/// from SQL), `tombstone`, `ignored`
/// (not a row change), `skipped`, `dead_letter`, `stopped` (bad records).
pub const KAFKA_RECORDS: &str = "evictd_kafka_records_total";
/// Kafka offsets committed to the group (one per partition per commit).
pub const KAFKA_COMMITS: &str = "evictd_kafka_commits_total";
/// Partitions this instance holds in its consumer group.
pub const KAFKA_ASSIGNED_PARTITIONS: &str = "evictd_kafka_assigned_partitions";
/// By `topic`, each topic `kafka.topics` names (not patterns): 1 while
/// the broker does not have it, 0 once it does.
pub const KAFKA_TOPICS_MISSING: &str = "evictd_kafka_topics_missing";
/// Prefix deletes applied (a mapping's `prefixes`: SCAN on every master),
/// by `table`; the keys they deleted are `keys_invalidated{mode="prefix"}`.
pub const PREFIX_DELETES: &str = "evictd_prefix_deletes_total";
/// CDN purge requests a target accepted, by `target`.
pub const PURGES: &str = "evictd_purges_total";
/// Surrogate keys purged, by `target`.
pub const PURGE_KEYS: &str = "evictd_purge_keys_total";
/// Purge requests that failed (each retry counts), by `target`.
pub const PURGE_FAILURES: &str = "evictd_purge_failures_total";
/// Purge requests a `best_effort` target gave up on, by `target`.
pub const PURGE_DROPPED: &str = "evictd_purge_dropped_total";
/// Time a target took to accept a purge request, by `target`.
pub const PURGE_DURATION: &str = "evictd_purge_duration_seconds";
/// Keys of the batch being purged still waiting at a target, by `target`.
pub const PURGE_QUEUE_KEYS: &str = "evictd_purge_queue_keys";
/// Batches Redis applied whose purges wait behind the one being purged.
pub const PURGE_QUEUE_BATCHES: &str = "evictd_purge_queue_batches";
/// Subscribers of the console's live stream.
pub const CONSOLE_SUBSCRIBERS: &str = "evictd_console_subscribers";
/// Live-stream subscribers dropped for falling behind or not reading.
pub const CONSOLE_DROPPED: &str = "evictd_console_dropped_total";
/// SCAN calls made by pattern, prefix and coarse invalidations.
pub const SCAN_PAGES: &str = "evictd_scan_pages_total";
/// Invalidations from SQL messages, by `outcome` (applied, malformed,
/// disabled, unauthenticated, not_allowed).
pub const SQL_MESSAGES: &str = "evictd_sql_messages_total";
/// Reloads of the mapping files under `evictd run`, by `outcome` (applied,
/// invalid).
pub const MAPPING_RELOADS: &str = "evictd_mapping_reloads_total";
/// Consistency checks of sampled invalidations, by `outcome`:
/// `consistent`, `stale`, `unverifiable` (`[audit]`).
pub const CONSISTENCY_CHECKS: &str = "evictd_consistency_checks_total";
/// Samples dropped because the checker's queue was full.
pub const CONSISTENCY_DROPPED: &str = "evictd_consistency_samples_dropped_total";
/// Samples waiting for their check.
pub const CONSISTENCY_QUEUE: &str = "evictd_consistency_queue_depth";

/// Log lines dropped because stderr could not take them (a full disk, a
/// closed pipe): logging never stops evictd.
pub const LOG_LINES_DROPPED: &str = "evictd_log_lines_dropped_total";

/// The log sink: stderr, where a line that cannot be written is dropped
/// and counted (`LOG_LINES_DROPPED`) instead of failing (the standard
/// `eprintln!` panics, which would end the process).
#[derive(Clone, Copy, Debug, Default)]
pub struct LogSink;

impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for LogSink {
    type Writer = LogLine;

    fn make_writer(&'w self) -> LogLine {
        LogLine
    }
}

/// One log line on its way to stderr (see [`LogSink`]).
#[derive(Debug)]
pub struct LogLine;

impl std::io::Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The formatter hands over each line whole.
        if std::io::stderr().write_all(buf).is_err() {
            metrics::counter!(LOG_LINES_DROPPED).increment(1);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The process-wide recorder; installed on first use.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = [
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ];
        let counts = [1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                &seconds,
            )
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(BATCH_COMMANDS.into()),
                    &counts,
                )
            })
            .expect("static bucket lists are valid");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Only fails when another recorder was installed first (a test
        // harness); the handle then renders nothing, which is harmless.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets every few seconds,
/// forever. Without it samples pile up until `/metrics` is scraped, so
/// memory would grow with every batch while nobody scrapes.
pub async fn upkeep() {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        recorder().run_upkeep();
    }
}

/// Describes every metric once, so that `/metrics` carries HELP lines.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        CHANGES_RECEIVED,
        "Row changes decoded from the source, by table and op"
    );
    describe_counter!(
        CHANGES_APPLIED,
        "Row changes whose batch Redis acknowledged"
    );
    describe_counter!(
        KEYS_INVALIDATED,
        "Keys invalidated, by table and mode (exact, pattern, coarse)"
    );
    describe_counter!(REDIS_COMMANDS, "Redis commands sent, by outcome");
    describe_counter!(
        REDIS_FAILURES,
        "Failed attempts to apply a batch to Redis (each retry counts)"
    );
    describe_histogram!(BATCH_COMMANDS, "Commands per applied batch");
    describe_histogram!(
        APPLY_DURATION,
        Unit::Seconds,
        "Time to apply one batch, retries included"
    );
    describe_histogram!(
        COMMIT_TO_APPLY_LAG,
        Unit::Seconds,
        "Commit in the source to Redis acknowledgement (oldest transaction of each batch)"
    );
    describe_histogram!(
        SENT_TO_APPLY_LAG,
        Unit::Seconds,
        "The source sending a transaction to Redis acknowledgement: evictd's own part of the lag"
    );
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "WAL sent by the server beyond the acknowledged position"
    );
    describe_gauge!(ACK_LSN, "The acknowledged flush LSN as a number");
    describe_gauge!(STREAMING, "1 while the source streams");
    describe_counter!(RECONNECTS, "Source reconnects after a transient error");
    describe_counter!(
        COARSE_INVALIDATIONS,
        "Transactions applied as a coarse invalidation of their tables"
    );
    describe_counter!(
        CONTINUITY_LOST,
        "Lost continuity (every mapped table invalidated once), by cause"
    );
    describe_gauge!(
        SLOT_SETUP_PROBLEMS,
        "Problems with what keeps the slot through a failover or on a standby; 0 once fixed"
    );
    describe_gauge!(
        SLOT_RETAINED_WAL_BYTES,
        Unit::Bytes,
        "WAL the slot keeps on the database server"
    );
    describe_gauge!(
        SCHEMA_PROBLEMS,
        "Problems between the mappings and the live schema, by table; 0 once fixed"
    );
    describe_counter!(
        PATTERN_FALLBACKS,
        "Keys deleted by pattern (a placeholder's value unknown, or the key too long), by table"
    );
    describe_counter!(
        PREFIX_DELETES,
        "Prefix deletes applied (SCAN on every master), by table"
    );
    describe_counter!(PURGES, "CDN purge requests a target accepted, by target");
    describe_counter!(PURGE_KEYS, "Surrogate keys purged, by target");
    describe_counter!(
        PURGE_FAILURES,
        "Purge requests that failed (each retry counts), by target"
    );
    describe_counter!(
        PURGE_DROPPED,
        "Purge requests a best_effort target gave up on, by target"
    );
    describe_histogram!(
        PURGE_DURATION,
        Unit::Seconds,
        "Time a target took to accept a purge request, by target"
    );
    describe_gauge!(
        PURGE_QUEUE_KEYS,
        "Keys of the batch being purged still waiting at a target, by target"
    );
    describe_gauge!(
        PURGE_QUEUE_BATCHES,
        "Batches applied to Redis whose purges wait behind the batch being purged"
    );
    describe_gauge!(
        CONSOLE_SUBSCRIBERS,
        "Subscribers of the console's live stream (admin.console)"
    );
    describe_counter!(
        CONSOLE_DROPPED,
        "Live-stream subscribers of the console dropped for falling behind or not reading"
    );
    describe_counter!(
        SCAN_PAGES,
        "SCAN calls of pattern, prefix and coarse invalidations (COUNT 1000 each, on every master)"
    );
    describe_counter!(
        SQL_MESSAGES,
        "Invalidations from SQL messages, by outcome (applied, malformed, disabled, unauthenticated, not_allowed)"
    );
    // Present at 0 from the start, so that the first refusal is an
    // increase a rate or increase() sees.
    for outcome in crate::pipeline::batcher::MessageOutcome::ALL {
        metrics::counter!(SQL_MESSAGES, "outcome" => outcome.as_str()).increment(0);
    }
    describe_counter!(
        MAPPING_RELOADS,
        "Reloads of the mapping files, by outcome (applied, invalid)"
    );
    describe_counter!(
        CONSISTENCY_CHECKS,
        "Consistency checks of sampled invalidations, by outcome (consistent, stale, unverifiable)"
    );
    describe_counter!(
        CONSISTENCY_DROPPED,
        "Consistency samples dropped because the checker's queue was full"
    );
    describe_gauge!(
        CONSISTENCY_QUEUE,
        "Consistency samples waiting for their check"
    );
    describe_counter!(
        LOG_LINES_DROPPED,
        "Log lines dropped because stderr could not take them"
    );
    describe_gauge!(
        VISIBILITY_WAIT,
        Unit::Seconds,
        "How long the batch at the head has waited for its transactions to become visible on the primary"
    );
    describe_counter!(
        VISIBILITY_HELD,
        "Batches that waited for their transactions to become visible on the primary"
    );
    describe_gauge!(
        REPLICA_UP,
        "Whether the replay position of a read replica can be read (1) or not (0), by replica"
    );
    describe_gauge!(
        REPLICA_WAIT,
        Unit::Seconds,
        "How long a read replica has been short of the position the oldest held batch waits for, by replica"
    );
    describe_gauge!(
        REPLICA_BEHIND,
        Unit::Bytes,
        "WAL a read replica has still to replay to reach the position the oldest held batch waits for, by replica"
    );
    describe_counter!(
        REPLICA_INVALIDATIONS,
        "Second invalidations for read replicas, by outcome (replayed, timed_out)"
    );
    describe_gauge!(
        REPLICA_HELD_KEYS,
        "Keys, tags and counters held for second invalidations"
    );
    describe_counter!(
        REPLICA_FOLDED_KEYS,
        "Keys held for a second invalidation that turned into their family's pattern (postgres.replica_pending_keys reached)"
    );
    zero_counters();
    describe_counter!(KAFKA_RECORDS, "Kafka records taken, by outcome");
    describe_counter!(KAFKA_COMMITS, "Kafka offset commits to the group");
    describe_gauge!(
        KAFKA_TOPICS_MISSING,
        "By topic, each topic kafka.topics names (not patterns): 1 while the broker does not have it, 0 once it does"
    );
    describe_gauge!(
        KAFKA_ASSIGNED_PARTITIONS,
        "Kafka partitions this instance holds"
    );
}

/// Exports every counter whose labels are known up front at 0, so that
/// `increase()` and `rate()` see its first event (a series that appears at
/// 1 has no earlier sample to grow from). Counters by table are exported
/// as the mappings load ([`zero_table_counters`]), by target as the purge
/// targets start, and the Kafka source's as it starts.
fn zero_counters() {
    use metrics::counter;
    for name in [
        CHANGES_APPLIED,
        RECONNECTS,
        COARSE_INVALIDATIONS,
        SCAN_PAGES,
        CONSISTENCY_DROPPED,
        REDIS_FAILURES,
        LOG_LINES_DROPPED,
        VISIBILITY_HELD,
        REPLICA_FOLDED_KEYS,
        CONSOLE_DROPPED,
    ] {
        counter!(name).increment(0);
    }
    for cause in CONTINUITY_CAUSES {
        counter!(CONTINUITY_LOST, "cause" => *cause).increment(0);
    }
    for outcome in ["replayed", "timed_out"] {
        counter!(REPLICA_INVALIDATIONS, "outcome" => outcome).increment(0);
    }
    for outcome in ["ok", "error"] {
        counter!(REDIS_COMMANDS, "outcome" => outcome).increment(0);
    }
    for outcome in crate::pipeline::reload::Outcome::ALL {
        counter!(MAPPING_RELOADS, "outcome" => outcome.as_str()).increment(0);
    }
    for outcome in crate::audit::Outcome::ALL {
        counter!(CONSISTENCY_CHECKS, "outcome" => outcome.as_str()).increment(0);
    }
}

/// Exports the counters by table of every mapped table at 0 (see
/// [`zero_counters`]).
pub fn zero_table_counters(tables: impl IntoIterator<Item = String>) {
    use metrics::counter;
    for table in tables {
        for op in crate::change::Op::ALL {
            counter!(CHANGES_RECEIVED, "table" => table.clone(), "op" => op.as_str()).increment(0);
        }
        for mode in crate::plan::Mode::ALL {
            counter!(KEYS_INVALIDATED, "table" => table.clone(), "mode" => mode.as_str())
                .increment(0);
        }
        counter!(PATTERN_FALLBACKS, "table" => table.clone()).increment(0);
        counter!(PREFIX_DELETES, "table" => table).increment(0);
    }
}
