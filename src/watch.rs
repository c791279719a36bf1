//! `evictd watch`: what evictd applied, batch by batch, as its broadcasts
//! say: the recent ones from the broadcast log, then each new one as it is
//! published, filtered by key or table. For an operator asking why a key is
//! still cached.

use std::io::Write;

use evictd_client::protocol::{glob_matches, Broadcast};
use evictd_client::Log;
use futures_util::StreamExt as _;
use redis::aio::ConnectionLike;

use crate::change::TableName;
use crate::config::RedisConfig;
use crate::error::Error;
use crate::servers::{cluster_seeds, connect_redis, redis_client};

/// Which batches to print.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Batches that invalidated this key (by name or by a pattern).
    pub key: Option<String>,
    /// Batches with changes of this mapped table.
    pub table: Option<TableName>,
}

impl Filter {
    pub fn admits(&self, message: &Broadcast) -> bool {
        let key = self.key.as_deref().is_none_or(|key| {
            message.keys.iter().any(|k| k == key)
                || message.patterns.iter().any(|p| glob_matches(p, key))
        });
        let table = self.table.as_ref().is_none_or(|wanted| {
            message
                .tables
                .iter()
                .any(|table| TableName::parse(table).is_ok_and(|table| table == *wanted))
        });
        key && table
    }
}

/// One line per batch: `epoch:seq lsn=.. tables=.. keys=.. tags=..
/// patterns=.. tag_patterns=..`, empty parts left out.
pub fn line(message: &Broadcast) -> String {
    let mut line = format!("{}:{}", message.epoch, message.seq);
    if let Some(lsn) = &message.lsn {
        line.push_str(&format!(" lsn={lsn}"));
    }
    for (name, items) in [
        ("tables", &message.tables),
        ("keys", &message.keys),
        ("tags", &message.tags),
        ("patterns", &message.patterns),
        ("tag_patterns", &message.tag_patterns),
    ] {
        if !items.is_empty() {
            line.push_str(&format!(" {name}={}", items.join(",")));
        }
    }
    line
}

/// Prints the last `backlog` batches from the log, then every new one, to
/// `out`, until the process ends. Missed messages (a gap, a reconnect) are
/// filled in from the log, or reported as missed.
pub async fn watch(
    config: &RedisConfig,
    filter: &Filter,
    backlog: usize,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    // The log is read through the one connection every reader uses; the
    // subscription needs a client of one node (any node of a Cluster
    // hears every publish).
    let connection = connect_redis(config).await?;
    let subscriber = match cluster_seeds(config.url.expose()) {
        Some(seeds) => redis::Client::open(seeds[0].as_str())
            .map_err(|e| Error::redis("invalid redis.url", e))?,
        None => redis_client(config)?,
    };
    follow(config, subscriber, connection, filter, backlog, out).await
}

async fn follow<C: ConnectionLike>(
    config: &RedisConfig,
    subscriber: redis::Client,
    connection: C,
    filter: &Filter,
    backlog: usize,
    out: &mut (dyn Write + Send),
) -> Result<(), Error> {
    let mut log = Log::new(connection, &config.prefix);
    let mut position: Option<(String, u64)> = None;
    // False once the output is closed (`evictd watch | head`): the end.
    let print = |message: &Broadcast, out: &mut (dyn Write + Send)| -> bool {
        !filter.admits(message)
            || writeln!(out, "{}", line(message))
                .and_then(|()| out.flush())
                .is_ok()
    };
    loop {
        // Subscribed first: nothing published from here on is missed.
        let mut pubsub = subscriber
            .get_async_pubsub()
            .await
            .map_err(|e| Error::redis("cannot connect to Redis", e))?;
        pubsub
            .subscribe(&config.l1_channel)
            .await
            .map_err(|e| Error::redis("cannot subscribe", e))?;
        let catch_up = match &position {
            None => log.recent(backlog).await,
            Some(at) => match log.since(at).await {
                Ok(Some(missed)) => Ok(missed),
                Ok(None) => {
                    writeln!(
                        out,
                        "# missed broadcasts after {}:{}: the log does not reach back",
                        at.0, at.1
                    )
                    .ok();
                    Ok(Vec::new())
                }
                Err(error) => Err(error),
            },
        }
        .map_err(|e| Error::redis("cannot read the broadcast log", e))?;
        for message in &catch_up {
            if !print(message, out) {
                return Ok(());
            }
            position = Some((message.epoch.clone(), message.seq));
        }
        let mut messages = pubsub.on_message();
        while let Some(payload) = messages.next().await {
            let Ok(message) = serde_json::from_slice::<Broadcast>(payload.get_payload_bytes())
            else {
                writeln!(out, "# a broadcast that does not parse").ok();
                continue;
            };
            let fresh = match &position {
                Some((epoch, seq)) if *epoch == message.epoch => {
                    if message.seq <= *seq {
                        false
                    } else {
                        if message.seq > seq + 1 {
                            // Fill the gap from the log, if it has it.
                            if let Ok(Some(missed)) = log.since(&(epoch.clone(), *seq)).await {
                                for missed in missed.iter().filter(|m| m.seq < message.seq) {
                                    if !print(missed, out) {
                                        return Ok(());
                                    }
                                }
                            }
                        }
                        true
                    }
                }
                _ => true,
            };
            if fresh {
                if !print(&message, out) {
                    return Ok(());
                }
                position = Some((message.epoch.clone(), message.seq));
            }
        }
        writeln!(out, "# the subscription dropped; reconnecting").ok();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(json: &str) -> Broadcast {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn filters_by_key_pattern_and_table() {
        let m = message(
            r#"{"v":1,"epoch":"e","seq":3,"lsn":"0/1","keys":["order:1"],"tags":["user:1"],"patterns":["cart:*"],"tables":["orders"]}"#,
        );
        let filter = |key: Option<&str>, table: Option<&str>| Filter {
            key: key.map(Into::into),
            table: table.map(|table| TableName::parse(table).unwrap()),
        };
        assert!(filter(None, None).admits(&m));
        assert!(filter(Some("order:1"), None).admits(&m));
        assert!(filter(Some("cart:9"), None).admits(&m), "by pattern");
        assert!(!filter(Some("order:2"), None).admits(&m));
        assert!(filter(None, Some("public.orders")).admits(&m));
        assert!(!filter(None, Some("users")).admits(&m));
        assert!(!filter(Some("order:1"), Some("users")).admits(&m));
        assert_eq!(
            line(&m),
            "e:3 lsn=0/1 tables=orders keys=order:1 tags=user:1 patterns=cart:*"
        );
    }
}
