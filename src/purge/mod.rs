//! CDN purges by surrogate key: the third tier of the cache, kept exact
//! from the same mappings (`surrogate_keys = [...]`) and the same batches.
//!
//! The apply task hands each plan's [`Purges`] here once Redis applied the
//! plan (a CDN that refills a page at once must not read an L2 that still
//! holds the old value), and publishes the plan's progress only when every
//! target accepted them: a position is acknowledged only once every cache
//! tier dropped what it invalidates. A target marked `best_effort` instead
//! gives up on a request after `retries` attempts (counted and logged), so
//! that a CDN outage does not hold the stream back.
//!
//! Each target is batched (at most `max_keys` per request, the provider's
//! limit), paced (`rate` requests per second), and retried with backoff,
//! honouring `Retry-After` on 429. Targets are purged concurrently.
//!
//! | kind | request |
//! | --- | --- |
//! | `varnish` | `PURGE <url>` with `xkey-purge: k1 k2 ...` (`xkey-softpurge` when `soft`); everything: `X-Evictd-Purge-All: 1` (the VCL in `deploy/varnish/evictd.vcl` bans all) |
//! | `fastly` | `POST /service/<id>/purge`, `{"surrogate_keys": [...]}`, `Fastly-Key`, `Fastly-Soft-Purge: 1` when `soft`; everything: `POST /service/<id>/purge_all` |
//! | `cloudflare` | `POST /zones/<id>/purge_cache`, `{"tags": [...]}` or `{"purge_everything": true}`, `Authorization: Bearer` |
//! | `webhook` | `POST <url>`, `{"surrogate_keys": [...], "purge_all": false}`, signed: `X-Evictd-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`, `X-Evictd-Timestamp` |

pub mod http;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::apply::Backoff;
use crate::config::{PurgeKind, PurgeTarget};
use crate::error::{Error, ErrorKind, Policy};
use crate::plan::Purges;
use crate::telemetry;

/// The longest `Retry-After` honoured as given.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Every configured target.
pub struct Purger {
    targets: Vec<Target>,
}

struct Target {
    config: PurgeTarget,
    base: url::Url,
    refusals: Refusals,
    /// When the next request may go (the `rate` pacing).
    next_slot: Instant,
}

/// One request's worth of purging.
#[derive(Clone, Copy, Debug)]
enum Batch<'k> {
    Keys(&'k [&'k str]),
    All,
}

/// A request that did not succeed.
struct Failure {
    /// Its kind says what to do ([`Error::policy`]).
    error: Error,
    /// The target said when to come back (429 `Retry-After`).
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(kind: ErrorKind, reason: impl Into<String>) -> Failure {
        Failure {
            error: Error::new(kind, reason),
            retry_after: None,
        }
    }
}

/// The targets that refuse purges until someone changes something
/// ([`Policy::WaitForOperator`]), by name, with the reason and a hint:
/// what `/readyz` reports.
pub type Refusals = watch::Sender<BTreeMap<String, String>>;

impl Purger {
    /// The purger of `targets`, `None` when there are none; a target that
    /// refuses purges until someone acts is reported on `refusals`.
    pub fn new(targets: &[PurgeTarget], refusals: &Refusals) -> Result<Option<Purger>, Error> {
        if targets.is_empty() {
            return Ok(None);
        }
        let targets = targets
            .iter()
            .map(|config| {
                let base = url::Url::parse(&config.url).map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "purge target {}: `{}` is not a URL ({e})",
                            config.name, config.url
                        ),
                    )
                })?;
                for counter in [
                    telemetry::PURGES,
                    telemetry::PURGE_KEYS,
                    telemetry::PURGE_FAILURES,
                    telemetry::PURGE_DROPPED,
                ] {
                    metrics::counter!(counter, "target" => config.name.clone()).increment(0);
                }
                Ok(Target {
                    config: config.clone(),
                    base,
                    refusals: refusals.clone(),
                    next_slot: Instant::now(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Some(Purger { targets }))
    }

    /// Purges `purges` at every target, concurrently. `false` when asked to
    /// stop before every target that must accept them did (the plan is
    /// then not acknowledged, and read again).
    pub async fn purge(&mut self, purges: &Purges, stop: &watch::Receiver<bool>) -> bool {
        if purges.is_empty() {
            return true;
        }
        let keys: Vec<&str> = purges.keys.iter().map(|(key, _)| key.as_str()).collect();
        let all = purges.all.is_some();
        let results = futures_util::future::join_all(
            self.targets
                .iter_mut()
                .map(|target| target.purge(&keys, all, stop.clone())),
        )
        .await;
        results.into_iter().all(|done| done)
    }
}

impl Target {
    fn name(&self) -> String {
        self.config.name.clone()
    }

