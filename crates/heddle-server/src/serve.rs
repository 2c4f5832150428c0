//! `heddle serve`: the HTTP server around the model pool.
//!
//! Start-up binds the address first (so `/health` answers at once), then loads the pinned
//! models; `/ready` turns 200 when they are loaded. On SIGINT or SIGTERM the server stops
//! accepting connections and refuses new requests (503), lets running requests finish
//! for the grace period, then cancels the rest, and stops every engine.
//!
//! Connections are HTTP/1, served by the server's own accept loop so that each is bounded
//! (header, body and idle timeouts) and so is their number (see [`connections`]): a flood
//! of idle or half-sent connections cannot exhaust the open files or lock out real clients.

mod connections;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::api::auth::AccessControl;
use crate::api::{router, AppState};
use crate::batch::runner::BatchRunner;
use crate::batch::store::Store;
use crate::config::{ServeArgs, ServerConfig};
use crate::kv_events::{start_publisher, Medium};
use crate::pool::{Device, ModelPool};
use connections::Connections;

/// How long connections may stay open after the grace period's cancellations.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the kernel may queue before the accept loop takes them.
const LISTEN_BACKLOG: u32 = 4096;
/// Open files kept for everything but connections (models, the runtime, logs).
const RESERVED_FILES: u64 = 64;
/// The pause after an accept error that is not the client's (out of open files), so that
/// the loop makes room instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How much each connection, and all of them, may hold of the server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpLimits {
    /// Most connections held at once.
    pub max_connections: usize,
    /// From a connection's start, or from the first byte after an idle wait, to the end of
    /// a request's headers.
    pub header_read_timeout: Duration,
    /// From a handler's first read of a request body to its end (408 after).
    pub body_read_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
        }
    }
}

/// Runs `heddle serve` until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServerConfig::resolve(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("heddle-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let server = start(config).await?;
        shutdown_signal().await;
        tracing::info!("shutting down");
        server.shutdown().await
    })
}

/// A server running on the current tokio runtime.
pub struct RunningServer {
    addr: SocketAddr,
    state: AppState,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// The address it listens on (the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pool(&self) -> &Arc<ModelPool> {
        &self.state.pool
    }

    /// Starts the graceful shutdown without waiting for it. Batches stop at once (their
    /// lines in flight run again after a restart); interactive requests get the grace.
    pub fn begin_shutdown(&self) {
        self.state.batches.stop();
        self.state.pool.begin_shutdown();
        self.stop.send_replace(true);
    }

    /// Shuts down gracefully and waits until every engine has stopped.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.state.batches.stopped().await;
        self.task.await.context("the server task panicked")?
    }
}

/// Binds, starts serving, and loads the pinned models.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    let mut pool = ModelPool::new(
        config.models.clone(),
        config.scheduler.clone(),
        config.memory_budget,
    )
    .with_device(config.device);
    if let Some(kv_events) = &config.kv_events {
        let medium = match config.device {
            Device::Cpu => Medium::Cpu,
            Device::Cuda { .. } => Medium::Gpu,
        };
        pool = pool.with_kv_events(start_publisher(kv_events, medium).await?);
    }
    let pool = Arc::new(pool);
    let address = config.bind_address()?;
    config.check_exposure(address)?;
    let access = AccessControl::new(
        config.api_keys.clone(),
        config.admin_api_keys.clone(),
        config.metrics_api_keys.clone(),
        config.admin_on_loopback,
    );
    let limits = within_open_file_limit(config.http);
    let store = Store::open(config.data_dir.as_deref()).context("opening the batch database")?;
    let batches = Arc::new(BatchRunner::new(store, config.batch_lines_in_flight));
    let state = AppState::new(
        pool,
        access,
        config.max_body_bytes,
        limits.body_read_timeout,
        batches,
    );
    let listener = listen(address).with_context(|| format!("binding {address}"))?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(serve(
        listener,
        state.clone(),
        stopped,
        config.shutdown_grace,
        limits,
    ));
    tracing::info!("listening on http://{addr}");

    let server = RunningServer {
        addr,
        state: state.clone(),
        stop,
        task,
    };
    if let Err(error) = state.pool.load_pinned().await {
        let _ = server.shutdown().await;
        return Err(error).context("loading the pinned models");
    }
    state.ready.store(true, Ordering::Release);
    tracing::info!(models = state.pool.specs().len(), "ready");
    let resumed = state.batches.resume(&state).await;
    match resumed {
        Ok(0) => {}
        Ok(count) => tracing::info!(batches = count, "resuming unfinished batches"),
        Err(error) => tracing::error!(%error, "cannot resume the unfinished batches"),
    }
    Ok(server)
}

