//! A primary and a physical standby, as production runs them. With
//! `postgres.failover_slot` (PostgreSQL 17+) the slot is synchronised to
//! the standby, and after a promotion evictd continues from it: the
//! changes it had not read yet are invalidated exactly, the rest of the
//! cache stays. Without it the promoted server has no slot, and evictd
//! invalidates every mapped table (lost continuity). And evictd decoding on
//! a hot standby (PostgreSQL 16+), across the standby's restart.

use std::time::{Duration, Instant};

use crate::support::{redis_connection, TestDb};
use evictd::config::{Config, SecretUrl};
use evictd::testkit::{Evictd, Postgres, Standby};

const SCHEMA: &str = "
    create table orders (id bigint primary key, status text not null);
    create publication evictd for table orders;
    insert into orders select g, 'new' from generate_series(1, 3) g;
";
const MAPPING: &str = "[[table]]\nname = \"orders\"\nkeys = [\"order:{id}\"]\n";
const KEYS: [&str; 3] = ["order:1", "order:2", "order:3"];

/// A primary with the schema, evictd's config for it (a key prefix of its
/// own), and the Redis the test looks at.
struct Primary {
    postgres: Postgres,
    database: String,
    version: i64,
    config: Config,
    redis: redis::aio::MultiplexedConnection,
    _probe: TestDb,
    _mappings: tempfile::TempDir,
}

impl Primary {
    async fn start() -> Primary {
        let own = crate::support::OwnServer::start(SCHEMA, &[("orders.toml", MAPPING)]).await;
        let version = crate::support::server_version(&own.postgres.url(&own.database)).await;
        Primary {
            postgres: own.postgres,
            database: own.database,
            version,
            config: own.config,
            redis: redis_connection().await,
            _probe: own.probe,
            _mappings: own.mappings,
        }
    }

    /// A standby of the primary (which restarts for the copy).
    fn standby(&mut self, standby: &Standby) -> Postgres {
        let primary = &mut self.postgres;
        std::thread::scope(|scope| scope.spawn(|| primary.standby_with(standby)).join())
            .expect("the standby thread")
            .expect("a standby")
    }

    async fn seed(&mut self) {
        for key in KEYS {
            let _: () = redis::cmd("SET")
                .arg(format!("{}{key}", self.config.redis.prefix))
                .arg("cached")
                .query_async(&mut self.redis)
                .await
                .unwrap();
        }
    }

