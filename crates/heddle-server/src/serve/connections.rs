//! Each HTTP/1 connection's life, and the bounded set of them.
//!
//! A connection is in one phase at a time:
//! - awaiting a request head: since it was accepted, when the head must arrive within the
//!   header read timeout, or since its last response, when it may wait the idle timeout
//!   for the next request's first byte and then has the header read timeout for the rest;
//! - receiving a request body (handlers bound that wait: a 408 after the body read timeout);
//! - responding: the request is complete and the server works on it.
//!
//! A connection that overstays its phase's timeout is closed. When every slot is taken, a
//! new connection closes the one that has waited longest on its client (awaiting a head or
//! receiving a body), so idle and stalled clients cannot lock out working ones; a
//! connection the server is responding on is never closed for room.
//!
//! When a response goes out before its request body was read (a 413 on the declared
//! length, a 401), the connection ends with a lingering close: the server sends FIN, then
//! reads and discards what the client still sends, for a bounded time, until the client
//! closes. Closing a socket with unread data would reset the connection, and the client
//! could lose the response it has not read yet.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::Router;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use super::HttpLimits;

/// The longest a lingering close waits for the client to stop sending and close.
const LINGER_TIME: Duration = Duration::from_secs(5);
/// The most a lingering close reads and discards.
const LINGER_BYTES: usize = 64 * 1024 * 1024;
/// How often the server says, at most, that its connection slots are all taken.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Phase {
    AwaitingHead {
        since: Instant,
        first_byte: Option<Instant>,
        /// Whether the connection has served a request (its wait is an idle keep-alive).
        kept_alive: bool,
    },
    ReceivingBody {
        since: Instant,
    },
    Responding,
}

/// What the accept loop, the connection's task, its socket and its requests share.
struct Tracker {
    phase: Mutex<Phase>,
    /// Wakes the connection's task to recompute its deadline.
    changed: Notify,
    /// Wakes an accept loop that waits for a connection it may close for room.
    now_waiting: Arc<Notify>,
    evicted: AtomicBool,
    evict: Notify,
    /// The last response went out before its request's body was read to the end.
    body_unread: AtomicBool,
}

