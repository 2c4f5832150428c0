//! `heddle serve`: the HTTP server around the model pool.
//!
//! Start-up binds the address first (so `/health` answers at once), then loads the pinned
//! models; `/ready` turns 200 when they are loaded. On SIGINT or SIGTERM the server stops
//! accepting connections and refuses new requests (503), lets running requests finish
//! for the grace period, then cancels the rest, and stops every engine.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::auth::ApiKeys;
use crate::api::{router, AppState};
use crate::config::{ServeArgs, ServerConfig};
use crate::pool::ModelPool;

/// How long connections may stay open after the grace period's cancellations.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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

    /// Starts the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.state.pool.begin_shutdown();
        self.stop.send_replace(true);
    }

    /// Shuts down gracefully and waits until every engine has stopped.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.begin_shutdown();
        self.task.await.context("the server task panicked")?
    }
}

/// Binds, starts serving, and loads the pinned models.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    let pool = Arc::new(
        ModelPool::new(
            config.models.clone(),
            config.scheduler.clone(),
            config.memory_budget,
        )
        .with_device(config.device),
    );
    let state = AppState::new(
        pool,
        ApiKeys::new(config.api_keys.clone()),
        config.max_body_bytes,
    );
    let address = config.bind_address()?;
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(serve(
        listener,
        state.clone(),
        stopped,
        config.shutdown_grace,
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
    Ok(server)
}

async fn serve(
    listener: TcpListener,
    state: AppState,
    stopped: watch::Receiver<bool>,
    grace: Duration,
) -> anyhow::Result<()> {
    let stop_requested = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let server = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(stop_requested(stopped.clone()))
        .into_future();
    tokio::pin!(server);
    let grace_over = async {
        stop_requested(stopped).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = &mut server => result.context("serving HTTP")?,
        () = grace_over => {
            tracing::warn!(
                in_flight = state.pool.in_flight(),
                "grace period over; cancelling the remaining requests"
            );
            state.pool.cancel_all_requests();
            match tokio::time::timeout(CLOSE_TIMEOUT, &mut server).await {
                Ok(result) => result.context("serving HTTP")?,
                Err(_) => tracing::warn!("connections still open; stopping anyway"),
            }
        }
    }
    state.pool.unload_all().await;
    tracing::info!("stopped");
    Ok(())
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