    async fn cached(&mut self) -> Vec<&'static str> {
        let mut left = Vec::new();
        for key in KEYS {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("{}{key}", self.config.redis.prefix))
                .query_async(&mut self.redis)
                .await
                .unwrap();
            if exists {
                left.push(key);
            }
        }
        left
    }

    async fn write(&self, sql: &str) {
        self.postgres
            .execute(&self.database, sql)
            .await
            .expect("write");
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// Polls `sql` (one boolean, or no row) at `url` until it is true.
async fn wait_until(url: &str, sql: &str, what: &str) {
    let client = connect(url).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let row = client.query_opt(sql, &[]).await.expect(sql);
        if row.is_some_and(|row| row.get::<_, Option<bool>>(0) == Some(true)) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within 90 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the standby has replayed everything the primary wrote.
async fn replayed(primary: &Primary, standby: &Postgres) {
    let current = evictd::testkit::current_wal_lsn(&primary.postgres.url(&primary.database))
        .await
        .expect("primary position");
    wait_until(
        &standby.url(&primary.database),
        &format!("select pg_last_wal_replay_lsn() >= '{current}'::pg_lsn"),
        "the standby replays the primary's WAL",
    )
    .await;
}

/// evictd streams from the primary and stops; a row changes that it has
/// not read; the primary fails and its standby (set up to keep failover
/// slots when `failover`) is promoted; evictd starts again with the same
/// URL, which lists both hosts with `target_session_attrs=read-write`. Returns
/// the keys left in the cache: `None` when the version lacks failover
/// slots and `failover` was asked for (evictd refused, naming why).
async fn fail_over(failover: bool) -> Option<Vec<&'static str>> {
    let mut primary = Primary::start().await;
    primary.config.postgres.failover_slot = failover;
    if failover && primary.version < 170_000 {
        let refused = match Evictd::start(&primary.config).await {
            Ok(_) => panic!("a failover slot on PostgreSQL {}", primary.version),
            Err(error) => error.to_string(),
        };
        assert!(
            refused.contains("postgres.failover_slot needs PostgreSQL 17 or later"),
            "{refused}"
        );
        return None;
    }
    let standby = primary.standby(&Standby {
        slot_sync_database: failover.then(|| primary.database.clone()),
        ..Standby::default()
    });
    let primary_url = primary.postgres.url(&primary.database);
    // One URL throughout, as production has it: the standby first, which
    // evictd passes over while it is read-only, then the primary.
    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
        standby.port(),
        primary.postgres.port(),
        primary.database
    );
    primary.config.postgres.url = Some(SecretUrl::parse(&both).expect("a URL of both hosts"));
    let slot = primary.config.postgres.slot.clone();
    let control = evictd::internal::Control::connect(&primary.config.postgres)
        .await
        .expect("control");
    if failover {
        let standby_slot = standby.physical_slot().expect("a physical slot");
        // Before the standby is named, `check` says what is missing.
        let findings = control
            .topology()
            .await
            .expect("topology")
            .findings(&slot, true);
        assert!(
            findings[0]
                .message
                .contains("synchronized_standby_slots is empty")
                && findings[0].help.contains(standby_slot),
            "{findings:?}"
        );
        for sql in [
            &format!("alter system set synchronized_standby_slots = '{standby_slot}'"),
            "select pg_reload_conf()",
        ] {
            primary.postgres.execute("postgres", sql).await.expect(sql);
        }
        wait_until(
            &primary_url,
            &format!("select active and xmin is not null from pg_replication_slots where slot_name = '{standby_slot}'"),
            "the standby streams with feedback",
        )
        .await;
        let findings = control
            .topology()
            .await
            .expect("topology")
            .findings(&slot, true);
        assert!(findings.is_empty(), "{findings:?}");
        // A slot made before failover slots were asked for: evictd switches
        // it (ALTER_REPLICATION_SLOT on its replication connection).
        primary
            .write(&format!(
                "select pg_create_logical_replication_slot('{slot}', 'pgoutput')"
            ))
            .await;
    }
    let evictd = Evictd::start(&primary.config).await.expect("start evictd");
    primary
        .write("update orders set status = 'paid' where id = 1")
        .await;
    evictd.sync().await.expect("sync");
    if failover {
        // The standby takes the slot over once the slot's catalog_xmin has
        // moved past the standby's own, which takes streaming past a log of
        // the primary's running transactions (every 15 s, sooner here).
        let snapshots = log_snapshots(primary.postgres.url("postgres"));
        let confirmed = crate::support::slot_confirmed(control.client(), &slot).await;
        synchronised(&standby, &primary.database, &slot, confirmed).await;
        snapshots.abort();
    }
    evictd.stop().await.expect("stop");
    let topology = control.topology().await.expect("topology");
    // pg_replication_slots has no failover column before 17.
    let expected = (primary.version >= 170_000).then_some(failover);
    assert_eq!(topology.slot_failover, expected);
    let report = evictd::internal::operator::status(&primary.config)
        .await
        .expect("status");
    assert!(
        report.text.contains("server: the primary"),
        "{}",
        report.text
    );
    if failover {
        assert!(
            report.text.contains("is a failover slot"),
            "{}",
            report.text
        );
        // The standby keeps the slot, synchronised to where evictd stopped.
        let confirmed = crate::support::slot_confirmed(control.client(), &slot).await;
        synchronised(&standby, &primary.database, &slot, confirmed).await;
        // Pointed at the standby before promotion, evictd says why not.
        let mut early = primary.config.clone();
        early.postgres.url = Some(SecretUrl::parse(&standby.url(&primary.database)).unwrap());
        let refused = match Evictd::start(&early).await {
            Ok(_) => panic!("evictd read a synchronised slot on a standby"),
            Err(error) => error.to_string(),
        };
        assert!(
            refused.contains("synchronised from the primary"),
            "{refused}"
        );
    }
    primary.seed().await;
    // A change evictd has not read when the primary fails.
    primary
        .write("update orders set status = 'shipped' where id = 2")
        .await;
    replayed(&primary, &standby).await;
    drop(control);
    primary.postgres.kill();
    standby.promote().await.expect("promote");
    // The same URL: the old primary is gone, the promoted standby writable.
    let evictd = Evictd::start(&primary.config)
        .await
        .expect("start evictd on the promoted standby");
    evictd.sync().await.expect("sync");
    evictd.stop().await.expect("stop");
    Some(primary.cached().await)
}