impl Tracker {
    fn new(now_waiting: Arc<Notify>) -> Self {
        Tracker {
            phase: Mutex::new(Phase::AwaitingHead {
                since: Instant::now(),
                first_byte: None,
                kept_alive: false,
            }),
            changed: Notify::new(),
            now_waiting,
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            body_unread: AtomicBool::new(false),
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        // A panic while holding this lock cannot leave a torn `Phase` (it is Copy).
        self.phase
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enter(&self, phase: Phase) {
        *self.phase() = phase;
        self.changed.notify_one();
    }

    fn bytes_arrived(&self) {
        let mut phase = self.phase();
        if let Phase::AwaitingHead {
            first_byte: first_byte @ None,
            ..
        } = &mut *phase
        {
            *first_byte = Some(Instant::now());
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn request_arrived(&self, body_complete: bool) {
        self.body_unread.store(false, Ordering::Relaxed);
        self.enter(if body_complete {
            Phase::Responding
        } else {
            Phase::ReceivingBody {
                since: Instant::now(),
            }
        });
    }

    fn body_complete(&self) {
        let mut phase = self.phase();
        if matches!(*phase, Phase::ReceivingBody { .. }) {
            *phase = Phase::Responding;
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn response_sent(&self) {
        self.enter(Phase::AwaitingHead {
            since: Instant::now(),
            first_byte: None,
            kept_alive: true,
        });
        self.now_waiting.notify_one();
    }

    /// When the connection must be closed if it is still in its current phase.
    fn deadline(&self, limits: &HttpLimits) -> Option<Instant> {
        match *self.phase() {
            Phase::AwaitingHead {
                first_byte: Some(first_byte),
                ..
            } => Some(first_byte + limits.header_read_timeout),
            Phase::AwaitingHead {
                since,
                kept_alive: true,
                ..
            } => Some(since + limits.idle_timeout),
            Phase::AwaitingHead { since, .. } => Some(since + limits.header_read_timeout),
            // Handlers time out their body reads; a response takes what it takes.
            Phase::ReceivingBody { .. } | Phase::Responding => None,
        }
    }

    fn awaiting_head(&self) -> bool {
        matches!(*self.phase(), Phase::AwaitingHead { .. })
    }

    /// Since when the connection has been waiting on its client, if it is.
    fn waiting_on_client_since(&self) -> Option<Instant> {
        match *self.phase() {
            Phase::AwaitingHead { since, .. } | Phase::ReceivingBody { since } => Some(since),
            Phase::Responding => None,
        }
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Relaxed);
        self.evict.notify_one();
    }
}

/// The open connections, at most `max` of them.
pub(super) struct Connections {
    max: usize,
    slots: Arc<Semaphore>,
    live: Mutex<HashMap<u64, Arc<Tracker>>>,
    next_id: AtomicU64,
    /// Notified when a connection the server was responding on starts waiting on its
    /// client, so that it can be closed for room.
    now_waiting: Arc<Notify>,
    last_full_warning: Mutex<Option<Instant>>,
}

impl Connections {
    pub(super) fn new(max: usize) -> Self {
        Connections {
            max,
            slots: Arc::new(Semaphore::new(max)),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            now_waiting: Arc::new(Notify::new()),
            last_full_warning: Mutex::new(None),
        }
    }

    fn live(&self) -> MutexGuard<'_, HashMap<u64, Arc<Tracker>>> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot for a connection just accepted: a free one, else the one of the connection
    /// that has waited longest on its client (which is closed), else the first one that
    /// frees or whose connection starts waiting on its client.
    pub(super) async fn slot(&self) -> OwnedSemaphorePermit {
        let mut warned = false;
        loop {
            if let Ok(slot) = self.slots.clone().try_acquire_owned() {
                return slot;
            }
            let evicted = self.evict_longest_waiting();
            if !warned {
                self.warn_full(evicted);
                warned = true;
            }
            tokio::select! {
                slot = self.slots.clone().acquire_owned() => {
                    return slot.expect("the slots are never closed");
                }
                () = self.now_waiting.notified(), if !evicted => {}
            }
        }
    }

    /// Closes the connection that has waited longest on its client; false if every
    /// connection is one the server is responding on.
    pub(super) fn evict_longest_waiting(&self) -> bool {
        let live = self.live();
        let victim = live
            .values()
            .filter(|tracker| !tracker.evicted.load(Ordering::Relaxed))
            .filter_map(|tracker| Some((tracker.waiting_on_client_since()?, tracker)))
            .min_by_key(|(since, _)| *since);
        match victim {
            Some((_, tracker)) => {
                tracker.evict();
                true
            }
            None => false,
        }
    }

    fn warn_full(&self, evicted: bool) {
        let mut last = self
            .last_full_warning
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.is_some_and(|at| at.elapsed() < FULL_WARNING_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        if evicted {
            tracing::warn!(
                max_connections = self.max,
                "every connection slot is taken; closing those that wait longest on their \
                 clients to make room"
            );
        } else {
            tracing::warn!(
                max_connections = self.max,
                "every connection slot is taken by a request in progress; new connections \
                 wait in the backlog"
            );
        }
    }

    /// Closes every connection now, whatever its phase.
    pub(super) fn close_all(&self) {
        for tracker in self.live().values() {
            tracker.evict();
        }
    }

    /// Resolves once every connection has ended.
    pub(super) async fn all_closed(&self) {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(all).await;
    }

    /// Serves an accepted connection in its slot, on a task of its own. It can be closed
    /// for room from now on, before the task first runs.
    pub(super) fn spawn(
        self: &Arc<Self>,
        slot: OwnedSemaphorePermit,
        stream: TcpStream,
        router: Router,
        limits: HttpLimits,
        stop: watch::Receiver<bool>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tracker = Arc::new(Tracker::new(self.now_waiting.clone()));
        self.live().insert(id, tracker.clone());
        let connections = self.clone();
        tokio::spawn(async move {
            serve_connection(stream, router, tracker, limits, stop).await;
            connections.live().remove(&id);
            drop(slot);
        });
    }
}

enum Ended {
    /// hyper finished with the connection: the client closed it, or the server did after
    /// a response (keep-alive off, shutdown).
    Finished(hyper::Result<()>),
    TimedOut,
    Evicted,
    /// The server stops while the connection waits for a request head.
    Stopped,
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    tracker: Arc<Tracker>,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let io = TokioIo::new(WatchedStream {
        stream,
        tracker: tracker.clone(),
    });
    let service = ConnectionService {
        router,
        tracker: tracker.clone(),
    };
    // The timeouts are this module's (hyper's header timer also runs while a keep-alive
    // connection idles, and cannot tell the two apart).
    let mut connection = http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(io, service);
    let mut stopping = false;
    let ended = loop {
        let deadline = tracker.deadline(&limits);
        tokio::select! {
            result = poll_fn(|cx| connection.poll_without_shutdown(cx)) => {
                break Ended::Finished(result);
            }
            _ = stop.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                // A request still to come would be refused; one under way gets its answer.
                if tracker.awaiting_head() {
                    break Ended::Stopped;
                }
                Pin::new(&mut connection).graceful_shutdown();
            }
            () = tracker.changed.notified() => {}
            () = sleep_until(deadline) => {
                if tracker.deadline(&limits).is_some_and(|at| at <= Instant::now()) {
                    break Ended::TimedOut;
                }
            }
            () = tracker.evict.notified() => break Ended::Evicted,
        }
    };
    match ended {
        Ended::Finished(result) => {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
            if tracker.body_unread.load(Ordering::Relaxed) {
                let stream = connection.into_parts().io.into_inner().stream;
                tokio::select! {
                    () = linger(stream) => {}
                    () = tracker.evict.notified() => {
                        tracing::debug!("cutting a lingering close short to make room");
                    }
                }
            }
        }
        Ended::TimedOut => tracing::debug!("closing a connection whose client was too slow"),
        Ended::Evicted => tracing::debug!("closing a connection to make room, or to stop"),
        Ended::Stopped => tracing::debug!("closing a connection between requests to stop"),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Sends FIN, then reads and discards until the client closes, within the linger bounds.
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut buffer = vec![0; 64 * 1024];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => drained += read,
            }
        }
    };
    if tokio::time::timeout(LINGER_TIME, drain).await.is_err() {
        tracing::debug!("the client kept sending after its response; closing anyway");
    }
}

/// The socket, telling the tracker when bytes arrive.
struct WatchedStream {
    stream: TcpStream,
    tracker: Arc<Tracker>,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.tracker.bytes_arrived();
        }
        poll
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Runs the router for each request of one connection, tracking its phases.
struct ConnectionService {
    router: Router,
    tracker: Arc<Tracker>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = hyper::Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let tracker = self.tracker.clone();
        let request = request.map(|incoming| {
            tracker.request_arrived(incoming.is_end_stream());
            Body::new(RequestBody {
                incoming,
                tracker: tracker.clone(),
                complete: false,
            })
        });
        let response = self.router.clone().oneshot(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| ResponseBody { inner, tracker }))
        })
    }
}

/// A request body that tells the tracker when it has been read to the end, or dropped
/// before.
struct RequestBody {
    incoming: Incoming,
    tracker: Arc<Tracker>,
    complete: bool,
}

impl RequestBody {
    fn completed(&mut self) {
        if !self.complete {
            self.complete = true;
            self.tracker.body_complete();
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.incoming).poll_frame(cx);
        if matches!(poll, Poll::Ready(None)) || self.incoming.is_end_stream() {
            self.completed();
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if !self.complete && !self.incoming.is_end_stream() {
            self.tracker.body_unread.store(true, Ordering::Relaxed);
        }
    }
}

/// A response body that tells the tracker when it has been sent (hyper drops it then).
pub(super) struct ResponseBody {
    inner: Body,
    tracker: Arc<Tracker>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.tracker.response_sent();
    }
}
