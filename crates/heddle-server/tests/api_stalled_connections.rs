//! 2,000 stalled connections against a server whose open-file limit is far below that:
//! real clients are still answered at once, and the server never runs out of files.
//!
//! The server runs as a child process (the `heddle` binary) with `ulimit -n 256` and a
//! cap of 100 connections; this test's own process holds the 2,000 client sockets.
//! Without a connection cap the server would accept until it ran out of descriptors, then
//! fail every accept ("Too many open files") while the stalled clients held them all.

mod api_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const STALLED: usize = 2000;
const SERVER_OPEN_FILES: u64 = 256;
const MAX_CONNECTIONS: usize = 100;

/// Raises this process's soft open-file limit to hold `needed` descriptors.
fn allow_open_files(needed: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|current| current >= needed) {
        return;
    }
    assert!(
        limit.maximum.is_none_or(|maximum| maximum >= needed),
        "this test needs {needed} open files; the hard limit is {:?}",
        limit.maximum
    );
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(needed),
            maximum: limit.maximum,
        },
    )
    .expect("raising the soft open-file limit");
}

/// The `heddle serve` child: its address, and its log lines so far.
struct ChildServer {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl ChildServer {
    fn start() -> Self {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n {SERVER_OPEN_FILES} && exec \"$0\" \"$@\""
            ))
            .arg(env!("CARGO_BIN_EXE_heddle"))
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--kv-blocks",
                "256",
            ])
            .args(["--max-connections", &MAX_CONNECTIONS.to_string()])
            .env("NO_COLOR", "1")
            .env("HEDDLE_LOG", "info")
            // Its own batch database, not the user's.
            .env(
                "HEDDLE_DATA_DIR",
                std::env::temp_dir().join(format!("heddle-stalled-{}", std::process::id())),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("heddle serve starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (address_tx, address_rx) = mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once("listening on http://") {
                    let address: String = rest
                        .chars()
                        .take_while(|c| !c.is_whitespace() && !c.is_control())
                        .collect();
                    let _ = address_tx.send(address);
                }
                lines.lock().unwrap().push(line);
            }
        });
        let address = address_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no address in the log: {:?}", log.lock().unwrap()));
        ChildServer {
            child,
            base: format!("http://{address}"),
            log,
        }
    }

    fn address(&self) -> &str {
        self.base.trim_start_matches("http://")
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that stalls: connects and sends nothing, half a head, or a head and part of
/// its body. None if it could not even connect within the time given.
async fn stall(address: String, kind: usize) -> Option<TcpStream> {
    let connect = async {
        let mut stream = TcpStream::connect(&address).await.ok()?;
        let sent: &[u8] = match kind % 3 {
            0 => b"",
            1 => b"GET /health HTTP/1.1\r\nHost: heddle\r\nUser-Ag",
            _ => {
                b"POST /v1/completions HTTP/1.1\r\nHost: heddle\r\n\
                   Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": "
            }
        };
        // The server may already have closed it to make room.
        let _ = stream.write_all(sent).await;
        Some(stream)
    };
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn two_thousand_stalled_connections_do_not_lock_out_real_clients() {
    allow_open_files(STALLED as u64 + 512);
    let server = ChildServer::start();
    let http = reqwest::Client::new();
    let ready = api_support::eventually(Duration::from_secs(30), || async {
        http.get(format!("{}/ready", server.base))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(
        ready,
        "the server gets ready: {:?}",
        server.log.lock().unwrap()
    );

    let attack_started = Instant::now();
    let stalled: Vec<TcpStream> = futures_util::future::join_all(
        (0..STALLED).map(|kind| stall(server.address().to_string(), kind)),
    )
    .await
    .into_iter()
    .flatten()
    .collect();
    let attack_took = attack_started.elapsed();

    // Fresh clients, so that each needs a new connection while the stalled ones are open.
    let client = || {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let health_started = Instant::now();
    let health = client()
        .get(format!("{}/health", server.base))
        .send()
        .await
        .map(|r| r.status().as_u16());
    let health_took = health_started.elapsed();
    let completion_started = Instant::now();
    let completion = client()
        .post(format!("{}/v1/completions", server.base))
        .json(&json!({"model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 4}))
        .send()
        .await;
    let completion_took = completion_started.elapsed();
    eprintln!(
        "{} of {STALLED} stalled clients connected in {attack_took:?}; /health answered in \
         {health_took:?}, a completion in {completion_took:?}",
        stalled.len()
    );

    assert_eq!(health.ok(), Some(200), "/health answers");
    assert!(
        health_took < Duration::from_secs(2),
        "/health took {health_took:?}"
    );
    let completion = completion.expect("the completion is answered");
    assert_eq!(completion.status(), 200);
    let body: Value = completion.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    assert!(
        completion_took < Duration::from_secs(10),
        "the completion took {completion_took:?}"
    );
    // The server took the whole flood and holds no more than its cap: the rest it closed
    // to make room (a client still in the kernel's backlog would look open too).
    let still_open = |stalled: &[TcpStream]| {
        let mut probe = [0u8; 1];
        stalled
            .iter()
            .filter(|stream| {
                matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count()
    };
    let settled = api_support::eventually(Duration::from_secs(5), || {
        let open = still_open(&stalled);
        async move { open <= MAX_CONNECTIONS }
    })
    .await;
    eprintln!("{} stalled clients still open", still_open(&stalled));
    assert!(
        settled,
        "{} stalled clients still open",
        still_open(&stalled)
    );
    let log = server.log.lock().unwrap();
    assert!(
        !log.iter().any(|line| line.contains("Too many open files")),
        "the server ran out of files:\n{}",
        log.join("\n")
    );
    drop(stalled);
}
