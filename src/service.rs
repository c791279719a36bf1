//! `evictd run` as a service: the pipeline, its admin endpoint and warming
//! on start. The binary adds the command line, signals and exit codes; the
//! testkit starts the same service.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::admin::{AdminState, RedisProbe};
use crate::config::Config;
use crate::console::Console;
use crate::error::{Error, ErrorKind};
use crate::mapping::Mappings;
use crate::pipeline::{Options, Running, SourceState};

/// A started service.
pub struct Service {
    pub running: Running,
    /// Where the admin endpoint listens, when it was given a listener.
    pub admin: Option<SocketAddr>,
}

impl Service {
    /// Starts the pipeline; serves the admin endpoint on `admin` when
    /// given; warms the caches once streaming when `warm.on_start` (not
    /// for a bounded `replay`, `options.until`). Call it inside a tokio
    /// runtime: it spawns the service's tasks there.
    pub fn start(
        config: &Config,
        mappings: Arc<Mappings>,
        options: Options,
        admin: Option<TcpListener>,
    ) -> Result<Service, Error> {
        let until = options.until;
        let running = crate::pipeline::start(config, mappings, options)?;
        let admin = match admin {
            Some(listener) => {
                let address = listener.local_addr().map_err(|e| {
                    Error::with_source(ErrorKind::Config, "admin.listen: no local address", e)
                })?;
                tokio::spawn(crate::admin::serve(
                    listener,
                    admin_state(config, &running)?,
                ));
                let console = if config.admin.console { " /ui" } else { "" };
                tracing::info!(%address, "admin endpoint: /metrics /healthz /readyz{console}");
                Some(address)
            }
            None => None,
        };
        if config.warm.on_start && until.is_none() {
            tokio::spawn(warm_on_start(config.clone(), &running));
        }
        Ok(Service { running, admin })
    }
}

/// What the admin endpoint reports on for `running`: every state that
/// makes `/readyz` fail, and a fresh PING per probe.
pub fn admin_state(config: &Config, running: &Running) -> Result<AdminState, Error> {
    let console = match &running.console {
        Some(tap) => Some(Arc::new(Console::start(
            config,
            tap.clone(),
            running.progress.clone(),
            running.lag.clone(),
            running.mappings.clone(),
        )?)),
        None => None,
    };
    Ok(AdminState {
        source: running.source.clone(),
        redis: running.redis.clone(),
        visibility: Some(running.visibility.clone()),
        replicas: Some(running.replicas.clone()),
        purge: Some(running.purge_refusals.clone()),
        schema: running.schema.clone(),
        kind: config.source,
        probe: Some(RedisProbe::new(&config.redis)?),
        console,
    })
}

/// Warms every refresh key once the source streams: from then on every
/// change is invalidated behind the fills, which never overwrite a value.
fn warm_on_start(
    config: Config,
    running: &Running,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mappings = running.mappings.clone();
    let mut streaming = running.source.clone();
    async move {
        if streaming
            .wait_for(|state| *state == SourceState::Streaming)
            .await
            .is_err()
        {
            return;
        }
        let mappings = mappings.borrow().clone();
        let options = crate::warm::WarmOptions {
            table: None,
            limit: None,
            rate: config.warm.rate,
            progress: false,
        };
        match crate::warm::warm(&config, &mappings, &options).await {
            Ok(summary) => {
                tracing::info!(summary = %summary.text(), "warmed the caches on start");
            }
            Err(error) => {
                tracing::error!(%error, "warming on start failed; the caches fill as they are read");
            }
        }
    }
}
