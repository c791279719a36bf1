//! The live catalog checks under a running Postgres source: `evictd
//! check`'s checks of the mappings against the database, run when a
//! session starts, every minute, and when asked
//! ([`SchemaHealth::recheck`]: a changed Relation message, a reload), with
//! their findings reported to the pipeline's [`SchemaHealth`]. And the
//! step a reload takes against the database before a new set may run
//! ([`check_reload`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::control::Control;
use crate::change::TableName;
use crate::config::{PostgresConfig, SecretUrl};
use crate::mapping::{self, Mappings};
use crate::pipeline::schema::{Origin, SchemaHealth};

/// The live checks: what they report to, and what they need.
#[derive(Clone)]
pub struct LiveChecks {
    health: SchemaHealth,
    url: SecretUrl,
    publication: String,
    /// The running mappings (a reload replaces them).
    mappings: watch::Receiver<Arc<Mappings>>,
}

impl LiveChecks {
    pub fn new(
        health: SchemaHealth,
        url: SecretUrl,
        publication: String,
        mappings: watch::Receiver<Arc<Mappings>>,
    ) -> LiveChecks {
        LiveChecks {
            health,
            url,
            publication,
            mappings,
        }
    }

    /// Runs the checks now and reports each subject's result; returns the
    /// OIDs of the mapped tables found. A failure to run them (the
    /// database unreachable) is logged and changes nothing.
    pub async fn run(&self) -> Vec<(u32, Arc<TableName>)> {
        let mappings = self.mappings.borrow().clone();
        let findings = async {
            let client = crate::catalog::connect(&self.url).await?;
            crate::catalog::check_by_table(&mappings, &client, &self.publication).await
        };
        match findings.await {
            Ok(findings) => {
                // A table a reload stopped mapping has no problems any more.
                for subject in self.health.subjects(Origin::LiveCheck) {
                    if !findings.tables.iter().any(|(s, _)| *s == subject) {
                        self.health.report(&subject, Origin::LiveCheck, None);
                    }
                }
                for (subject, diagnostics) in &findings.tables {
                    let problem = (!diagnostics.is_empty()).then(|| {
                        diagnostics
                            .iter()
                            .map(|d| d.message.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")
                    });
                    self.health.report(subject, Origin::LiveCheck, problem);
                }
                findings.oids
            }
            Err(error) => {
                tracing::warn!(%error, "the live mapping checks could not run");
                Vec::new()
            }
        }
    }

    /// Runs the checks every `interval` and whenever a recheck is asked
    /// for, until `stop`, so that drift is noticed even while the table
    /// sees no changes.
    pub async fn watch(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; a session start runs the checks.
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = tick.tick() => {}
                () = self.health.recheck_asked() => {}
            }
            self.run().await;
        }
    }
}

/// What a reload does against the database before a new set may run: adds
/// the tables it newly maps to the publication when `postgres.create_slot`
/// allows, then refuses the set for any problem the live checks find that
/// the running set does not have.
pub async fn check_reload(
    postgres: &PostgresConfig,
    current: &Mappings,
    new: &Mappings,
) -> Result<(), Vec<mapping::Diagnostic>> {
    let Some(url) = postgres.url.as_ref() else {
        return Ok(());
    };
    let unreachable = |error: String| {
        vec![mapping::Diagnostic::general(format!(
            "cannot check the new mappings against the database: {error}"
        ))]
    };
    let control = Control::connect_to(url, &postgres.slot, &postgres.publication)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let added: Vec<&TableName> = new
        .tables()
        .map(|mapping| &*mapping.table)
        .filter(|table| current.table(table).is_none())
        .collect();
    if postgres.create_slot && !added.is_empty() {
        let joined = control
            .add_to_publication(&added)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        for table in joined {
            tracing::warn!(%table, publication = %postgres.publication, "added the newly mapped table to the publication: its changes before this moment were not captured, so its cached entries may be stale until they expire or are invalidated");
        }
    }
    let client = control.client();
    let publication = &postgres.publication;
    let problems = |mappings| async move {
        crate::catalog::check(mappings, client, publication)
            .await
            .map_err(|e| unreachable(e.to_string()))
    };
    let known: BTreeSet<String> = problems(current)
        .await?
        .into_iter()
        .map(|d| d.message)
        .collect();
    let fresh: Vec<mapping::Diagnostic> = problems(new)
        .await?
        .into_iter()
        .filter(|d| !known.contains(&d.message))
        .collect();
    if fresh.is_empty() {
        Ok(())
    } else {
        Err(fresh)
    }
}
