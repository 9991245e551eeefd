//! A throwaway PostgreSQL cluster for the multi-replica tests: `initdb` into a temp dir, a
//! server on 127.0.0.1 at a free port, stopped (and its files removed) when dropped. Uses
//! Debian's `postgresql-15` (or any `initdb`/`pg_ctl` on PATH); as root it runs them as the
//! `postgres` user, since `initdb` refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A running throwaway cluster.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    /// `postgres://…` URL of its `postgres` database.
    pub url: String,
}

fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("JHAKAAS_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some(p) = versions.pop() {
        return Some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Postgres {
    /// Starts a cluster. Panics with what to install when PostgreSQL is missing.
    pub fn start() -> Postgres {
        let bin = find_bin().expect(
            "PostgreSQL is needed for the multi-replica tests: install `postgresql-15` \
             (Debian) or set JHAKAAS_PG_BIN to a folder holding initdb and pg_ctl",
        );
        // One folder per cluster of this process (a probed port could repeat across tests).
        static CLUSTERS: AtomicU32 = AtomicU32::new(0);
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("jhakaas-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pg dir");
        let root = is_root();
        if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of {} to postgres failed", dir.display());
        }
        let mut pg = Postgres {
            url: String::new(),
            dir,
            bin,
        };
        let data = pg.dir.join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        // A free port can be taken by another test's cluster between our probe and the
        // server's bind: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -h 127.0.0.1 -k {} -c fsync=off -c max_connections=200",
                pg.dir.display()
            );
            let log = pg.dir.join("server.log");
            let args = [
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-o",
                &opts,
                "-w",
                "start",
            ];
            match pg.try_run("pg_ctl", &args) {
                Ok(()) => {
                    pg.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                    return pg;
                }
                Err(e) => last_error = e,
            }
        }
        panic!("pg_ctl start failed five times: {last_error}");
    }

    fn run(&self, tool: &str, args: &[&str]) {
        if let Err(e) = self.try_run(tool, args) {
            panic!("{e}");
        }
    }

    fn try_run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let out = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .current_dir(&self.dir)
                .output()
        } else {
            Command::new(&exe)
                .args(args)
                .current_dir(&self.dir)
                .output()
        }
        .map_err(|e| format!("running {}: {e}", exe.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Runs one SQL statement with `psql` and returns its unaligned, tuples-only output.
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-d", &self.url, "-c", sql])
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if data.exists() {
            let _ = std::panic::catch_unwind(|| {
                self.run(
                    "pg_ctl",
                    &["-D", &data.to_string_lossy(), "-m", "immediate", "stop"],
                )
            });
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
