//! The application side of evictd: a cache-aside reader over Redis whose
//! fills can never undo an invalidation.
//!
//! [`Cache::get_or_load`] reads the key; on a miss it takes the key's fill
//! right (a lease written into the key itself, so that whatever evictd
//! does to invalidate the key removes it), registers the key in its tag
//! sets, calls the loader, and stores the result only if the key still
//! holds its lease. A fill that read the
//! database before a commit whose invalidation evictd already applied is
//! refused, whichever way evictd invalidated the key (key, tag, pattern,
//! write-through refresh). `docs/PROTOCOL.md` specifies the protocol for
//! other languages.

// The crate README's example compiles as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExample;

mod cache;
mod l1;
mod metrics;
pub mod protocol;

#[cfg(feature = "postgres")]
pub use cache::commit_position;
pub use cache::{Cache, CacheBuilder, Connection, Error, Fill};
pub use l1::{FlushReason, L1Bound, Log};
pub use metrics::Stats;
pub use protocol::Position;
