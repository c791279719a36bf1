//! Live checks of mappings against a database's catalog: the tables and
//! columns exist, the tables are in the publication (with every mapped
//! column, where the publication has column lists), and REPLICA IDENTITY
//! sends the old values that templates read on updates and deletes.
//!
//! These are the checks that need a connection; everything else is checked
//! when mappings load. Findings are [`Diagnostic`]s located at the mapping
//! rule they concern.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio_postgres::{Client, NoTls};

use crate::change::{Op, TableName};
use crate::config::SecretUrl;
use crate::mapping::{Diagnostic, Mappings, OriginId, TableMapping};
use crate::source::postgres::tls::{SslMode, TlsSettings};

/// Why the live checks could not run.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot connect to Postgres at {url}")]
    Connect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("catalog query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("TLS settings of postgres.url: {0}")]
    Tls(String),
}

/// Connects for catalog queries; the connection task runs on the current
/// tokio runtime until the client is dropped.
pub async fn connect(url: &SecretUrl) -> Result<Client, CatalogError> {
    let connect_error = |source| CatalogError::Connect {
        url: url.to_string(),
        source,
    };
    let (tls, rest) =
        TlsSettings::from_url(url.expose()).map_err(|e| CatalogError::Tls(e.to_string()))?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(connect_error)?;
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    let client = match tls
        .client_config()
        .map_err(|e| CatalogError::Tls(e.to_string()))?
    {
        Some(tls_config) => {
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_config).clone());
            let (client, connection) = config.connect(connector).await.map_err(connect_error)?;
            spawn_connection(connection);
            client
        }
        None => {
            let (client, connection) = config.connect(NoTls).await.map_err(connect_error)?;
            spawn_connection(connection);
            client
        }
    };
    Ok(client)
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "catalog connection closed");
        }
    });
}

/// Runs every live check and returns what is wrong.
/// The type category (`pg_type.typcategory`: `N` numeric, `B` boolean,
/// ...) of each column of `table`, domains resolved to their base type:
/// what `explain --config` evaluates given values as.
pub async fn column_categories(
    client: &Client,
    table: &TableName,
) -> Result<Vec<(String, char)>, CatalogError> {
    let rows = client
        .query(
            "select a.attname::text, t.typcategory::text
             from pg_attribute a
             join pg_class c on c.oid = a.attrelid
             join pg_namespace n on n.oid = c.relnamespace
             join pg_type t on t.oid = coalesce(
                 (select typbasetype from pg_type where oid = a.atttypid and typtype = 'd'),
                 a.atttypid)
             where n.nspname = $1 and c.relname = $2 and a.attnum > 0 and not a.attisdropped",
            &[&&*table.schema, &&*table.name],
        )
        .await
        .map_err(CatalogError::Query)?;
    Ok(rows
        .iter()
        .map(|row| {
            let category: String = row.get(1);
            (row.get(0), category.chars().next().unwrap_or('X'))
        })
        .collect())
}

pub async fn check(
    mappings: &Mappings,
    client: &Client,
    publication: &str,
) -> Result<Vec<Diagnostic>, CatalogError> {
    let findings = check_by_table(mappings, client, publication).await?;
    Ok(findings
        .tables
        .into_iter()
        .flat_map(|(_, diagnostics)| diagnostics)
        .collect())
}

