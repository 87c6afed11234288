//! The cross-node leg: a [`RemoteDialer`] opens a stream to the data plane of the node that runs
//! the chosen instance, names the instance's address in a small header, and waits for that node
//! to answer whether it could connect; the [`Tunnel`] it returns then relays the client's bytes.
//!
//! Two implementations: [`NoiseDialer`] (the real one: a Noise XX stream of
//! [`Plane::Data`] to the node's link port, one stream per proxied connection) and
//! [`PlainDialer`] (plain TCP to a [`serve_plain`] listener: for tests and for the plaintext
//! baseline of the benchmarks — never for production traffic).
//!
//! Wire format inside the stream (Noise frames, or raw bytes for the plain variant):
//! 1. opener → server: the header, `b"SHD1"`, family byte (4 or 6), address (4 or 16 bytes),
//!    port (u16 big-endian) — at most [`HEADER_MAX`] bytes, decoded by [`decode_header`];
//! 2. server → opener: one status byte ([`Status`]);
//! 3. then the bytes of the connection. On the Noise variant each Noise frame carries a chunk; an
//!    empty frame means "no more bytes this way" (half close).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use shoal_membership::cert::NodeCredentials;
use shoal_membership::link::frame::MAX_CHUNK;
use shoal_membership::link::{LinkMetrics, LinkOptions, NoiseStream, Plane};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Proxy, ProxyError, inc};

/// Anything a tunnel can relay to: a client socket, or one end of an in-memory pipe.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Opens data-plane streams to other nodes.
#[async_trait]
pub trait RemoteDialer: Send + Sync + 'static {
    /// A stream to the data plane at `node` whose far end is connected to `target` (an
    /// instance address on that node). Errors when either leg fails.
    async fn dial(
        &self,
        node: SocketAddr,
        target: SocketAddr,
    ) -> Result<Box<dyn Tunnel>, ProxyError>;
}

/// An open stream to a remote instance.
#[async_trait]
pub trait Tunnel: Send {
    /// Sends `prefix` then relays `client` both ways until both sides are done. Returns
    /// `(client→instance, instance→client)` bytes (prefix excluded).
    async fn relay(
        self: Box<Self>,
        client: Box<dyn Io>,
        prefix: Vec<u8>,
    ) -> Result<(u64, u64), ProxyError>;
}

/// Longest header.
pub const HEADER_MAX: usize = 4 + 1 + 16 + 2;
const MAGIC: &[u8; 4] = b"SHD1";

/// The server's answer to a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Connected to the target; bytes follow.
    Ok = 0,
    /// The target refused or did not answer.
    ConnectFailed = 1,
    /// The target is not an instance of this node.
    NotLocal = 2,
    /// The header did not decode.
    Malformed = 3,
}

impl Status {
    fn from_byte(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::ConnectFailed,
            2 => Status::NotLocal,
            3 => Status::Malformed,
            _ => return None,
        })
    }
}

/// The header naming `target`.
pub fn encode_header(target: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_MAX);
    out.extend_from_slice(MAGIC);
    match target.ip() {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&target.port().to_be_bytes());
    out
}

fn header_len(family: u8) -> Result<usize, ProxyError> {
    match family {
        4 => Ok(4 + 1 + 4 + 2),
        6 => Ok(HEADER_MAX),
        f => Err(ProxyError::BadHeader(format!("unknown address family {f}"))),
    }
}

/// Decodes a header; the input must be exactly one header.
pub fn decode_header(bytes: &[u8]) -> Result<SocketAddr, ProxyError> {
    if bytes.len() < 5 || bytes.len() > HEADER_MAX {
        return Err(ProxyError::BadHeader(format!("length {}", bytes.len())));
    }
    if &bytes[..4] != MAGIC {
        return Err(ProxyError::BadHeader("bad magic".into()));
    }
    let want = header_len(bytes[4])?;
    if bytes.len() != want {
        return Err(ProxyError::BadHeader(format!(
            "length {} for family {}",
            bytes.len(),
            bytes[4]
        )));
    }
    let port = u16::from_be_bytes([bytes[want - 2], bytes[want - 1]]);
    let ip = if bytes[4] == 4 {
        let o: [u8; 4] = bytes[5..9].try_into().map_err(|_| bad_len())?;
        IpAddr::V4(Ipv4Addr::from(o))
    } else {
        let o: [u8; 16] = bytes[5..21].try_into().map_err(|_| bad_len())?;
        IpAddr::V6(Ipv6Addr::from(o))
    };
    Ok(SocketAddr::new(ip, port))
}

fn bad_len() -> ProxyError {
    ProxyError::BadHeader("length".into())
}

fn status_error(s: Option<Status>, target: SocketAddr) -> ProxyError {
    match s {
        Some(Status::ConnectFailed) => ProxyError::RemoteConnect(target),
        Some(Status::NotLocal) => ProxyError::RemoteRefused(target),
        _ => ProxyError::BadHeader(format!("bad status from the data plane for {target}")),
    }
}

