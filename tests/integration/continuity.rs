//! Lost continuity (the slot dropped, or recreated, while evictd was down):
//! on start evictd invalidates every mapped table before streaming. When
//! the slot simply continues, it does not.

use crate::support::{mapping_dir, redis_connection, streaming_config, TestDb};
use evictd::config::Config;
use evictd::testkit::Evictd;

const SCHEMA: &str = "
    create table orders (id bigint primary key, status text not null);
    create publication evictd for table orders;
";
const MAPPING: &str = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n";

struct Setup {
    db: TestDb,
    config: Config,
    redis: redis::aio::MultiplexedConnection,
    _mappings: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        let db = TestDb::new().await;
        db.execute(SCHEMA).await;
        let mappings = mapping_dir(&[("orders.toml", MAPPING)]);
        let config = streaming_config(&db, mappings.path());
        Setup {
            db,
            config,
            redis: redis_connection().await,
            _mappings: mappings,
        }
    }

    async fn seed(&mut self, keys: &[&str]) {
        for key in keys {
            let _: () = redis::cmd("SET")
                .arg(format!("{}{key}", self.db.prefix))
                .arg("cached")
                .query_async(&mut self.redis)
                .await
                .unwrap();
        }
    }

    async fn cached(&mut self, keys: &[&str]) -> Vec<String> {
        let mut left = Vec::new();
        for key in keys {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("{}{key}", self.db.prefix))
                .query_async(&mut self.redis)
                .await
                .unwrap();
            if exists {
                left.push((*key).to_owned());
            }
        }
        left
    }

    /// A server of the test's own (for server-wide settings), its database,
    /// and the setup for it.
    async fn own_server() -> (evictd::testkit::Postgres, String, Setup) {
        let own = crate::support::OwnServer::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
        let setup = Setup {
            db: own.probe,
            config: own.config,
            redis: redis_connection().await,
            _mappings: own.mappings,
        };
        (own.postgres, own.database, setup)
    }

    /// Runs evictd until it has applied everything committed so far.
    async fn run_once(&self) {
        let evictd = Evictd::start(&self.config).await.expect("start evictd");
        evictd.sync().await.expect("sync");
        evictd.stop().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_while_evictd_was_down_invalidates_every_mapped_table() {
    let mut s = Setup::new().await;
    s.db.execute("insert into orders values (1, 'new')").await;
    s.run_once().await;
    s.seed(&["order:1", "order:2", "order:50", "other:1"]).await;
    let slot = &s.config.postgres.slot;
    s.db.execute(&format!(
        "select pg_drop_replication_slot('{slot}'); update orders set status = 'lost' where id = 1"
    ))
    .await;
    s.run_once().await;
    assert_eq!(
        s.cached(&["order:1", "order:2", "order:50", "other:1"])
            .await,
        ["other:1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_recreated_while_evictd_was_down_invalidates_every_mapped_table() {
    let mut s = Setup::new().await;
    s.db.execute("insert into orders values (1, 'new')").await;
    s.run_once().await;
    s.seed(&["order:1", "order:7"]).await;
    let slot = &s.config.postgres.slot;
    s.db.execute(&format!("select pg_drop_replication_slot('{slot}')"))
        .await;
    s.db.execute("update orders set status = 'lost' where id = 1")
        .await;
    s.db.execute(&format!(
        "select pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ))
    .await;
    s.run_once().await;
    assert_eq!(
        s.cached(&["order:1", "order:7"]).await,
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuous_slot_is_not_invalidated() {
    let mut s = Setup::new().await;
    s.db.execute("insert into orders values (1, 'new')").await;
    s.run_once().await;
    s.seed(&["order:7", "order:1"]).await;
    s.db.execute("update orders set status = 'paid' where id = 1")
        .await;
    s.run_once().await;
    assert_eq!(
        s.cached(&["order:7", "order:1"]).await,
        ["order:7"],
        "only the changed row's key went"
    );
    // And again with nothing written in between: idle restarts change nothing.
    s.run_once().await;
    assert_eq!(s.cached(&["order:7"]).await, ["order:7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_never_moves_backwards() {
    use evictd::change::{Checkpoint, Lsn};
    use evictd::internal::continuity::Store;
    use evictd::internal::Broadcast;
    use evictd::internal::RedisSink;
    use evictd::plan::Planner;

    let setup = Setup::new().await;
    let key = format!("{}evictd:slot:record-test", setup.db.prefix);
    let store = Store::at(&setup.config.redis, key.clone());
    let mut sink = RedisSink::new(
        &setup.config.redis,
        Broadcast::new(
            &setup.config.redis.l1_channel,
            setup.config.redis.l1_log_len,
        ),
        Some(store.recorder()),
    )
    .unwrap();
    async fn applied(sink: &mut RedisSink, store: &Store, system_id: &str, lsn: u64) {
        store.name_database(system_id);
        let mut planner = Planner::new();
        planner.commit(Checkpoint::Lsn(Lsn(lsn)), None);
        sink.apply(&planner.finish(), Default::default())
            .await
            .unwrap();
    }
    applied(&mut sink, &store, "7", 0x1_0000_0200).await;
    // A batch applied again after a reconnect: the record stays.
    applied(&mut sink, &store, "7", 0x1_0000_0100).await;
    applied(&mut sink, &store, "7", 0x0_FFFF_FFFF).await;
    let record = || {
        let mut redis = setup.redis.clone();
        let key = key.clone();
        async move {
            let value: String = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap();
            value
        }
    };
    assert_eq!(record().await, "7 1/200");
    applied(&mut sink, &store, "7", 0x1_0000_0300).await;
    // Another database (restored, failed over): its position replaces it.
    applied(&mut sink, &store, "8", 0x10).await;
    assert_eq!(record().await, "8 0/10");
}

/// A slot Postgres itself invalidated while evictd was down (here: the WAL
/// it needed removed under `max_slot_wal_keep_size`): `status` names the
/// cause, and the next start creates the slot again and invalidates every
/// mapped table; with `postgres.create_slot = false` it stops instead,
/// naming the cause and the command to run. On its own server: the setting
/// is server-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_by_postgres_is_named_and_every_mapped_table_invalidated() {
    let (postgres, name, mut s) = Setup::own_server().await;
    postgres
        .execute(&name, "insert into orders values (1, 'new')")
        .await
        .expect("insert");
    s.run_once().await;
    s.seed(&["order:1", "order:2"]).await;
    // While evictd is down: keep at most 1 MB of WAL for slots, and write
    // more than that, past a checkpoint.
    for sql in [
        "alter system set max_slot_wal_keep_size = '1MB'",
        "select pg_reload_conf()",
    ] {
        postgres
            .execute("postgres", sql)
            .await
            .expect("max_slot_wal_keep_size");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        for sql in [
            "update orders set status = md5(random()::text) where id = 1",
            "select pg_switch_wal()",
            "checkpoint",
        ] {
            postgres.execute(&name, sql).await.expect("write WAL");
        }
        let report = evictd::internal::operator::status(&s.config)
            .await
            .expect("status");
        if report.text.contains("invalidated: ") {
            assert!(
                report.text.contains("max_slot_wal_keep_size"),
                "{}",
                report.text
            );
            assert!(
                report
                    .warnings
                    .iter()
                    .any(|w| w.contains("the slot was invalidated")),
                "{:?}",
                report.warnings
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was never invalidated:\n{}",
            report.text
        );
    }
    // With postgres.create_slot = false evictd may not make another: it
    // stops, naming the slot, the cause and what to run, and leaves the
    // slot for the administrator to see.
    let mut fixed = s.config.clone();
    fixed.postgres.create_slot = false;
    let refused = match Evictd::start(&fixed).await {
        Ok(_) => panic!("evictd streamed from an invalidated slot"),
        Err(error) => error.to_string(),
    };
    assert!(
        refused.contains("was invalidated by Postgres")
            && refused.contains("max_slot_wal_keep_size")
            && refused.contains("evictd init --reset-slot"),
        "{refused}"
    );
    let report = evictd::internal::operator::status(&s.config)
        .await
        .expect("status");
    assert!(report.text.contains("invalidated: "), "{}", report.text);
    // The next start: the slot is created again, and every mapped key goes.
    s.run_once().await;
    assert_eq!(
        s.cached(&["order:1", "order:2"]).await,
        Vec::<String>::new()
    );
}

/// PostgreSQL 18 invalidates a slot nobody read for longer than
/// `idle_replication_slot_timeout` (at a checkpoint): `status` names it,
/// and the next start invalidates every mapped table. Before 18 the
/// setting does not exist and the slot stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_idle_past_the_timeout_is_named_and_every_mapped_table_invalidated() {
    let (postgres, name, mut s) = Setup::own_server().await;
    let timeout = postgres
        .execute(
            "postgres",
            "alter system set idle_replication_slot_timeout = '1min'",
        )
        .await;
    let version = crate::support::server_version(&postgres.url(&name)).await;
    if version < 180_000 {
        assert!(timeout.is_err(), "PostgreSQL {version} knows the setting");
        return;
    }
    timeout.expect("idle_replication_slot_timeout");
    postgres
        .execute("postgres", "select pg_reload_conf()")
        .await
        .expect("reload");
    s.run_once().await;
    s.seed(&["order:1"]).await;
    // The slot is idle from now; Postgres looks at a checkpoint.
    tokio::time::sleep(std::time::Duration::from_secs(62)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        postgres
            .execute(&name, "checkpoint")
            .await
            .expect("checkpoint");
        let report = evictd::internal::operator::status(&s.config)
            .await
            .expect("status");
        if report.text.contains("invalidated: ") {
            assert!(
                report.text.contains("idle_replication_slot_timeout")
                    && report.text.contains("invalidation_reason = idle_timeout"),
                "{}",
                report.text
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle slot was never invalidated:\n{}",
            report.text
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    s.run_once().await;
    assert_eq!(s.cached(&["order:1"]).await, Vec::<String>::new());
}
