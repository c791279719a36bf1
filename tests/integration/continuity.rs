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
    use evictd::internal::Broadcast;
    use evictd::internal::Record;
    use evictd::internal::RedisSink;
    use evictd::plan::Planner;

    let setup = Setup::new().await;
    let key = format!("{}evictd:slot:record-test", setup.db.prefix);
    let mut sink = RedisSink::new(
        &setup.config.redis,
        Broadcast::new(
            &setup.config.redis.l1_channel,
            setup.config.redis.l1_log_len,
        ),
    )
    .unwrap();
    async fn applied(sink: &mut RedisSink, key: &str, system_id: &str, lsn: u64) {
        sink.set_record(Record {
            key: key.to_owned(),
            system_id: system_id.to_owned(),
        });
        let mut planner = Planner::new();
        planner.commit(Checkpoint::Lsn(Lsn(lsn)), None);
        sink.apply(&planner.finish()).await.unwrap();
    }
    applied(&mut sink, &key, "7", 0x1_0000_0200).await;
    // A batch applied again after a reconnect: the record stays.
    applied(&mut sink, &key, "7", 0x1_0000_0100).await;
    applied(&mut sink, &key, "7", 0x0_FFFF_FFFF).await;
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
    applied(&mut sink, &key, "7", 0x1_0000_0300).await;
    // Another database (restored, failed over): its position replaces it.
    applied(&mut sink, &key, "8", 0x10).await;
    assert_eq!(record().await, "8 0/10");
}