/// Connects to a local instance (the server side's leg), with a deadline.
async fn connect_local(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    s.set_nodelay(true)?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Noise

/// Dials Noise XX streams of [`Plane::Data`] (the real cross-node leg).
#[derive(Debug, Clone)]
pub struct NoiseDialer {
    creds: Arc<NodeCredentials>,
    metrics: Arc<LinkMetrics>,
    opts: LinkOptions,
}

impl NoiseDialer {
    /// A dialer with this node's credentials; link counters go to `metrics`.
    pub fn new(creds: Arc<NodeCredentials>, metrics: Arc<LinkMetrics>, opts: LinkOptions) -> Self {
        NoiseDialer {
            creds,
            metrics,
            opts,
        }
    }
}

#[async_trait]
impl RemoteDialer for NoiseDialer {
    async fn dial(
        &self,
        node: SocketAddr,
        target: SocketAddr,
    ) -> Result<Box<dyn Tunnel>, ProxyError> {
        let (mut s, _peer) = NoiseStream::connect_with(
            node,
            Plane::Data,
            self.creds.clone(),
            self.metrics.clone(),
            &self.opts,
        )
        .await?;
        s.send_frame(&encode_header(target)).await?;
        let reply = tokio::time::timeout(self.opts.handshake_timeout, s.recv_frame())
            .await
            .map_err(|_| ProxyError::RemoteConnect(target))??;
        match reply.as_slice() {
            [0] => Ok(Box::new(NoiseTunnel(s))),
            [b] => Err(status_error(Status::from_byte(*b), target)),
            _ => Err(status_error(None, target)),
        }
    }
}

struct NoiseTunnel(NoiseStream);

#[async_trait]
impl Tunnel for NoiseTunnel {
    async fn relay(
        self: Box<Self>,
        client: Box<dyn Io>,
        prefix: Vec<u8>,
    ) -> Result<(u64, u64), ProxyError> {
        let mut s = self.0;
        if !prefix.is_empty() {
            s.send_frame(&prefix).await?;
        }
        pump(&mut s, client).await
    }
}

/// Relays between a Noise stream and a byte stream until both directions ended. Returns
/// `(io→noise, noise→io)` bytes.
///
/// One task drives both directions: reads from either side are cancel-safe and raced; a write
/// completes before the next read. (If both peers write at once into full socket buffers each
/// waits for the other; request/response traffic never does this, a full-duplex bulk transfer
/// in both directions at once could stall — a `NoiseStream` cannot be split into halves.)
async fn pump(s: &mut NoiseStream, io: Box<dyn Io>) -> Result<(u64, u64), ProxyError> {
    let (mut r, mut w) = tokio::io::split(io);
    let mut buf = vec![0u8; MAX_CHUNK - 4];
    let (mut up_done, mut down_done) = (false, false);
    let (mut up, mut down) = (0u64, 0u64);
    while !(up_done && down_done) {
        tokio::select! {
            n = r.read(&mut buf), if !up_done => {
                let n = n?;
                if n == 0 {
                    s.send_frame(&[]).await?;
                    up_done = true;
                } else {
                    s.send_frame(&buf[..n]).await?;
                    up += n as u64;
                }
            }
            f = s.recv_frame(), if !down_done => {
                let f = f?;
                if f.is_empty() {
                    let _ = w.shutdown().await;
                    down_done = true;
                } else {
                    w.write_all(&f).await?;
                    down += f.len() as u64;
                }
            }
        }
    }
    Ok((up, down))
}

/// Serves one accepted [`Plane::Data`] stream: reads the header, connects to the named local
/// instance (only an address that is a local endpoint of `proxy`'s table) and relays.
pub async fn serve_noise_stream(proxy: Arc<Proxy>, mut s: NoiseStream) -> Result<(), ProxyError> {
    let m = proxy.metrics();
    inc(&m.data_streams_accepted);
    let opened = tokio::time::timeout(proxy.options().connect_timeout, s.recv_frame())
        .await
        .map_err(|_| ProxyError::BadHeader("no header in time".into()))??;
    let target = match decode_header(&opened) {
        Ok(t) => t,
        Err(e) => {
            inc(&m.data_streams_refused);
            let _ = s.send_frame(&[Status::Malformed as u8]).await;
            return Err(e);
        }
    };
    if !proxy.is_local_target(target) {
        inc(&m.data_streams_refused);
        s.send_frame(&[Status::NotLocal as u8]).await?;
        return Err(ProxyError::RemoteRefused(target));
    }
    let up = match connect_local(target, proxy.options().connect_timeout).await {
        Ok(u) => u,
        Err(_) => {
            inc(&m.data_streams_connect_failed);
            s.send_frame(&[Status::ConnectFailed as u8]).await?;
            return Err(ProxyError::RemoteConnect(target));
        }
    };
    s.send_frame(&[Status::Ok as u8]).await?;
    let (a, b) = pump(&mut s, Box::new(up)).await?;
    m.data_bytes.fetch_add(a + b, Ordering::Relaxed);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Plain TCP (tests and the plaintext baseline)

/// Dials the plaintext data plane served by [`serve_plain`]. Not encrypted: tests and
/// benchmark baselines only.
#[derive(Debug, Clone)]
pub struct PlainDialer {
    /// Deadline of connect + answer.
    pub timeout: Duration,
}

impl Default for PlainDialer {
    fn default() -> Self {
        PlainDialer {
            timeout: Duration::from_secs(5),
        }
    }
}

#[async_trait]
impl RemoteDialer for PlainDialer {
    async fn dial(
        &self,
        node: SocketAddr,
        target: SocketAddr,
    ) -> Result<Box<dyn Tunnel>, ProxyError> {
        let attempt = async {
            let mut s = TcpStream::connect(node).await?;
            s.set_nodelay(true)?;
            s.write_all(&encode_header(target)).await?;
            let mut st = [0u8; 1];
            s.read_exact(&mut st).await?;
            Ok::<_, io::Error>((s, st[0]))
        };
        let (s, st) = tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| ProxyError::RemoteConnect(target))??;
        match Status::from_byte(st) {
            Some(Status::Ok) => Ok(Box::new(PlainTunnel(s))),
            other => Err(status_error(other, target)),
        }
    }
}

struct PlainTunnel(TcpStream);

#[async_trait]
impl Tunnel for PlainTunnel {
    async fn relay(
        self: Box<Self>,
        mut client: Box<dyn Io>,
        prefix: Vec<u8>,
    ) -> Result<(u64, u64), ProxyError> {
        let mut s = self.0;
        if !prefix.is_empty() {
            s.write_all(&prefix).await?;
        }
        Ok(
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut s, 64 * 1024, 64 * 1024)
                .await?,
        )
    }
}

