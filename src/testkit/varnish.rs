//! A throwaway `varnishd` with the VCL evictd ships
//! (`deploy/varnish/evictd.vcl`, the xkey vmod) in front of an application
//! on a given port: for tests of CDN purges by surrogate key.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{free_port, reaper, TestkitError};

/// The VCL, with its backend on port 8080.
const VCL: &str = include_str!("../../deploy/varnish/evictd.vcl");

/// A running throwaway Varnish; stopped on drop, and by the reaper if this
/// process dies first.
pub struct Varnish {
    port: u16,
    child: Child,
    _dir: TempDir,
}

impl Varnish {
    /// Starts `varnishd` (no privilege separation, 32 MB of cache) with the
    /// shipped VCL, its backend the application on `backend_port`.
    pub fn start(backend_port: u16) -> Result<Varnish, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("evictd-varnish-")
            .tempdir()
            .map_err(|e| TestkitError::io("create a temporary directory", e))?;
        reaper::reap_dir(dir.path());
        let vcl_path = dir.path().join("evictd.vcl");
        std::fs::write(
            &vcl_path,
            VCL.replace("\"8080\"", &format!("\"{backend_port}\"")),
        )
        .map_err(|e| TestkitError::io("write the VCL", e))?;
        let port = free_port()?;
        let log = dir.path().join("varnishd.log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| TestkitError::io("create the log", e))?;
        let mut child = Command::new(varnishd())
            .args(["-F", "-j", "none", "-T", "none", "-s", "malloc,32m"])
            .arg("-n")
            .arg(dir.path().join("work"))
            .arg("-a")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-f")
            .arg(&vcl_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                TestkitError::io("start varnishd (install it with scripts/bootstrap)", e)
            })?;
        // The manager's worker shares its process group.
        reaper::reap_group(child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(TestkitError::Start(format!(
                    "varnishd exited with {status}:\n{log}"
                )));
            }
            if Instant::now() > deadline {
                kill_group(&mut child);
                return Err(TestkitError::Start(
                    "varnishd did not listen in 30 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Varnish {
            port,
            child,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Varnish {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Kills the manager and its worker.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    let _ = child.wait();
}

fn varnishd() -> &'static str {
    ["/usr/sbin/varnishd", "/usr/local/sbin/varnishd"]
        .into_iter()
        .find(|candidate| Path::new(candidate).exists())
        .unwrap_or("varnishd")
}
