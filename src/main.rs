//! The `evictd` command line. Exit codes: 0 ok, 2 bad usage, config or
//! mappings, 1 a runtime failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::bail;
use clap::{Parser, Subcommand};

use evictd::change::{Lsn, Op, Row, RowChange, TableName};
use evictd::config::{Config, SecretUrl};
use evictd::internal::explain::{self, ColumnTypes};
use evictd::internal::Control;
use evictd::mapping::{self, Diagnostic, Limits, Mappings};
use evictd::pipeline::{Options, SourceState};

#[derive(Parser)]
#[command(
    name = "evictd",
    version,
    about = "Keeps caches exact by following the database's change log",
    after_help = "Relative paths inside a config file (mappings.dir, password_file, ca_file, cert_file, key_file, token_file, secret_file, sql_messages_secret_file, ...) are relative to the folder of that config file, not to the working directory."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A throwaway Postgres and Redis, the demo schema and mappings, a short
    /// workload, and what evictd did about each commit.
    Demo {
        #[arg(long, default_value = "migrations")]
        migrations: PathBuf,
        #[arg(long, default_value = "mappings")]
        mappings: PathBuf,
    },
    /// Stream the slot into Redis until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Consume the slot up to a WAL position, apply everything, and exit.
    Replay {
        #[arg(long, short)]
        config: PathBuf,
        /// A WAL position like 0/16B3748, or `now` for the current one.
        #[arg(long)]
        until_lsn: String,
    },
    /// Check mappings: offline always, against the database unless --offline.
    Check {
        /// The evictd.toml to take the mappings directory, limits and database from.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The mappings directory (overrides the config's).
        #[arg(long)]
        mappings: Option<PathBuf>,
        /// Skip the checks that need a database connection.
        #[arg(long)]
        offline: bool,
        /// Database for the live checks (overrides the config's postgres.url).
        #[arg(long, env = "EVICTD_POSTGRES__URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Publication the mapped tables must be in (default: the config's, or "evictd").
        #[arg(long)]
        publication: Option<String>,
        /// `text` (default), or `json`: one object on stdout for scripts.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// Create the publication and slot; print the REPLICA IDENTITY statements
    /// the mappings need.
    Init {
        #[arg(long, short)]
        config: PathBuf,
        /// Print the SQL without running anything.
        #[arg(long)]
        dry_run: bool,
        /// Drop the replication slot and create it anew, then invalidate
        /// every mapped table coarsely and apply up to now: the way out when
        /// the slot cannot decode (its publication was dropped and created
        /// again). Stop `evictd run` first.
        #[arg(long)]
        reset_slot: bool,
    },
    /// The slot (active, lag, retained WAL) and what evictd last applied.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object on stdout (warnings included) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print what evictd applies, batch by batch (its L1 broadcasts): the
    /// recent ones from the broadcast log, then each new one. Runs until
    /// interrupted.
    Watch {
        #[arg(long, short)]
        config: PathBuf,
        /// Only batches that invalidated this key (by name or pattern).
        #[arg(long)]
        key: Option<String>,
        /// Only batches with changes of this mapped table.
        #[arg(long)]
        table: Option<String>,
        /// How many recent batches to print first.
        #[arg(long, default_value_t = 10)]
        backlog: usize,
    },
    /// Why a key holds what it holds: the mapping rules that render it,
    /// the rows it stands for, what Redis holds, its recent invalidations
    /// from the broadcast log, and a verdict; exit 1 when it is stale.
    Trace {
        #[arg(long, short)]
        config: PathBuf,
        /// The key as the mappings render it, without `redis.prefix`.
        key: String,
        /// One JSON object on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A cache strategy report measured over a window: per mapped table
    /// its write rate against evictd's invalidations, per key family how
    /// long keys live between invalidations, and (with pg_stat_statements)
    /// the reads worth caching with the mapping that keeps them exact.
    Report {
        #[arg(long, short)]
        config: PathBuf,
        /// How long to measure: `30s`, `5m`, `1h` or seconds.
        #[arg(long, default_value = "60s")]
        window: String,
        #[arg(long, default_value = "markdown", value_parser = ["markdown", "html", "json"])]
        format: String,
    },
    /// Compare every write-through refresh in Redis with its row in the
    /// database; exit 1 if any is stale.
    Audit {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this mapped table (`table` or `schema.table`).
        #[arg(long)]
        table: Option<String>,
        /// At most this many rows per table.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Fill the write-through refresh keys from the database before
    /// traffic does, never over a value and never with an older one.
    Warm {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this mapped table (`table` or `schema.table`).
        #[arg(long)]
        table: Option<String>,
        /// At most this many rows per table (and per [[table.warm]] query).
        #[arg(long)]
        limit: Option<u64>,
        /// Keys per second at most (0: no limit); default `warm.rate`.
        #[arg(long)]
        rate: Option<u64>,
    },
    /// Print the commands one change produces, in the order they are sent.
    Explain {
        #[arg(long)]
        mappings: PathBuf,
        /// Table name, `table` or `schema.table`.
        #[arg(long)]
        table: String,
        /// insert, update, delete or truncate.
        #[arg(long)]
        op: String,
        /// The old row as a JSON object of column -> value.
        #[arg(long)]
        old: Option<String>,
        /// The new row as a JSON object of column -> value.
        #[arg(long)]
        new: Option<String>,
        /// A column of the new row that is an unchanged TOAST value (repeatable).
        #[arg(long = "unchanged", value_name = "COLUMN")]
        unchanged: Vec<String>,
        /// The table's REPLICA IDENTITY, `full` or `default`: what the
        /// old row of an update or delete holds (default: the --old given).
        #[arg(long, value_parser = ["full", "default"])]
        identity: Option<String>,
        /// The table's key columns, which REPLICA IDENTITY DEFAULT sends
        /// (with --identity default; repeatable or comma-separated).
        #[arg(long = "key", value_name = "COLUMN", value_delimiter = ',')]
        key: Vec<String>,
        /// Take the column types from the database of this config (as
        /// `check` does): each given value is evaluated as its column's
        /// type, as `run` does, whatever JSON type it was given in.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// A failure that exits 2 (bad usage, config or mappings) rather than 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// `eprintln!` that never panics: a message stderr cannot take (a full
/// disk, a closed pipe) is dropped, so that the exit status stays the one
/// the command chose.
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = init_logging(match cli.command {
        Command::Run { .. } | Command::Replay { .. } => "info",
        Command::Demo { .. } => "error",
        _ => "warn",
    });
    if let Err(error) = logging {
        eprintln!("error: {error}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Demo {
            migrations,
            mappings,
        } => demo(&migrations, &mappings),
        Command::Run { config } => run(&config, None, false),
        Command::Init {
            config,
            dry_run,
            reset_slot,
        } => init(&config, dry_run, reset_slot),
        Command::Status { config, json } => status(&config, json),
        Command::Watch {
            config,
            key,
            table,
            backlog,
        } => watch(&config, key, table, backlog),
        Command::Replay { config, until_lsn } => run(&config, Some(until_lsn), false),
        Command::Trace { config, key, json } => trace(&config, &key, json),
        Command::Report {
            config,
            window,
            format,
        } => strategy_report(&config, &window, &format),
        Command::Audit {
            config,
            table,
            limit,
        } => audit(&config, table.as_deref(), limit),
        Command::Warm {
            config,
            table,
            limit,
            rate,
        } => warm(&config, table.as_deref(), limit, rate),
        Command::Check {
            config,
            mappings,
            offline,
            database_url,
            publication,
            format,
        } => check(CheckArgs {
            json: format == "json",
            config,
            mappings,
            offline,
            database_url,
            publication,
        }),
        Command::Explain {
            mappings,
            table,
            op,
            old,
            new,
            unchanged,
            identity,
            key,
            config,
        } => explain(
            &mappings,
            &table,
            &op,
            Rows {
                old: old.as_deref(),
                new: new.as_deref(),
                config: config.as_deref(),
                unchanged: &unchanged,
                identity: identity.as_deref(),
                key: &key,
            },
        ),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.is::<UsageError>() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Logs to stderr: text, coloured only on a terminal and without
/// `NO_COLOR`, or one JSON object per line with `EVICTD_LOG_FORMAT=json`.
fn init_logging(default: &str) -> Result<(), UsageError> {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("EVICTD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(evictd::internal::telemetry::LogSink)
        .log_internal_errors(false);
    match std::env::var("EVICTD_LOG_FORMAT").as_deref() {
        Err(_) | Ok("" | "text") => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
            logs.with_ansi(std::io::stderr().is_terminal() && !no_color)
                .init();
        }
        Ok("json") => logs.json().init(),
        Ok(other) => {
            return Err(UsageError(format!(
                "EVICTD_LOG_FORMAT is `{other}`: it is `text` (the default) or `json`"
            )))
        }
    }
    Ok(())
}

fn demo(migrations: &Path, mappings: &Path) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(evictd::internal::demo::run(migrations, mappings)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(evictd::internal::demo::DemoError::Mappings(diagnostics)) => Ok(report(&diagnostics)),
        Err(error) => Err(error.into()),
    }
}

fn load(path: &Path) -> anyhow::Result<Result<(Config, Mappings), ExitCode>> {
    let config = Config::load(path).map_err(|error| UsageError(error.to_string()))?;
    Ok(
        match mapping::load_dir(&config.mappings.dir, config.mappings.limits) {
            Ok(mappings) => Ok((config, mappings)),
            Err(diagnostics) => Err(report(&diagnostics)),
        },
    )
}

fn init(path: &Path, dry_run: bool, reset_slot: bool) -> anyhow::Result<ExitCode> {
    let (config, mappings) = match load(path)? {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    if config.source == evictd::config::SourceKind::Kafka {
        if reset_slot {
            bail!(UsageError(
                "--reset-slot: source.kind = \"kafka\" has no slot".into()
            ));
        }
        println!(
            "source.kind = \"kafka\": evictd needs no slot or publication; Debezium owns the topics and the consumer group is created on first run"
        );
        return Ok(ExitCode::SUCCESS);
    }
    if reset_slot {
        let slot = &config.postgres.slot;
        if dry_run {
            println!(
                "-- would run: drop the replication slot {slot} and create it anew (and the publication if it is missing), then invalidate every mapped table ({}) coarsely and apply everything up to now",
                mappings.tables().count()
            );
            return Ok(ExitCode::SUCCESS);
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(evictd::internal::operator::reset_slot(&config, &mappings))?;
        println!("re-created the replication slot {slot}: changes are kept from now on");
        println!("invalidating every mapped table coarsely (what changed before now is not in the slot) ...");
        let code = run(path, Some("now".into()), true)?;
        if code == ExitCode::SUCCESS {
            println!("done: the caches hold nothing older than the new slot; start evictd run");
        }
        return Ok(code);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let steps = evictd::internal::operator::init_plan(&config, &mappings).await?;
        for step in &steps {
            let state = match (step.needed, step.sql.starts_with("ALTER TABLE"), dry_run) {
                (false, _, _) => "-- already done",
                (true, true, _) => "-- run this yourself (it locks the table briefly)",
                (true, false, true) => "-- would run",
                (true, false, false) => "-- running",
            };
            println!(
                "{state}: {}
{}
",
                step.why, step.sql
            );
        }
        if !dry_run {
            evictd::internal::operator::init(&config, &steps).await?;
            println!("done");
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn status(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(path).map_err(|error| UsageError(error.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = match &config.kafka {
        #[cfg(feature = "kafka")]
        Some(kafka) if config.source == evictd::config::SourceKind::Kafka => {
            let mut report = evictd::internal::group_status(kafka)?;
            report.extend(runtime.block_on(evictd::internal::operator::kafka_status(&config)));
            report
        }
        #[cfg(not(feature = "kafka"))]
        Some(_) if config.source == evictd::config::SourceKind::Kafka => bail!(UsageError(
            "source.kind = \"kafka\", but this evictd was built without the `kafka` feature".into()
        )),
        _ => runtime.block_on(evictd::internal::operator::status(&config))?,
    };
    if json {
        println!("{}", report.to_json());
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", report.text);
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(ExitCode::SUCCESS)
}

fn warm(
    path: &Path,
    table: Option<&str>,
    limit: Option<u64>,
    rate: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let (config, mappings) = match load(path)? {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    let table = table
        .map(evictd::change::TableName::parse)
        .transpose()
        .map_err(|why| UsageError(format!("--table: {why}")))?;
    let options = evictd::internal::warm::WarmOptions {
        table,
        limit,
        rate: rate.unwrap_or(config.warm.rate),
        progress: true,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let summary = runtime
        .block_on(evictd::internal::warm::warm(&config, &mappings, &options))
        .map_err(usage_if_config)?;
    println!("{}", summary.text());
    Ok(ExitCode::SUCCESS)
}

/// A config error (an unmapped table, a missing URL) as a usage error
/// (exit 2); anything else as it is.
fn usage_if_config(error: evictd::error::Error) -> anyhow::Error {
    if error.kind() == evictd::error::ErrorKind::Config {
        anyhow::Error::new(UsageError(error.to_string()))
    } else {
        anyhow::Error::new(error)
    }
}

fn audit(path: &Path, table: Option<&str>, limit: Option<u64>) -> anyhow::Result<ExitCode> {
    use evictd::internal::audit;
    use std::io::IsTerminal as _;
    let (config, mappings) = match load(path)? {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    let table = table
        .map(evictd::change::TableName::parse)
        .transpose()
        .map_err(|why| UsageError(format!("--table: {why}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let terminal = std::io::stderr().is_terminal();
    let show = |line: &audit::SweepLine| {
        if terminal {
            eprint!(
                "\r\x1b[2Kaudit: {} {}: {} rows, {} stale",
                line.table, line.key, line.rows, line.stale
            );
        }
    };
    let sweep = runtime
        .block_on(audit::sweep(
            &config,
            &mappings,
            table.as_ref(),
            limit,
            show,
        ))
        .map_err(usage_if_config)?;
    if terminal {
        eprint!("\r\x1b[2K");
    }
    print!("{}", audit::table_text(&sweep));
    for finding in &sweep.stale {
        if finding.table == "-" {
            println!("stale: {} (a client fill): {}", finding.key, finding.why);
        } else {
            println!(
                "stale: {} ({} where {}): {}",
                finding.key, finding.table, finding.row, finding.why
            );
        }
    }
    for finding in &sweep.unverifiable {
        println!(
            "unverifiable: {} ({}): {}",
            finding.key, finding.table, finding.why
        );
    }
    if let Some(fills) = &sweep.fills {
        println!(
            "client fills: {} values, {} recorded an apply stamp, compared with {} stamped invalidations in the broadcast log: {} stale",
            fills.values, fills.recorded, fills.invalidations, fills.stale
        );
    }
    let compared: u64 = sweep.lines.iter().map(|line| line.rows).sum();
    println!(
        "audit: {compared} entries compared, {} stale",
        sweep.stale.len()
    );
    Ok(if sweep.stale.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn watch(
    path: &Path,
    key: Option<String>,
    table: Option<String>,
    backlog: usize,
) -> anyhow::Result<ExitCode> {
    use evictd::internal::watch;
    let config = Config::load(path).map_err(|error| UsageError(error.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let table = match table {
        Some(table) => {
            // Only a mapped table ever shows in a batch: a typo would wait
            // forever for nothing.
            let mappings = match mapping::load_dir(&config.mappings.dir, config.mappings.limits) {
                Ok(mappings) => mappings,
                Err(diagnostics) => return Ok(report(&diagnostics)),
            };
            Some(mapped_table(&mappings, &table)?)
        }
        None => None,
    };
    let filter = watch::Filter { key, table };
    let mut out = std::io::stdout();
    runtime.block_on(watch::watch(&config.redis, &filter, backlog, &mut out))?;
    Ok(ExitCode::SUCCESS)
}

fn strategy_report(path: &Path, window: &str, format: &str) -> anyhow::Result<ExitCode> {
    use evictd::internal::report;
    let window =
        report::parse_window(window).map_err(|why| UsageError(format!("--window: {why}")))?;
    let (config, mappings) = match load(path)? {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let measured = runtime.block_on(report::report(&config, &mappings, window))?;
    match format {
        "json" => println!("{}", serde_json::to_string(&measured)?),
        "html" => print!("{}", report::html(&measured)),
        _ => print!("{}", report::markdown(&measured)),
    }
    Ok(ExitCode::SUCCESS)
}

fn trace(path: &Path, key: &str, json: bool) -> anyhow::Result<ExitCode> {
    use evictd::internal::trace;
    let (config, mappings) = match load(path)? {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let found = runtime.block_on(trace::trace(&config, &mappings, key))?;
    if json {
        println!("{}", serde_json::to_string(&found)?);
    } else {
        print!("{}", trace::text(&found));
    }
    Ok(if found.verdict.state == "stale" {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// How long `run` may take to stop after SIGTERM or SIGINT before it exits
/// anyway (the README's shutdown bound).
const SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

/// `run`, or `replay` when `until` is given; `reset`: the slot was just
/// re-created, so every mapped table is invalidated coarsely first.
fn run(path: &Path, until: Option<String>, reset: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(path).map_err(|error| UsageError(error.to_string()))?;
    let mappings = match mapping::load_dir(&config.mappings.dir, config.mappings.limits) {
        Ok(mappings) => Arc::new(mappings),
        Err(diagnostics) => {
            for diagnostic in &diagnostics {
                eprintln!("{diagnostic}");
            }
            bail!(UsageError(format!(
                "{} problem(s) in the mappings; see `evictd check`",
                diagnostics.len()
            )));
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let until = match until.as_deref() {
            None => None,
            Some("now") => {
                let url = config
                    .postgres
                    .url
                    .as_ref()
                    .ok_or_else(|| UsageError("postgres.url is not set".into()))?;
                let control = Control::database(url).await?;
                Some(control.current_wal_insert_lsn().await?)
            }
            Some(text) => Some(Lsn::parse(text).ok_or_else(|| {
                UsageError(format!(
                    "--until-lsn: `{text}` is not an LSN like 0/16B3748"
                ))
            })?),
        };
        // `replay` learns it reached a position past the last commit from a
        // keepalive, asked for with each status update: ask often, so that
        // it ends promptly rather than at the next whole second.
        let options = Options {
            until,
            status_interval: match until {
                Some(_) => std::time::Duration::from_millis(50),
                None => Options::default().status_interval,
            },
            reset,
        };
        // `run` serves the admin endpoint; `replay` is a one-shot tool.
        let listener = match until {
            None => {
                // The recorder must exist before the pipeline records anything.
                evictd::internal::telemetry::recorder();
                tokio::spawn(evictd::internal::telemetry::upkeep());
                let listener = tokio::net::TcpListener::bind(config.admin.listen)
                    .await
                    .map_err(|e| {
                        UsageError(format!("admin.listen {}: {e}", config.admin.listen))
                    })?;
                Some(listener)
            }
            Some(_) => None,
        };
        let running = evictd::service::Service::start(&config, mappings, options, listener)?.running;
        // SIGHUP: read, check and apply the mapping files now.
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let reload = running.reload_handle();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the mappings");
                reload.reload();
            }
        });
        let stop = async {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            }
            Ok::<_, std::io::Error>(())
        };
        let mut acked = running.acked.clone();
        let mut source = running.source.clone();
        let mut signalled = false;
        let (finished, finish) = tokio::sync::oneshot::channel::<bool>();
        let reporter = until.map(|until| {
            tokio::spawn(replay_progress(running.progress.clone(), until, finish))
        });
        tokio::select! {
            signal = stop => {
                signal?;
                signalled = true;
                running.stop();
            }
            // replay: the pipeline ends by itself once `until` is acknowledged.
            _ = acked.wait_for(|acked| until.is_some_and(|until| *acked >= until)), if until.is_some() => {}
            // A pipeline that ends by itself failed: the process must end
            // too, so that a supervisor restarts it and alerts fire.
            _ = source.wait_for(|state| *state == SourceState::Ended) => {}
        }
        let ended = if signalled {
            // Whatever the pipeline is waiting on, a signal ends the process
            // within the bound; what was not acknowledged is read again.
            match tokio::time::timeout(SHUTDOWN_BOUND, running.wait()).await {
                Ok(ended) => ended,
                Err(_) => {
                    tracing::error!(
                        bound = ?SHUTDOWN_BOUND,
                        "the pipeline did not stop within the shutdown bound: exiting; what was not acknowledged is read again on the next start"
                    );
                    return Ok(ExitCode::from(1));
                }
            }
        } else {
            running.wait().await
        };
        if let Some(reporter) = reporter {
            let _ = finished.send(ended.is_ok() && !signalled);
            let _ = reporter.await;
        }
        match ended {
            Ok(ended) if signalled || until.is_some() => {
                tracing::info!(?ended, "evictd stopped");
                Ok(ExitCode::SUCCESS)
            }
            Ok(ended) => {
                tracing::error!(?ended, "the pipeline ended without being asked to: exiting");
                Ok(ExitCode::from(1))
            }
            // Logged at ERROR by the pipeline when it happened.
            Err(error) => Err(error.into()),
        }
    });
    // Blocking work still running (a file read on a hung file system) must
    // not hold the exit past the bound.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

/// `replay`'s progress: on a terminal, a line on stderr rewritten twice a
/// second (position, rate, what is left); when it is done, one summary
/// line on stdout (`finish` says whether it completed).
async fn replay_progress(
    progress: tokio::sync::watch::Receiver<evictd::pipeline::Progress>,
    until: Lsn,
    mut finish: tokio::sync::oneshot::Receiver<bool>,
) {
    use std::io::{IsTerminal as _, Write as _};
    let terminal = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let mut from: Option<Lsn> = None;
    let snapshot = |from: &mut Option<Lsn>| {
        let now = progress.borrow().clone();
        let at = now.flush_lsn;
        if from.is_none() && at.0 > 0 {
            *from = Some(at);
        }
        evictd::internal::operator::ReplayProgress {
            from: from.unwrap_or(at),
            until,
            at,
            changes: now.changes,
            elapsed: started.elapsed(),
        }
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    let completed = loop {
        tokio::select! {
            completed = &mut finish => break completed.unwrap_or(false),
            _ = tick.tick() => {
                let now = snapshot(&mut from);
                if terminal && now.at.0 > 0 {
                    eprint!("\r\x1b[2K{}", now.line());
                    let _ = std::io::stderr().flush();
                }
            }
        }
    };
    if terminal {
        eprint!("\r\x1b[2K");
    }
    if completed {
        println!("{}", snapshot(&mut from).summary());
    }
}

struct CheckArgs {
    json: bool,
    config: Option<PathBuf>,
    mappings: Option<PathBuf>,
    offline: bool,
    database_url: Option<String>,
    publication: Option<String>,
}

/// A warning (not a problem) per `prefixes` entry: each change walks the
/// whole keyspace of every master.
fn warn_about_prefixes(mappings: &Mappings, warnings: &mut Vec<String>) {
    for mapping in mappings.tables() {
        for rule in &mapping.prefixes {
            warnings.push(format!(
                "{}: warning: prefix `{}` deletes by SCAN, which walks every key of every master for each change; on a large keyspace prefer `tags` or `versions`",
                mappings.origin(rule.origin).location,
                rule.template.source()
            ));
        }
    }
}

/// A warning per rule whose own `changed` names a column the entry's
/// `changed` leaves out: the entry skips an update of that column alone,
/// so the rule never fires for it.
fn warn_about_narrowed_changed(mappings: &Mappings, warnings: &mut Vec<String>) {
    for mapping in mappings.tables() {
        let Some(entry) = &mapping.changed else {
            continue;
        };
        let rules = mapping
            .keys
            .iter()
            .map(|rule| ("key", rule))
            .chain(mapping.tags.iter().map(|rule| ("tag", rule)))
            .chain(mapping.versions.iter().map(|rule| ("namespace", rule)))
            .chain(mapping.prefixes.iter().map(|rule| ("prefix", rule)))
            .chain(
                mapping
                    .surrogate_keys
                    .iter()
                    .map(|rule| ("surrogate key", rule)),
            );
        for (kind, rule) in rules {
            let Some(own) = &rule.changed else {
                continue;
            };
            for column in own.iter().filter(|column| !entry.contains(column)) {
                warnings.push(format!(
                    "{}: warning: {kind} `{}` names changed column {column}, which the entry's changed leaves out: the entry skips an update of {column} alone, so this {kind} never fires for it; add {column} to the entry's `changed`",
                    mappings.origin(rule.origin).location,
                    rule.template.source()
                ));
            }
        }
    }
}

/// Warns when invalidations from SQL are on but not authenticated, and
/// when a message secret cannot be read.
fn warn_about_sql_messages(config: &Config, warnings: &mut Vec<String>) {
    let mappings = &config.mappings;
    if !mappings.sql_messages {
        return;
    }
    if mappings.sql_messages_secrets.is_empty() {
        warnings.push(format!("warning: {}", evictd::mapping::UNSIGNED_WARNING));
    }
    for secret in &mappings.sql_messages_secrets {
        if let Err(reason) = secret.read() {
            warnings.push(format!(
                "warning: mappings.sql_messages_secret: {reason}: evictd run will refuse to start"
            ));
        }
    }
}

fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.config {
        Some(path) => Some(Config::load(path).map_err(|error| UsageError(error.to_string()))?),
        None => None,
    };
    let dir = match (&args.mappings, &config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(config)) => config.mappings.dir.clone(),
        (None, None) => bail!(UsageError("give --config FILE or --mappings DIR".into())),
    };
    let limits = config
        .as_ref()
        .map_or_else(Limits::default, |c| c.mappings.limits);
    let mappings = match mapping::load_dir(&dir, limits) {
        Ok(mappings) => mappings,
        Err(diagnostics) if args.json => return Ok(check_json(None, false, &diagnostics, &[])),
        Err(diagnostics) => return Ok(report(&diagnostics)),
    };
    let url = match (&args.database_url, &config) {
        (Some(url), _) => {
            Some(SecretUrl::parse(url).map_err(|e| UsageError(format!("--database-url: {e}")))?)
        }
        (None, Some(config)) => config.postgres.url.clone(),
        (None, None) => None,
    };
    let summary = format!(
        "{} table(s) mapped in {} file(s)",
        mappings.tables().count(),
        mappings.file_count()
    );
    let mut warnings = Vec::new();
    warn_about_prefixes(&mappings, &mut warnings);
    warn_about_narrowed_changed(&mappings, &mut warnings);
    if let Some(config) = &config {
        warn_about_sql_messages(config, &mut warnings);
        if !args.offline {
            warn_about_kafka_topics(config, &mappings, &mut warnings);
        }
    }
    if !args.json {
        for warning in &warnings {
            eprintln!("{warning}");
        }
    }
    let url = match url {
        Some(url) if !args.offline => url,
        _ => {
            if !args.offline {
                eprintln!("note: live checks skipped: no database URL (give --config or --database-url, or --offline)");
            }
            if args.json {
                return Ok(check_json(Some(&mappings), false, &[], &warnings));
            }
            println!("ok: {summary} (offline checks)");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let postgres = config.map(|c| c.postgres);
    let publication = args
        .publication
        .or_else(|| postgres.as_ref().map(|p| p.publication.clone()))
        .unwrap_or_else(|| "evictd".into());
    let (slot, failover_slot) = postgres.as_ref().map_or(("evictd".to_owned(), false), |p| {
        (p.slot.clone(), p.failover_slot)
    });
    let (diagnostics, live_warnings) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(live_check(
            &mappings,
            &url,
            &publication,
            &slot,
            failover_slot,
        ))?;
    if !args.json {
        for warning in &live_warnings {
            eprintln!("{warning}");
        }
    }
    warnings.extend(live_warnings);
    if args.json {
        return Ok(check_json(Some(&mappings), true, &diagnostics, &warnings));
    }
    if !diagnostics.is_empty() {
        return Ok(report(&diagnostics));
    }
    println!("ok: {summary}, checked against the database");
    Ok(ExitCode::SUCCESS)
}

/// `check --format json`: one object, and exit 2 when there are problems.
/// `mappings` is `None` when they did not load.
/// With the Kafka source: mapped tables no subscribed topic carries, and
/// topics a pattern matches that no mapping covers (see
/// `evictd::internal::topic_coverage`).
fn warn_about_kafka_topics(config: &Config, mappings: &Mappings, warnings: &mut Vec<String>) {
    let Some(kafka) = config
        .kafka
        .as_ref()
        .filter(|_| config.source == evictd::config::SourceKind::Kafka)
    else {
        return;
    };
    #[cfg(feature = "kafka")]
    match evictd::internal::topic_coverage(kafka, mappings) {
        Ok(found) => warnings.extend(found),
        Err(error) => warnings.push(format!(
            "kafka: cannot check the topics against the broker: {error}"
        )),
    }
    #[cfg(not(feature = "kafka"))]
    {
        let _ = (kafka, mappings);
        warnings.push("kafka: this evictd was built without the `kafka` feature".into());
    }
}

fn check_json(
    mappings: Option<&Mappings>,
    live: bool,
    diagnostics: &[Diagnostic],
    warnings: &[String],
) -> ExitCode {
    let problems: Vec<serde_json::Value> = diagnostics
        .iter()
        .map(|diagnostic| {
            let location = diagnostic.location.as_ref();
            serde_json::json!({
                "file": location.map(|l| l.file.display().to_string()),
                "line": location.map(|l| l.line),
                "column": location.map(|l| l.column),
                "message": diagnostic.message,
                "help": diagnostic.help,
            })
        })
        .collect();
    let report = serde_json::json!({
        "ok": diagnostics.is_empty(),
        "tables": mappings.map(|m| m.tables().map(|t| t.table.to_string()).collect::<Vec<_>>()),
        "files": mappings.map(Mappings::file_count),
        "live": live,
        "problems": problems,
        "warnings": warnings,
    });
    println!("{report}");
    if diagnostics.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

/// The live checks' problems (the role's right to stream among them, and
/// what decoding on a standby or a failover slot needs), and warnings about
/// the server's settings that can invalidate the slot.
async fn live_check(
    mappings: &Mappings,
    url: &SecretUrl,
    publication: &str,
    slot: &str,
    failover_slot: bool,
) -> anyhow::Result<(Vec<Diagnostic>, Vec<String>)> {
    let client = evictd::internal::catalog::connect(url).await?;
    let mut diagnostics = evictd::internal::catalog::check(mappings, &client, publication).await?;
    diagnostics.extend(evictd::internal::catalog::replication_privilege(&client).await?);
    let topology = evictd::internal::Topology::read(&client, slot).await?;
    diagnostics.extend(
        topology
            .findings(slot, failover_slot)
            .into_iter()
            .map(|finding| {
                Diagnostic::general(format!("postgres: {}", finding.message)).help(finding.help)
            }),
    );
    let warnings = evictd::internal::catalog::slot_limit_warnings(&client).await?;
    Ok((diagnostics, warnings))
}

/// Prints every problem and returns exit code 2.
fn report(diagnostics: &[Diagnostic]) -> ExitCode {
    for diagnostic in diagnostics {
        println!("{diagnostic}");
    }
    let count = diagnostics.len();
    println!("{count} problem{} found", if count == 1 { "" } else { "s" });
    ExitCode::from(2)
}

/// What `explain` was told of the change's rows.
struct Rows<'a> {
    old: Option<&'a str>,
    new: Option<&'a str>,
    /// The config whose database gives the column types.
    config: Option<&'a Path>,
    unchanged: &'a [String],
    /// `full` or `default`, if given.
    identity: Option<&'a str>,
    /// The key columns, for `default`.
    key: &'a [String],
}

/// `--table`: a table the mappings name (`orders` or `public.orders`),
/// or a usage error that names the nearest one.
fn mapped_table(mappings: &Mappings, table: &str) -> Result<TableName, UsageError> {
    let table = TableName::parse(table).map_err(|e| UsageError(format!("--table: {e}")))?;
    if mappings.table(&table).is_some() {
        return Ok(table);
    }
    let tables: Vec<String> = mappings.tables().map(|t| t.table.to_string()).collect();
    let names: Vec<&str> = tables.iter().map(String::as_str).collect();
    let help = match mapping::did_you_mean(&table.to_string(), &names) {
        Some(near) => format!("did you mean {near}?"),
        None => format!("mapped: {}", tables.join(", ")),
    };
    Err(UsageError(format!(
        "--table: {table} is not mapped; {help}"
    )))
}

fn explain(dir: &Path, table: &str, op: &str, rows: Rows<'_>) -> anyhow::Result<ExitCode> {
    let mappings = match mapping::load_dir(dir, Limits::default()) {
        Ok(mappings) => mappings,
        Err(diagnostics) => return Ok(report(&diagnostics)),
    };
    let table = mapped_table(&mappings, table)?;
    let op = Op::parse(op).ok_or_else(|| {
        UsageError(format!(
            "--op: unknown op `{op}`; use insert, update, delete or truncate"
        ))
    })?;
    let types = column_types(rows.config, &mappings, &table)?;
    let mut notes = Vec::new();
    let old = rows
        .old
        .map(|json| row_from_json("--old", json, &[], &types, &mut notes))
        .transpose()?;
    let new = rows
        .new
        .map(|json| row_from_json("--new", json, rows.unchanged, &types, &mut notes))
        .transpose()?;
    for note in notes {
        eprintln!("note: {note}");
    }
    if matches!(op, Op::Insert | Op::Update) && new.is_none() {
        bail!(UsageError(format!("--op {op} needs --new")));
    }
    let old = match (rows.identity, op) {
        (_, Op::Insert | Op::Truncate) => old,
        (Some("default"), _) => {
            if rows.key.is_empty() {
                bail!(UsageError(
                    "--identity default needs --key COLUMN,...: the table's primary key".into()
                ));
            }
            Some(default_identity_old(op, old, new.as_ref(), rows.key)?)
        }
        (_, Op::Delete) if old.is_none() => {
            bail!(UsageError("--op delete needs --old".into()))
        }
        (_, Op::Update) if old.is_none() => bail!(UsageError(
            "--op update needs --old (the old row, as REPLICA IDENTITY FULL sends it), or --identity default --key COLUMN,... to see what an update without one does"
                .into()
        )),
        _ => old,
    };
    let change = RowChange {
        table: Arc::new(table),
        op,
        old,
        new,
    };
    let explained = explain::explain(&mappings, &change, rows.identity == Some("default"));
    for note in &explained.notes {
        eprintln!("note: {note}");
    }
    for line in &explained.lines {
        println!("{}", line.text());
    }
    Ok(ExitCode::SUCCESS)
}

/// The old row the pipeline sees under REPLICA IDENTITY DEFAULT with
/// `key`: the old key columns when the source sends them (a delete, an
/// update that changed the key), else the new row's key columns (an
/// update that kept its key sends no old row). Nothing else is known.
fn default_identity_old(
    op: Op,
    old: Option<Row>,
    new: Option<&Row>,
    key: &[String],
) -> anyhow::Result<Row> {
    let key_of = |row: &Row| {
        Row::from_pairs(
            key.iter()
                .map(|column| (column.as_str(), row.get(column).clone())),
        )
    };
    match (op, old, new) {
        (_, Some(old), _) => {
            eprintln!(
                "note: under REPLICA IDENTITY DEFAULT the old row holds only the key ({})",
                key.join(", ")
            );
            Ok(key_of(&old))
        }
        (Op::Update, None, Some(new)) => {
            eprintln!(
                "note: under REPLICA IDENTITY DEFAULT an update that keeps its key sends no old row: the old row is the new row's key ({})",
                key.join(", ")
            );
            Ok(key_of(new))
        }
        _ => bail!(UsageError(format!("--op {op} needs --old"))),
    }
}

/// What `explain` knows of the table's column types: the database's
/// (with `--config`), else offline what the conditions say.
fn column_types(
    config: Option<&Path>,
    mappings: &Mappings,
    table: &TableName,
) -> anyhow::Result<ColumnTypes> {
    let Some(path) = config else {
        return Ok(ColumnTypes::offline(mappings, table));
    };
    let config = Config::load(path).map_err(|error| UsageError(error.to_string()))?;
    let url = config
        .postgres
        .url
        .ok_or_else(|| UsageError("--config: postgres.url is not set".into()))?;
    let categories = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let client = evictd::internal::catalog::connect(&url).await?;
            evictd::internal::catalog::column_categories(&client, table).await
        })?;
    if categories.is_empty() {
        bail!(UsageError(format!(
            "--config: {table} is not in the database"
        )));
    }
    Ok(ColumnTypes::Database(categories))
}

/// A row from `--old`/`--new`; a malformed one is a usage error.
fn row_from_json(
    flag: &str,
    json: &str,
    unchanged: &[String],
    types: &ColumnTypes,
    notes: &mut Vec<String>,
) -> anyhow::Result<Row> {
    Ok(explain::row_from_json(flag, json, unchanged, types, notes).map_err(UsageError)?)
}