/// Serves the plaintext data plane on `listener` (tests and baselines).
pub async fn serve_plain(proxy: Arc<Proxy>, listener: TcpListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _ = serve_plain_stream(proxy, s).await;
        });
    }
}

async fn serve_plain_stream(proxy: Arc<Proxy>, mut s: TcpStream) -> Result<(), ProxyError> {
    let m = proxy.metrics();
    inc(&m.data_streams_accepted);
    s.set_nodelay(true)?;
    let t = proxy.options().connect_timeout;
    let mut head = [0u8; HEADER_MAX];
    tokio::time::timeout(t, s.read_exact(&mut head[..5]))
        .await
        .map_err(|_| ProxyError::BadHeader("no header in time".into()))??;
    let len = match header_len(head[4]) {
        Ok(l) => l,
        Err(e) => {
            inc(&m.data_streams_refused);
            let _ = s.write_all(&[Status::Malformed as u8]).await;
            return Err(e);
        }
    };
    tokio::time::timeout(t, s.read_exact(&mut head[5..len]))
        .await
        .map_err(|_| ProxyError::BadHeader("no header in time".into()))??;
    let target = match decode_header(&head[..len]) {
        Ok(a) => a,
        Err(e) => {
            inc(&m.data_streams_refused);
            let _ = s.write_all(&[Status::Malformed as u8]).await;
            return Err(e);
        }
    };
    if !proxy.is_local_target(target) {
        inc(&m.data_streams_refused);
        s.write_all(&[Status::NotLocal as u8]).await?;
        return Err(ProxyError::RemoteRefused(target));
    }
    let mut up = match connect_local(target, t).await {
        Ok(u) => u,
        Err(_) => {
            inc(&m.data_streams_connect_failed);
            s.write_all(&[Status::ConnectFailed as u8]).await?;
            return Err(ProxyError::RemoteConnect(target));
        }
    };
    s.write_all(&[Status::Ok as u8]).await?;
    let (a, b) =
        tokio::io::copy_bidirectional_with_sizes(&mut s, &mut up, 64 * 1024, 64 * 1024).await?;
    m.data_bytes.fetch_add(a + b, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_header_round_trips_for_both_families() {
        for a in ["127.0.0.2:8080", "[::1]:443"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(decode_header(&encode_header(a)).unwrap(), a);
        }
    }

    #[test]
    fn a_header_with_trailing_bytes_or_bad_magic_is_refused() {
        let mut h = encode_header("127.0.0.1:1".parse().unwrap());
        h.push(0);
        assert!(decode_header(&h).is_err());
        let mut h = encode_header("127.0.0.1:1".parse().unwrap());
        h[0] = b'X';
        assert!(decode_header(&h).is_err());
        assert!(decode_header(&[]).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_header_decoder(b in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_header(&b);
        }

        #[test]
        fn random_bytes_after_the_magic_never_panic_the_header_decoder(
            fam in prop_oneof![Just(4u8), Just(6u8), any::<u8>()],
            rest in prop::collection::vec(any::<u8>(), 0..30),
        ) {
            let mut b = MAGIC.to_vec();
            b.push(fam);
            b.extend(rest);
            if let Ok(a) = decode_header(&b) {
                prop_assert_eq!(encode_header(a), b);
            }
        }
    }
}