    /// Every batch of `keys` (or everything), each retried until accepted;
    /// `false` if stopped first.
    async fn purge(&mut self, keys: &[&str], all: bool, mut stop: watch::Receiver<bool>) -> bool {
        let batches: Vec<Batch<'_>> = if all {
            vec![Batch::All]
        } else {
            keys.chunks(self.config.max_keys).map(Batch::Keys).collect()
        };
        let mut waiting = if all { 1 } else { keys.len() };
        let queue = metrics::gauge!(telemetry::PURGE_QUEUE_KEYS, "target" => self.name());
        #[allow(clippy::cast_precision_loss)]
        queue.set(waiting as f64);
        for batch in batches {
            let count = match batch {
                Batch::Keys(keys) => keys.len(),
                Batch::All => 1,
            };
            if !self.deliver(batch, &mut stop).await {
                return false;
            }
            waiting -= count;
            #[allow(clippy::cast_precision_loss)]
            queue.set(waiting as f64);
        }
        true
    }

    /// One batch, retried with backoff until it is accepted (or, for a
    /// best-effort target, until `retries` attempts failed).
    async fn deliver(&mut self, batch: Batch<'_>, stop: &mut watch::Receiver<bool>) -> bool {
        let name = self.name();
        let mut backoff = Backoff::default();
        let mut attempts = 0;
        loop {
            self.pace().await;
            attempts += 1;
            let started = Instant::now();
            let failure = match self.send(batch).await {
                Ok(()) => {
                    self.refusals
                        .send_if_modified(|refusals| refusals.remove(&name).is_some());
                    metrics::histogram!(telemetry::PURGE_DURATION, "target" => name.clone())
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!(telemetry::PURGES, "target" => name.clone()).increment(1);
                    if let Batch::Keys(keys) = batch {
                        metrics::counter!(telemetry::PURGE_KEYS, "target" => name)
                            .increment(keys.len() as u64);
                    }
                    return true;
                }
                Err(failure) => failure,
            };
            metrics::counter!(telemetry::PURGE_FAILURES, "target" => name.clone()).increment(1);
            if self.config.best_effort && attempts >= self.config.retries {
                let keys = match batch {
                    Batch::Keys(keys) => keys.len(),
                    Batch::All => 0,
                };
                metrics::counter!(telemetry::PURGE_DROPPED, "target" => name.clone()).increment(1);
                tracing::warn!(target_name = %name, attempts, keys, reason = %failure.error, "purge dropped after its retries (best_effort target): the CDN may serve these pages until they expire");
                return true;
            }
            let delay = failure
                .retry_after
                .map_or_else(|| backoff.next_delay(), |after| after.min(MAX_RETRY_AFTER));
            let reason = &failure.error;
            match reason.policy() {
                Policy::Retry => {
                    tracing::warn!(target_name = %name, %reason, retry_in = ?delay, "purge failed; retrying");
                }
                Policy::WaitForOperator | Policy::Stop => {
                    let hint = reason.help().unwrap_or_default();
                    tracing::error!(target_name = %name, %reason, hint, retry_in = ?delay, "purge refused; retrying (acknowledgement waits for it)");
                    let mut short = reason.to_string();
                    if short.len() > 120 {
                        let mut end = 120;
                        while !short.is_char_boundary(end) {
                            end -= 1;
                        }
                        short.truncate(end);
                        short.push_str("...");
                    }
                    let refusal = format!("target {name} refuses purges ({short}): {hint}");
                    self.refusals.send_if_modified(|refusals| {
                        refusals.insert(name.clone(), refusal).is_none()
                    });
                }
            }
            tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => return false,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Waits for the next request slot under `rate`.
    async fn pace(&mut self) {
        let now = Instant::now();
        if self.next_slot > now {
            tokio::time::sleep_until(self.next_slot.into()).await;
        }
        let interval = Duration::from_secs_f64(1.0 / self.config.rate);
        self.next_slot = self.next_slot.max(now) + interval;
    }

    async fn send(&self, batch: Batch<'_>) -> Result<(), Failure> {
        let request = self.request(batch)?;
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let response = http::send(
            &request.url,
            request.method,
            &request.headers,
            request.body.as_bytes(),
            timeout,
        )
        .await
        .map_err(|reason| Failure::new(ErrorKind::Purge { status: None }, reason))?;
        judge(self.config.kind, &response)
    }

    fn request(&self, batch: Batch<'_>) -> Result<Request, Failure> {
        let config = &self.config;
        let credential = |secret: &Option<crate::config::Secret>| {
            secret
                .as_ref()
                .ok_or_else(|| "no credential configured".to_owned())
                .and_then(crate::config::Secret::read)
                .map_err(|reason| Failure::new(ErrorKind::PurgeRefused, reason))
        };
        let endpoint = |path: &str| {
            let base = self.base.as_str().trim_end_matches('/');
            url::Url::parse(&format!("{base}{path}"))
                .map_err(|e| Failure::new(ErrorKind::PurgeRefused, format!("bad URL: {e}")))
        };
        let json = ("Content-Type", "application/json".to_owned());
        Ok(match (config.kind, batch) {
            (PurgeKind::Varnish, Batch::Keys(keys)) => {
                let header = if config.soft {
                    "xkey-softpurge"
                } else {
                    "xkey-purge"
                };
                Request::new(
                    self.base.clone(),
                    "PURGE",
                    vec![(header, keys.join(" "))],
                    String::new(),
                )
            }
            (PurgeKind::Varnish, Batch::All) => Request::new(
                self.base.clone(),
                "PURGE",
                vec![("X-Evictd-Purge-All", "1".to_owned())],
                String::new(),
            ),
            (PurgeKind::Fastly, batch) => {
                let service = config.service_id.as_deref().unwrap_or_default();
                let mut headers = vec![
                    ("Fastly-Key", credential(&config.token)?),
                    ("Accept", "application/json".to_owned()),
                ];
                if config.soft {
                    headers.push(("Fastly-Soft-Purge", "1".to_owned()));
                }
                match batch {
                    Batch::Keys(keys) => {
                        headers.push(json);
                        let body = serde_json::json!({ "surrogate_keys": keys }).to_string();
                        Request::new(
                            endpoint(&format!("/service/{service}/purge"))?,
                            "POST",
                            headers,
                            body,
                        )
                    }
                    Batch::All => Request::new(
                        endpoint(&format!("/service/{service}/purge_all"))?,
                        "POST",
                        headers,
                        String::new(),
                    ),
                }
            }
            (PurgeKind::Cloudflare, batch) => {
                let zone = config.zone_id.as_deref().unwrap_or_default();
                let token = credential(&config.token)?;
                let body = match batch {
                    Batch::Keys(keys) => serde_json::json!({ "tags": keys }),
                    Batch::All => serde_json::json!({ "purge_everything": true }),
                };
                Request::new(
                    endpoint(&format!("/zones/{zone}/purge_cache"))?,
                    "POST",
                    vec![("Authorization", format!("Bearer {token}")), json],
                    body.to_string(),
                )
            }
            (PurgeKind::Webhook, batch) => {
                let secret = credential(&config.secret)?;
                let body = match batch {
                    Batch::Keys(keys) => {
                        serde_json::json!({ "surrogate_keys": keys, "purge_all": false })
                    }
                    Batch::All => serde_json::json!({ "surrogate_keys": [], "purge_all": true }),
                }
                .to_string();
                let timestamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs()
                    .to_string();
                let signature = sign(secret.as_bytes(), &timestamp, &body);
                Request::new(
                    self.base.clone(),
                    "POST",
                    vec![
                        json,
                        ("X-Evictd-Timestamp", timestamp),
                        ("X-Evictd-Signature", format!("sha256={signature}")),
                    ],
                    body,
                )
            }
        })
    }
}

struct Request {
    url: url::Url,
    method: &'static str,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Request {
    fn new(
        url: url::Url,
        method: &'static str,
        headers: Vec<(&'static str, String)>,
        body: String,
    ) -> Request {
        Request {
            url,
            method,
            headers,
            body,
        }
    }
}

/// Whether the target accepted a request, from its answer.
fn judge(kind: PurgeKind, response: &http::Response) -> Result<(), Failure> {
    let status = response.status;
    if (200..300).contains(&status) {
        if kind == PurgeKind::Cloudflare {
            // Cloudflare answers with `success` in the body.
            let success = serde_json::from_slice::<serde_json::Value>(&response.body)
                .ok()
                .and_then(|body| body.get("success").and_then(serde_json::Value::as_bool));
            if success == Some(false) {
                return Err(Failure::new(
                    ErrorKind::PurgeRefused,
                    format!(
                        "Cloudflare answered success = false: {}",
                        response.body_text()
                    ),
                ));
            }
        }
        return Ok(());
    }
    let retry_after = response
        .header("Retry-After")
        .and_then(|after| after.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Err(Failure {
        error: Error::new(
            ErrorKind::Purge {
                status: Some(status),
            },
            format!("HTTP {status}: {}", response.body_text()),
        ),
        retry_after,
    })
}

/// Lowercase hex of HMAC-SHA256 over `<timestamp>.<body>` with `secret`:
/// what a webhook receiver computes to verify a request.
pub fn sign(secret: &[u8], timestamp: &str, body: &str) -> String {
    crate::mapping::message::hmac_sha256_hex(secret, &[timestamp.as_bytes(), b".", body.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_signatures_are_hmac_sha256_of_timestamp_dot_body() {
        // As Python's hmac.new(b"secret", b"1700000000." + body, sha256).
        assert_eq!(
            sign(
                b"secret",
                "1700000000",
                r#"{"surrogate_keys":["product-1"],"purge_all":false}"#
            ),
            "9fceebe5694acb3e4d15da74d26b2bdb2f63276c37bc7332df907bf25c9c8c04"
        );
    }
}
