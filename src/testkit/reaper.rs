//! The reaper: a small shell process that outlives nothing it guards.
//!
//! Each server the testkit starts is registered with one reaper per test
//! process, through a pipe to the reaper's stdin. When the test process ends
//! in any way (normal exit, panic, abort, `kill -9`), the kernel closes the
//! pipe, the reaper reads end-of-file, stops every registered server and
//! removes their directories. Statics are never dropped in Rust, and a
//! killed process runs no destructors, so this is what guarantees that no
//! `postgres` or `redis-server` is left behind after `cargo test`.
//!
//! The reaper runs in its own process group, so a Ctrl-C aimed at the test
//! run does not kill it before it has cleaned up.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

const SCRIPT: &str = r#"
trap '' INT HUP TERM
groups=""; pids=""; dirs=""
while IFS= read -r line; do
  case "$line" in
    group\ *) groups="$groups ${line#group }" ;;
    pid\ *) pids="$pids ${line#pid }" ;;
    dir\ *) dirs="$dirs ${line#dir }" ;;
  esac
done
for p in $pids; do kill -QUIT "$p" 2>/dev/null; done
for g in $groups; do kill -QUIT -- "-$g" 2>/dev/null; done
for i in 1 2 3 4 5 6 7 8 9 10; do
  alive=""
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ -z "$alive" ] && break
  sleep 0.3
done
for p in $pids; do kill -KILL "$p" 2>/dev/null; done
for g in $groups; do kill -KILL -- "-$g" 2>/dev/null; done
for d in $dirs; do rm -rf "$d"; done
"#;

struct Reaper {
    stdin: ChildStdin,
    // Kept so the child is not reported as leaked; never waited on.
    _child: Child,
}

fn reaper() -> &'static Mutex<Reaper> {
    static REAPER: OnceLock<Mutex<Reaper>> = OnceLock::new();
    REAPER.get_or_init(|| {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("the testkit needs `sh` to start its reaper process");
        let stdin = child.stdin.take().expect("piped stdin");
        Mutex::new(Reaper {
            stdin,
            _child: child,
        })
    })
}

fn register(line: &str) {
    let mut reaper = reaper()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // A write only fails when the reaper is gone; nothing left to tell then.
    let _ = writeln!(reaper.stdin, "{line}");
    let _ = reaper.stdin.flush();
}

/// Stop process `pid` (SIGQUIT, then SIGKILL) when this process ends.
pub fn reap_pid(pid: u32) {
    register(&format!("pid {pid}"));
}

/// Stop every process of group `pgid` when this process ends.
pub fn reap_group(pgid: u32) {
    register(&format!("group {pgid}"));
}

/// Remove `dir` when this process ends (after the processes are stopped).
pub fn reap_dir(dir: &Path) {
    register(&format!("dir {}", dir.display()));
}