/// Whether the connected role may stream changes: superuser, the
/// `REPLICATION` attribute, or (RDS and Aurora, which grant logical
/// replication through a role instead) membership in `rds_replication`.
/// A role that may not is a problem, with the grant that fixes it on this
/// server (`GRANT rds_replication` where that role exists).
pub async fn replication_privilege(client: &Client) -> Result<Option<Diagnostic>, CatalogError> {
    let row = client
        .query_one(
            "select current_user::text, r.rolsuper, r.rolreplication,
                    exists (select 1 from pg_roles g where g.rolname = 'rds_replication'),
                    exists (select 1 from pg_roles g where g.rolname = 'rds_replication'
                            and pg_has_role(current_user, g.oid, 'member'))
             from pg_roles r where r.rolname = current_user",
            &[],
        )
        .await?;
    let (role, superuser, replication, rds, rds_member): (String, bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if superuser || replication || rds_member {
        return Ok(None);
    }
    let quoted = crate::sql::quote_ident(&role);
    let help = if rds {
        format!("GRANT rds_replication TO {quoted}; (RDS and Aurora grant logical replication through that role)")
    } else {
        format!("ALTER ROLE {quoted} WITH REPLICATION; (as a superuser, or the provider's admin role: docs/MANAGED.md)")
    };
    Ok(Some(
        Diagnostic::general(format!(
            "role `{role}` may not stream changes: it is not a superuser and has no REPLICATION attribute{}",
            if rds { " nor the rds_replication role" } else { "" }
        ))
        .help(help),
    ))
}

/// Warnings about the server settings that can invalidate evictd's slot
/// while nobody reads it: `max_slot_wal_keep_size` (13+), with the outage
/// it allows at the average WAL rate since the statistics were reset
/// (`pg_stat_wal`, 14+), and `idle_replication_slot_timeout` (18+).
pub async fn slot_limit_warnings(client: &Client) -> Result<Vec<String>, CatalogError> {
    let settings = client
        .query(
            "select name, setting, unit from pg_settings
             where name in ('max_slot_wal_keep_size', 'idle_replication_slot_timeout')",
            &[],
        )
        .await?;
    let mut warnings = Vec::new();
    for row in settings {
        let (name, setting, unit): (String, String, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        let Ok(value) = setting.parse::<i64>() else {
            continue;
        };
        match name.as_str() {
            "max_slot_wal_keep_size" if value >= 0 => {
                // pg_settings gives it in MB.
                let bytes = value.saturating_mul(1 << 20);
                let rate = wal_rate(client).await;
                let outage = match rate {
                    Some(rate) if rate > 0.0 => {
                        #[allow(clippy::cast_precision_loss)]
                        let seconds = bytes as f64 / rate;
                        format!(
                            "at this server's average WAL rate ({:.1} MB/min) an evictd outage of about {} does it",
                            rate * 60.0 / f64::from(1 << 20),
                            duration_words(seconds)
                        )
                    }
                    _ => "the WAL rate is not known (pg_stat_wal), so neither is the outage that does it".to_owned(),
                };
                warnings.push(format!(
                    "postgres: warning: max_slot_wal_keep_size = {value}MB: Postgres invalidates evictd's slot once it holds back more WAL than that, and evictd then invalidates every mapped table; {outage}"
                ));
            }
            "idle_replication_slot_timeout" if value > 0 => {
                let seconds = match unit.as_deref() {
                    Some("min") => value.saturating_mul(60),
                    Some("ms") => value / 1000,
                    _ => value,
                };
                #[allow(clippy::cast_precision_loss)]
                let words = duration_words(seconds as f64);
                warnings.push(format!(
                    "postgres: warning: idle_replication_slot_timeout = {setting}{}: an evictd outage longer than {words} invalidates its slot, and evictd then invalidates every mapped table",
                    unit.unwrap_or_default()
                ));
            }
            _ => {}
        }
    }
    Ok(warnings)
}

/// Bytes of WAL per second on average since `pg_stat_wal` was reset.
async fn wal_rate(client: &Client) -> Option<f64> {
    let row = client
        .query_opt(
            "select wal_bytes::float8, extract(epoch from now() - stats_reset)::float8 from pg_stat_wal",
            &[],
        )
        .await
        .ok()??;
    let (bytes, seconds): (Option<f64>, Option<f64>) = (row.get(0), row.get(1));
    let (bytes, seconds) = (bytes?, seconds?);
    (seconds > 0.0).then(|| bytes / seconds)
}

/// `seconds` as minutes, hours or days, roughly.
fn duration_words(seconds: f64) -> String {
    if seconds < 120.0 {
        format!("{seconds:.0} s")
    } else if seconds < 7200.0 {
        format!("{:.0} min", seconds / 60.0)
    } else if seconds < 172_800.0 {
        format!("{:.1} h", seconds / 3600.0)
    } else {
        format!("{:.1} days", seconds / 86_400.0)
    }
}

/// What the live checks found, grouped for `evictd run`.
#[derive(Debug, Default)]
pub struct Findings {
    /// By subject (`publication <name>`, then each mapped table), in
    /// mapping order; a subject without problems has an empty list.
    pub tables: Vec<(String, Vec<Diagnostic>)>,
    /// The relation OID of each mapped table that exists.
    pub oids: Vec<(u32, Arc<TableName>)>,
}

/// Runs every live check; the problems are grouped by what they concern,
/// so that `run` can report (and later clear) them table by table.
pub async fn check_by_table(
    mappings: &Mappings,
    client: &Client,
    publication: &str,
) -> Result<Findings, CatalogError> {
    let mut checker = Checker {
        mappings,
        client,
        diagnostics: Vec::new(),
        oids: Vec::new(),
    };
    let published = checker.publication(publication).await?;
    let mut tables = vec![(
        format!("publication {publication}"),
        std::mem::take(&mut checker.diagnostics),
    )];
    for mapping in mappings.tables() {
        checker.table(mapping, publication, published).await?;
        tables.push((
            mapping.table.to_string(),
            std::mem::take(&mut checker.diagnostics),
        ));
    }
    Ok(Findings {
        tables,
        oids: checker.oids,
    })
}

/// Which ops a publication publishes.
#[derive(Clone, Copy)]
struct PublishedOps {
    all_tables: bool,
    ops: [bool; 4],
}

struct Checker<'a> {
    mappings: &'a Mappings,
    client: &'a Client,
    diagnostics: Vec<Diagnostic>,
    oids: Vec<(u32, Arc<TableName>)>,
}

/// What the catalog says about one table.
struct TableFacts {
    columns: Vec<String>,
    /// The columns of type json or jsonb (or a domain over them).
    json_columns: BTreeSet<String>,
    replica_identity: u8,
    identity_columns: BTreeSet<String>,
}

impl Checker<'_> {
    fn report(&mut self, origin: OriginId, message: String, help: String) {
        let location = self.mappings.origin(origin).location.clone();
        self.diagnostics
            .push(Diagnostic::at(location, message).help(help));
    }

    async fn publication(
        &mut self,
        publication: &str,
    ) -> Result<Option<PublishedOps>, CatalogError> {
        let row = self
            .client
            .query_opt(
                "select puballtables, pubinsert, pubupdate, pubdelete, pubtruncate from pg_publication where pubname = $1",
                &[&publication],
            )
            .await?;
        let Some(row) = row else {
            let tables: Vec<String> = self
                .mappings
                .tables()
                .map(|m| m.table.to_string())
                .collect();
            self.diagnostics.push(
                Diagnostic::general(format!("publication `{publication}` does not exist")).help(
                    format!(
                        "CREATE PUBLICATION {publication} FOR TABLE {}",
                        tables.join(", ")
                    ),
                ),
            );
            return Ok(None);
        };
        Ok(Some(PublishedOps {
            all_tables: row.get(0),
            ops: [row.get(1), row.get(2), row.get(3), row.get(4)],
        }))
    }

    async fn table(
        &mut self,
        mapping: &TableMapping,
        publication: &str,
        published: Option<PublishedOps>,
    ) -> Result<(), CatalogError> {
        let Some(facts) = self.facts(mapping).await? else {
            return Ok(());
        };
        self.columns(mapping, &facts);
        if let Some(published) = published {
            self.membership(mapping, &facts, publication, published)
                .await?;
        }
        self.replica_identity(mapping, &facts);
        Ok(())
    }

    async fn facts(&mut self, mapping: &TableMapping) -> Result<Option<TableFacts>, CatalogError> {
        let (schema, name) = (&*mapping.table.schema, &*mapping.table.name);
        let row = self
            .client
            .query_opt(
                "select c.oid, c.relreplident::text from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                 where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
                &[&schema, &name],
            )
            .await?;
        let Some(row) = row else {
            let help = self.near_table(schema, name).await?;
            self.report(
                mapping.origin,
                format!("table {} does not exist", mapping.table),
                help,
            );
            return Ok(None);
        };
        let oid: u32 = row.get(0);
        self.oids.push((oid, mapping.table.clone()));
        let replica_identity = row.get::<_, String>(1).bytes().next().unwrap_or(b'd');
        let columns = self
            .client
            .query(
                "select attname::text from pg_attribute where attrelid = $1 and attnum > 0 and not attisdropped order by attnum",
                &[&oid],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let json_columns = self
            .client
            .query(
                "select attname::text from pg_attribute \
                 where attrelid = $1 and attnum > 0 and not attisdropped \
                 and coalesce((select typbasetype from pg_type where oid = atttypid and typtype = 'd'), atttypid) in ('json'::regtype, 'jsonb'::regtype)",
                &[&oid],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let identity_columns = self
            .client
            .query(
                "select a.attname::text from pg_index i \
                 join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey) \
                 where i.indrelid = $1 and (case when $2 = 'i' then i.indisreplident else i.indisprimary end)",
                &[&oid, &char::from(replica_identity).to_string()],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        Ok(Some(TableFacts {
            columns,
            json_columns,
            replica_identity,
            identity_columns,
        }))
    }

    async fn near_table(&self, schema: &str, name: &str) -> Result<String, CatalogError> {
        let rows = self
            .client
            .query(
                "select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                 where n.nspname = $1 and c.relkind in ('r', 'p')",
                &[&schema],
            )
            .await?;
        let names: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        let candidates: Vec<&str> = names.iter().map(String::as_str).collect();
        Ok(
            match crate::mapping::diagnostic::did_you_mean(name, &candidates) {
                Some(near) => format!("did you mean {schema}.{near}?"),
                None => "create the table, or fix the mapping's `name`".into(),
            },
        )
    }

    fn columns(&mut self, mapping: &TableMapping, facts: &TableFacts) {
        let mut uses: Vec<(&str, OriginId)> = Vec::new();
        for (template, origin) in mapping.templates() {
            uses.extend(template.columns().map(|column| (column, origin)));
        }
        for refresh in &mapping.refresh {
            let columns = refresh.columns.iter().map(|column| &**column);
            uses.extend(columns.zip(refresh.column_origins.iter().copied()));
        }
        let changed = mapping.changed.iter().flatten().map(|column| &**column);
        uses.extend(changed.zip(mapping.changed_origins.iter().copied()));
        for (condition, origin) in mapping.conditions() {
            uses.extend(
                condition
                    .columns()
                    .into_iter()
                    .map(|column| (column, origin)),
            );
        }
        for rule in &mapping.keys {
            let changed = rule.changed.iter().flatten().map(|column| &**column);
            uses.extend(changed.map(|column| (column, rule.origin)));
        }
        uses.dedup();
        let known: Vec<&str> = facts.columns.iter().map(String::as_str).collect();
        for (template, origin) in mapping.templates() {
            for column in template.json_columns() {
                if known.contains(&column) && !facts.json_columns.contains(column) {
                    let json: Vec<&str> = facts.json_columns.iter().map(String::as_str).collect();
                    self.report(
                        origin,
                        format!(
                            "`{}` reaches into `{column}` with a json path, but {column} of {} is not json or jsonb",
                            template.source(),
                            mapping.table
                        ),
                        if json.is_empty() {
                            format!("{} has no json column: use `{{{column}}}` without a path", mapping.table)
                        } else {
                            format!("json columns of {}: {}", mapping.table, json.join(", "))
                        },
                    );
                }
            }
        }
        for (column, origin) in uses {
            if known.contains(&column) {
                continue;
            }
            let help = match crate::mapping::diagnostic::did_you_mean(column, &known) {
                Some(near) => format!("did you mean `{near}`?"),
                None => format!("columns of {}: {}", mapping.table, known.join(", ")),
            };
            self.report(
                origin,
                format!(
                    "column `{column}` does not exist in table {}",
                    mapping.table
                ),
                help,
            );
        }
    }

    async fn membership(
        &mut self,
        mapping: &TableMapping,
        facts: &TableFacts,
        publication: &str,
        published: PublishedOps,
    ) -> Result<(), CatalogError> {
        let table = &mapping.table;
        let row = self
            .client
            .query_opt(
                "select * from pg_publication_tables where pubname = $1 and schemaname = $2 and tablename = $3",
                &[&publication, &&*table.schema, &&*table.name],
            )
            .await?;
        let Some(row) = row else {
            let help = if published.all_tables {
                "the publication is FOR ALL TABLES but does not include this table; check the table's schema".into()
            } else {
                format!("ALTER PUBLICATION {publication} ADD TABLE {table}")
            };
            self.report(
                mapping.origin,
                format!("table {table} is not in publication `{publication}`"),
                help,
            );
            return Ok(());
        };
        // PG 15 and later publish column lists; a column outside the list
        // never reaches evictd.
        let listed: Option<Vec<String>> = row.try_get("attnames").ok();
        if let Some(listed) = listed {
            // Columns that do not exist at all were reported already.
            let exists = |column: &&str| facts.columns.iter().any(|c| c == column);
            let unlisted = |column: &&str| !listed.iter().any(|l| l == column);
            let missing: Vec<&str> = mapping
                .columns()
                .into_iter()
                .filter(exists)
                .filter(unlisted)
                .collect();
            if !missing.is_empty() {
                self.report(
                    mapping.origin,
                    format!(
                        "publication `{publication}` does not publish column(s) {} of {table}",
                        missing.join(", ")
                    ),
                    format!("add them to the publication's column list for {table}, or drop the column list"),
                );
            }
        }
        for (index, op) in Op::ALL.into_iter().enumerate() {
            if mapping.on.contains(op) && !published.ops[index] {
                self.report(
                    mapping.origin,
                    format!("publication `{publication}` does not publish {op}, which the mapping of {table} acts on"),
                    format!("ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, truncate'), or remove {op} from `on`"),
                );
            }
        }
        Ok(())
    }

    fn replica_identity(&mut self, mapping: &TableMapping, facts: &TableFacts) {
        if !(mapping.on.contains(Op::Update) || mapping.on.contains(Op::Delete)) {
            return;
        }
        let table = &mapping.table;
        let fix = format!("ALTER TABLE {table} REPLICA IDENTITY FULL");
        match facts.replica_identity {
            b'f' => {}
            b'n' => self.report(
                mapping.origin,
                format!("table {table} has REPLICA IDENTITY NOTHING: updates and deletes carry no old row"),
                fix,
            ),
            b'd' if facts.identity_columns.is_empty() => self.report(
                mapping.origin,
                format!("table {table} has no primary key, so REPLICA IDENTITY DEFAULT sends no old row"),
                fix,
            ),
            identity => {
                let kind = if identity == b'i' { "USING INDEX" } else { "DEFAULT" };
                for (template, origin) in mapping.templates() {
                    let unsent: Vec<&str> = template.columns().filter(|c| !facts.identity_columns.contains(*c)).collect();
                    if unsent.is_empty() {
                        continue;
                    }
                    let fallback = if mapping.versions.iter().any(|rule| rule.origin == origin) {
                        "bump"
                    } else {
                        "delete"
                    };
                    self.report(
                        origin,
                        format!(
                            "template `{}` reads the old value of {}, which REPLICA IDENTITY {kind} of {table} does not send; \
                             updates and deletes would fall back to a pattern {fallback}",
                            template.source(),
                            unsent.join(", ")
                        ),
                        fix.clone(),
                    );
                }
                for (condition, origin) in mapping.conditions() {
                    let unsent: Vec<&str> = condition
                        .columns()
                        .into_iter()
                        .filter(|c| !facts.identity_columns.contains(*c))
                        .collect();
                    if unsent.is_empty() {
                        continue;
                    }
                    self.report(
                        origin,
                        format!(
                            "`when = \"{condition}\"` reads the old value of {}, which REPLICA IDENTITY {kind} of {table} does not send; \
                             on updates and deletes it is taken as true for the old row (nothing is missed, more may be invalidated)",
                            unsent.join(", ")
                        ),
                        fix.clone(),
                    );
                }
            }
        }
    }
}
