//! A TCP proxy for fault tests: sits between the daemon and MongoDB and, on command,
//! cuts every open connection, delays traffic in both directions, or refuses new
//! connections for a while (a server that is unreachable).
//!
//! Use it from a test with `#[path = "common/proxy.rs"] mod proxy;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug)]
struct State {
    upstream: SocketAddr,
    /// Added to every chunk forwarded, in either direction, microseconds.
    delay_us: AtomicU64,
    /// While true, new connections are accepted and closed at once.
    refusing: AtomicBool,
    accepted: AtomicUsize,
    open: AtomicUsize,
    cuts: watch::Sender<u64>,
}

/// A running proxy; stops (and drops every connection) when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            upstream,
            delay_us: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            cuts: watch::channel(0).0,
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                st.accepted.fetch_add(1, Ordering::Relaxed);
                if st.refusing.load(Ordering::Relaxed) {
                    abort(client);
                    continue;
                }
                tokio::spawn(serve(st.clone(), client));
            }
        });
        Proxy { addr, state, task }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Cuts every open connection at once (a reset, as from a failing network).
    pub fn cut_all(&self) {
        self.state.cuts.send_modify(|n| *n += 1);
    }

    /// Delays every chunk of data forwarded by `d` (zero: no delay).
    pub fn set_delay(&self, d: Duration) {
        self.state
            .delay_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Refuses (accepts and closes) new connections while `on`.
    pub fn set_refusing(&self, on: bool) {
        self.state.refusing.store(on, Ordering::Relaxed);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state.open.load(Ordering::Relaxed)
    }

    /// `uri` (a `mongodb://` URI) with its first host replaced by this proxy and
    /// `directConnection=true`, so the driver never goes around the proxy.
    pub fn uri_for(&self, uri: &str) -> String {
        let rest = uri.strip_prefix("mongodb://").expect("a mongodb:// URI");
        let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let creds = authority.rsplit_once('@').map(|(c, _)| format!("{c}@"));
        let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
        let mut params: Vec<&str> = query
            .split('&')
            .filter(|p| {
                !p.is_empty()
                    && !p.starts_with("directConnection=")
                    && !p.starts_with("replicaSet=")
            })
            .collect();
        params.push("directConnection=true");
        format!(
            "mongodb://{}127.0.0.1:{}/{}?{}",
            creds.unwrap_or_default(),
            self.port(),
            path,
            params.join("&")
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

/// The first host of a `mongodb://` URI, resolved.
pub fn upstream_of(uri: &str) -> SocketAddr {
    let rest = uri.strip_prefix("mongodb://").expect("a mongodb:// URI");
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let first = hosts.split(',').next().unwrap_or(hosts);
    let first = if first.contains(':') {
        first.to_owned()
    } else {
        format!("{first}:27017")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&first)
        .expect("resolvable host")
        .next()
        .expect("an address")
}

fn abort(stream: TcpStream) {
    // SO_LINGER 0: close with a reset instead of an orderly FIN.
    let _ = socket2_linger_zero(&stream);
    drop(stream);
}

fn socket2_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO))
}

async fn serve(st: Arc<State>, client: TcpStream) {
    let mut cuts = st.cuts.subscribe();
    cuts.borrow_and_update();
    let Ok(server) = TcpStream::connect(st.upstream).await else {
        abort(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    st.open.fetch_add(1, Ordering::Relaxed);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = pump(&st, &mut cr, &mut sw);
    let down = pump(&st, &mut sr, &mut cw);
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = cuts.changed() => {}
    }
    st.open.fetch_sub(1, Ordering::Relaxed);
    if let (Ok(c), Ok(s)) = (cr.reunite(cw), sr.reunite(sw)) {
        abort(c);
        abort(s);
    }
}

async fn pump(
    st: &State,
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = st.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
