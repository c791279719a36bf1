//! Live reload of the mapping files under a running pipeline.
//!
//! The reloader polls `mappings.dir` (every [`POLL`], when
//! `mappings.watch` is on) and reloads on request ([`super::Running::reload`],
//! SIGHUP under `evictd run`). A new set is compiled and, with the Postgres
//! source, checked against the live catalog; a table it newly maps that is
//! missing from the publication is added first when `postgres.create_slot`
//! allows. A set that fails is refused with every diagnostic logged, and the
//! running one stays. A set that passes is published on a `watch` channel;
//! each source's task takes it at its next transaction boundary, so no
//! transaction is ever mapped by two sets (see `Batcher::set_mappings`).
//!
//! A set is refused only for problems the running set does not have: a
//! table that already falls back to patterns under `REPLICA IDENTITY
//! DEFAULT` does not block every later edit.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::schema::SchemaHealth;
use crate::change::TableName;
use crate::config::{Config, SourceKind};
use crate::mapping::{self, DirFiles, Mappings, TableMapping};
use crate::telemetry;

/// How often the mappings directory is read for changes.
pub const POLL: Duration = Duration::from_millis(500);

/// Starts the reloader of a pipeline; it ends with the pipeline.
pub(crate) fn spawn(
    config: &Config,
    live: watch::Sender<Arc<Mappings>>,
    schema: SchemaHealth,
    requests: Arc<Notify>,
    stop: watch::Receiver<bool>,
) {
    let config = config.clone();
    tokio::spawn(async move {
        let reloader = Reloader {
            loaded: read(&config.mappings.dir).await,
            config,
            live,
            schema,
        };
        reloader.run(requests, stop).await;
    });
}

struct Reloader {
    config: Config,
    live: watch::Sender<Arc<Mappings>>,
    schema: SchemaHealth,
    /// What the running set was read from, or the last refused read: a
    /// reload is tried again only once the files change (or on request).
    loaded: DirFiles,
}

/// What became of a reload, the `outcome` of
/// `evictd_mapping_reloads_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Applied,
    Invalid,
}

impl Outcome {
    /// Every outcome, so that each is exported from the start.
    pub(crate) const ALL: [Outcome; 2] = [Outcome::Applied, Outcome::Invalid];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Invalid => "invalid",
        }
    }
}

/// The directory as read, a directory that cannot be read included (its
/// error is then the one diagnostic). Read on a blocking thread: a slow
/// or hung file system must not stop the runtime that applies changes.
async fn read(dir: &std::path::Path) -> DirFiles {
    let dir = dir.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        mapping::read_dir(&dir).unwrap_or_else(|diagnostics| DirFiles {
            files: Vec::new(),
            diagnostics,
            shortage: false,
        })
    });
    read.await.unwrap_or_else(|error| DirFiles {
        diagnostics: vec![mapping::Diagnostic::general(format!(
            "reading the mappings directory failed: {error}"
        ))],
        ..DirFiles::default()
    })
}

