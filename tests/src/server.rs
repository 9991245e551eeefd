//! A real `jhakaas-worker serve` process on loopback ports, with a tonic client.

use jhakaas_proto::v1::worker_client::WorkerClient;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Asserts that every `(field, request)` is refused with INVALID_ARGUMENT naming `field`,
/// through `Generate` and through `SubmitJob`.
pub async fn assert_refused_naming(
    client: &mut WorkerClient<Channel>,
    cases: impl IntoIterator<Item = (&str, jhakaas_proto::v1::GenerateRequest)>,
) {
    for (field, req) in cases {
        for via_submit in [false, true] {
            let err = if via_submit {
                client.submit_job(req.clone()).await.unwrap_err()
            } else {
                client.generate(req.clone()).await.unwrap_err()
            };
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
            assert!(err.message().contains(field), "{field}: {}", err.message());
        }
    }
}

/// A running server; killed when dropped.
pub struct TestServer {
    child: Option<Child>,
    /// gRPC address (`127.0.0.1:port`).
    pub addr: String,
    /// Metrics address.
    pub metrics_addr: String,
    /// The HTTP face's address, when started with `--http-listen`.
    pub http_addr: Option<String>,
    /// Where the server's stderr (logs) goes.
    pub log: PathBuf,
}

impl TestServer {
    /// Starts `serve` with `args` (listen addresses and `--device cpu` are added) and waits
    /// until it prints its addresses.
    pub fn start(args: &[&str]) -> TestServer {
        Self::start_with_env(args, &[])
    }

    /// [`TestServer::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &std::path::Path)]) -> TestServer {
        let dir = std::env::temp_dir().join(format!("jhakaas-tests-{}-logs", std::process::id()));
        std::fs::create_dir_all(&dir).expect("log dir");
        let log = dir.join(format!("serve-{}.log", unique()));
        let mut child = Command::new(crate::worker_binary())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--device",
                "cpu",
            ])
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env("JHAKAAS_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn jhakaas-worker serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listen line");
        let mut words = line.split_whitespace();
        let addr = words
            .nth(2)
            .unwrap_or_else(|| panic!("no address in {line:?}; log: {}", log.display()))
            .to_string();
        let metrics_addr = words
            .nth(2)
            .map(|w| w.trim_end_matches(')').to_string())
            .expect("metrics address");
        let http_addr = words.nth(2).map(|w| w.trim_end_matches(')').to_string());
        TestServer {
            child: Some(child),
            addr,
            metrics_addr,
            http_addr,
            log,
        }
    }

    /// A channel to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    /// A Worker client.
    pub async fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// Health status of `service` (`""` = process).
    pub async fn health(&self, service: &str) -> Result<i32, tonic::Status> {
        let mut h = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await?;
        Ok(r.into_inner().status)
    }

    /// Waits until the Worker service reports SERVING.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.health("jhakaas.worker.v1.Worker").await.ok() == Some(1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server never became ready; log: {}", self.logs());
    }

    /// The server's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Scrapes `/metrics` over plain HTTP/1.1.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics_addr).expect("metrics connect");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Kills the process with SIGKILL (no drain, no cleanup: a crashed or evicted pod).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// `NAME=SOURCE` for a committed fixture pipeline.
pub fn fixture_model(name: &str, fixture: &str) -> String {
    format!(
        "{name}={}",
        crate::fixtures().join("models").join(fixture).display()
    )
}