/// A listener whose backlog holds a flood of connections (the kernel caps it at
/// `net.core.somaxconn`): the accept loop drains it fast, closing stalled connections for
/// room, while a full backlog would drop new clients' SYNs and make them retry a second
/// or more later.
fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The limits with `max_connections` capped to what the open-file limit leaves room for,
/// after raising the soft limit to the hard one: past it, accepting fails with "too many
/// open files" while stalled connections hold every descriptor.
fn within_open_file_limit(mut limits: HttpLimits) -> HttpLimits {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let mut files = getrlimit(Resource::Nofile);
        if files.current != files.maximum {
            let raised = Rlimit {
                current: files.maximum,
                maximum: files.maximum,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                files = raised;
            }
        }
        if let Some(open_files) = files.current {
            let room = usize::try_from(open_files.saturating_sub(RESERVED_FILES))
                .unwrap_or(usize::MAX)
                .max(1);
            if limits.max_connections > room {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    open_files,
                    "the open-file limit leaves room for {room} connections; holding at most \
                     that many (raise `ulimit -n` for more)"
                );
                limits.max_connections = room;
            }
        }
    }
    limits
}

async fn serve(
    listener: TcpListener,
    state: AppState,
    stopped: watch::Receiver<bool>,
    grace: Duration,
    limits: HttpLimits,
) -> anyhow::Result<()> {
    let connections = Arc::new(Connections::new(limits.max_connections));
    let server = async {
        accept(
            listener,
            router(state.clone()),
            &connections,
            limits,
            stopped.clone(),
        )
        .await;
        connections.all_closed().await;
    };
    tokio::pin!(server);
    let mut stop_requested = stopped.clone();
    let grace_over = async {
        let _ = stop_requested.wait_for(|stop| *stop).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = &mut server => {}
        () = grace_over => {
            tracing::warn!(
                in_flight = state.pool.in_flight(),
                "grace period over; cancelling the remaining requests"
            );
            state.pool.cancel_all_requests();
            if tokio::time::timeout(CLOSE_TIMEOUT, &mut server).await.is_err() {
                tracing::warn!("connections still open; closing them");
                connections.close_all();
            }
        }
    }
    state.pool.unload_all().await;
    tracing::info!("stopped");
    Ok(())
}

/// Accepts connections until the stop signal, each into a slot of `connections`; the
/// listener closes on return.
async fn accept(
    listener: TcpListener,
    router: Router,
    connections: &Arc<Connections>,
    limits: HttpLimits,
    mut stopped: watch::Receiver<bool>,
) {
    let mut last_error_logged: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) if is_client_error(&error) => continue,
            Err(error) => {
                if last_error_logged.is_none_or(|at| at.elapsed() > ACCEPT_ERROR_LOG_INTERVAL) {
                    tracing::error!(%error, "cannot accept connections; making room");
                    last_error_logged = Some(Instant::now());
                }
                connections.evict_longest_waiting();
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let slot = tokio::select! {
            slot = connections.slot() => slot,
            _ = stopped.wait_for(|stop| *stop) => return,
        };
        // Stream chunks are small; they should leave at once.
        let _ = stream.set_nodelay(true);
        connections.spawn(slot, stream, router.clone(), limits, stopped.clone());
    }
}

/// Accept errors that concern one client's connection only.
fn is_client_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