impl Reloader {
    async fn run(mut self, requests: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What the previous poll read: a change is taken once two polls in
        // a row agree, so that an editor's save in several writes is read
        // whole.
        let mut previous: Option<DirFiles> = None;
        // Whether the last read ran short of descriptors (warned once).
        let mut short = false;
        loop {
            let requested = tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                () = requests.notified() => true,
                _ = tick.tick(), if self.config.mappings.watch => false,
            };
            let files = read(&self.config.mappings.dir).await;
            if files.shortage {
                // Not a problem of the files: no reload is tried or refused.
                if !short {
                    let reasons: Vec<String> =
                        files.diagnostics.iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        reason = %reasons.join("; "),
                        "cannot read the mapping files now (the process is short of file descriptors or memory); the running mappings stay, and the files are read again at the next poll"
                    );
                }
                short = true;
                continue;
            }
            short = false;
            if requested {
                tracing::info!(dir = %self.config.mappings.dir.display(), "reloading the mappings on request");
            } else if files == self.loaded || previous.as_ref() != Some(&files) {
                previous = Some(files);
                continue;
            } else {
                tracing::info!(dir = %self.config.mappings.dir.display(), "the mapping files changed; reloading");
            }
            previous = None;
            let outcome = self.reload(&files).await;
            self.loaded = files;
            metrics::counter!(telemetry::MAPPING_RELOADS, "outcome" => outcome.as_str())
                .increment(1);
        }
    }

    /// Compiles and checks `files`; publishes the new set if it passes.
    async fn reload(&mut self, files: &DirFiles) -> Outcome {
        let refuse = |diagnostics: &[mapping::Diagnostic]| {
            for diagnostic in diagnostics {
                tracing::error!(%diagnostic, "mapping reload refused");
            }
            tracing::error!(
                problems = diagnostics.len(),
                "the new mappings were refused; the running ones stay (fix the files, or send SIGHUP to retry)"
            );
            Outcome::Invalid
        };
        let new = match files.compile(self.config.mappings.limits) {
            Ok(new) => new,
            Err(diagnostics) => return refuse(&diagnostics),
        };
        let current = self.live.borrow().clone();
        if let Err(diagnostics) = self.check_live(&current, &new).await {
            return refuse(&diagnostics);
        }
        tracing::info!(
            changes = %summary(&current, &new),
            tables = new.tables().count(),
            "mappings reloaded: in effect from the next transaction boundary"
        );
        self.live.send_replace(Arc::new(new));
        self.schema.recheck();
        Outcome::Applied
    }

    /// With the Postgres source, the reload's step against the database
    /// ([`crate::source::postgres::schema::check_reload`]).
    async fn check_live(
        &self,
        current: &Mappings,
        new: &Mappings,
    ) -> Result<(), Vec<mapping::Diagnostic>> {
        if self.config.source != SourceKind::Postgres {
            return Ok(());
        }
        crate::source::postgres::schema::check_reload(&self.config.postgres, current, new).await
    }
}

/// Which tables a reload adds, removes and changes, for the log.
fn summary(current: &Mappings, new: &Mappings) -> String {
    let tables = |mappings| -> BTreeSet<&TableName> {
        Mappings::tables(mappings).map(|m| &*m.table).collect()
    };
    let (before, after) = (tables(current), tables(new));
    let changed = after
        .intersection(&before)
        .filter(|table| current.table(table).map(signature) != new.table(table).map(signature))
        .collect();
    let mut text = String::new();
    for (label, list) in [
        ("added", after.difference(&before).collect::<Vec<_>>()),
        ("removed", before.difference(&after).collect()),
        ("changed", changed),
    ] {
        if !list.is_empty() {
            let names: Vec<String> = list.iter().map(ToString::to_string).collect();
            let _ = write!(
                text,
                "{}{label}: {}",
                if text.is_empty() { "" } else { "; " },
                names.join(", ")
            );
        }
    }
    if text.is_empty() {
        text.push_str("no table's mapping changed");
    }
    text
}

/// What a table's mapping does, without where it was written: two
/// mappings with the same signature render the same commands.
fn signature(mapping: &TableMapping) -> String {
    // The debug form spells out every rule; origins (indexes into the
    // set's list of locations) move whenever an earlier file changes.
    let text = format!("{mapping:?}");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("OriginId(") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let end = rest.find(')').map_or(rest.len(), |end| end + 1);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{load_str, Limits};

    fn set(text: &str) -> Mappings {
        load_str("m.toml", text, Limits::default()).unwrap()
    }

    #[test]
    fn the_summary_names_added_removed_and_changed_tables() {
        let current = set(
            "[[table]]\nname = \"a\"\nkeys = [\"a:{id}\"]\n[[table]]\nname = \"b\"\nkeys = [\"b:{id}\"]\n[[table]]\nname = \"c\"\nkeys = [\"c:{id}\"]\n",
        );
        // `c` moves after a new entry: its origin changes, its mapping not.
        let new = set(
            "[[table]]\nname = \"a\"\nkeys = [\"a:{id}\", \"a:{id}:x\"]\n[[table]]\nname = \"d\"\nkeys = [\"d:{id}\"]\n[[table]]\nname = \"c\"\nkeys = [\"c:{id}\"]\n",
        );
        assert_eq!(
            summary(&current, &new),
            "added: public.d; removed: public.b; changed: public.a"
        );
        assert_eq!(summary(&new, &new), "no table's mapping changed");
    }
}