/// Waits until the standby keeps `slot`, synchronised to `confirmed`.
async fn synchronised(
    standby: &Postgres,
    database: &str,
    slot: &str,
    confirmed: evictd::change::Lsn,
) {
    let synced = tokio::time::timeout(
        Duration::from_secs(60),
        wait_until(
            &standby.url(database),
            &format!(
                "select synced and not temporary and confirmed_flush_lsn >= '{confirmed}'::pg_lsn
                 from pg_replication_slots where slot_name = '{slot}'"
            ),
            "the standby synchronises the failover slot",
        ),
    )
    .await;
    assert!(
        synced.is_ok(),
        "the standby did not synchronise the slot to {confirmed} in 60 s; its log:\n{}",
        standby.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_slot_follows_a_promotion_and_only_what_changed_is_invalidated() {
    if let Some(left) = fail_over(true).await {
        // order:2 changed while evictd was down: invalidated from the
        // synchronised slot; the rest of the cache stays warm.
        assert_eq!(left, vec!["order:1", "order:3"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_failover_slot_a_promotion_invalidates_every_mapped_table() {
    let left = fail_over(false).await.expect("runs on every version");
    assert_eq!(left, Vec::<&str>::new());
}

/// Keeps the primary logging its running transactions, which a slot being
/// created on a standby waits for (the primary does it every 15 s
/// otherwise), until dropped.
fn log_snapshots(url: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = connect(&url).await;
        loop {
            let _ = client
                .batch_execute("select pg_log_standby_snapshot()")
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictd_decodes_on_a_hot_standby_across_its_restart() {
    let mut primary = Primary::start().await;
    let mut standby = primary.standby(&Standby::default());
    let mut config = primary.config.clone();
    config.postgres.url = Some(SecretUrl::parse(&standby.url(&primary.database)).unwrap());
    if primary.version < 160_000 {
        let refused = match Evictd::start(&config).await {
            Ok(_) => panic!("decoding on a standby of PostgreSQL {}", primary.version),
            Err(error) => error.to_string(),
        };
        assert!(
            refused.contains("decoding on a standby needs PostgreSQL 16 or later"),
            "{refused}"
        );
        return;
    }
    let snapshots = log_snapshots(primary.postgres.url("postgres"));
    let evictd = Evictd::start(&config)
        .await
        .expect("start evictd on the standby");
    // The slot is the standby's: the primary has none.
    let on_primary = connect(&primary.postgres.url(&primary.database))
        .await
        .query_opt(
            "select 1 from pg_replication_slots where slot_name = $1",
            &[&config.postgres.slot],
        )
        .await
        .unwrap();
    assert!(on_primary.is_none());
    let report = evictd::internal::operator::status(&config)
        .await
        .expect("status");
    assert!(
        report.text.contains("server: a hot standby"),
        "{}",
        report.text
    );
    assert!(
        report
            .warnings
            .iter()
            .all(|w| !w.contains("hot_standby_feedback")),
        "{:?}",
        report.warnings
    );
    primary.seed().await;
    primary
        .write("update orders set status = 'paid' where id = 1")
        .await;
    replayed(&primary, &standby).await;
    evictd.sync().await.expect("sync");
    assert_eq!(primary.cached().await, vec!["order:2", "order:3"]);
    // The standby restarts; evictd reconnects and goes on from its slot.
    std::thread::scope(|scope| scope.spawn(|| standby.restart()).join())
        .unwrap()
        .expect("restart the standby");
    primary
        .write("update orders set status = 'paid' where id = 2")
        .await;
    replayed(&primary, &standby).await;
    evictd.sync().await.expect("sync after the restart");
    assert_eq!(primary.cached().await, vec!["order:3"]);
    evictd.stop().await.expect("stop");
    snapshots.abort();
}

/// Decoding on a standby without `hot_standby_feedback`: the primary
/// vacuums catalog rows the standby's slot still needs, the standby
/// invalidates the slot (a recovery conflict), and evictd names the
/// conflict (`check` and `status` beforehand: the missing feedback) and
/// invalidates every mapped table once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_lost_to_a_conflict_on_the_standby_is_named() {
    let mut primary = Primary::start().await;
    if primary.version < 160_000 {
        return; // no decoding on a standby: the test above checks the refusal
    }
    let standby = primary.standby(&Standby {
        without_feedback: true,
        ..Standby::default()
    });
    let mut config = primary.config.clone();
    config.postgres.url = Some(SecretUrl::parse(&standby.url(&primary.database)).unwrap());
    let snapshots = log_snapshots(primary.postgres.url("postgres"));
    let evictd = Evictd::start(&config)
        .await
        .expect("start evictd on the standby");
    evictd.sync().await.expect("sync");
    evictd.stop().await.expect("stop");
    let report = evictd::internal::operator::status(&config)
        .await
        .expect("status");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("hot_standby_feedback is off")),
        "{:?}",
        report.warnings
    );
    primary.seed().await;
    // Catalog rows the slot needs, removed on the primary.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for sql in [
            "create table churn (id int)",
            "drop table churn",
            "vacuum pg_class, pg_attribute, pg_type",
        ] {
            primary.write(sql).await;
        }
        replayed(&primary, &standby).await;
        let report = evictd::internal::operator::status(&config)
            .await
            .expect("status");
        if report.text.contains("invalidated: ") {
            assert!(
                report.text.contains("conflict") || report.text.contains("rows_removed"),
                "{}",
                report.text
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot on the standby was never invalidated:\n{}\n{}",
            report.text,
            standby.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The next start makes the slot again and invalidates every mapped
    // table, naming the conflict.
    let evictd = Evictd::start(&config).await.expect("start evictd again");
    evictd.sync().await.expect("sync");
    evictd.stop().await.expect("stop");
    assert_eq!(primary.cached().await, Vec::<&str>::new());
    snapshots.abort();
}
