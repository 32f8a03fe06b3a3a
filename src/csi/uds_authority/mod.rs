//! Connections to the CSI unix socket, made acceptable to `h2` whatever `:authority` the
//! client sends.
//!
//! gRPC clients have no host name to put in `:authority` on a unix socket and send what they
//! like: grpcio (1.57 and later) the socket path percent-encoded (`tmp%2Fx%2Fcsi.sock`),
//! grpc-java the path itself, grpc-go and the Kubernetes sidecars `localhost`. The `h2` crate
//! parses the header as a URI authority and resets the stream with PROTOCOL_ERROR when it is
//! not one (hyperium/h2#487 proposes otherwise; no option turns it off). On a unix socket the
//! authority carries nothing, so [`incoming`] wraps every accepted connection so that the
//! server reads `localhost` in its place (see [`rewrite`] for how). Only the client's bytes
//! are touched; what the server writes goes out as it is.

pub mod hpack;
pub mod rewrite;

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;
use tracing::warn;

use rewrite::Rewriter;

/// How much is read from the client at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Every connection of `connections` (a listener's accepted streams), with its requests'
/// `:authority` made acceptable to `h2`. Serve the CSI socket with
/// `serve_with_incoming(incoming(UnixListenerStream::new(listener)))`.
pub fn incoming<I, S>(connections: I) -> impl Stream<Item = io::Result<AuthorityFixed<S>>>
where
    I: Stream<Item = io::Result<S>>,
{
    connections.map(|accepted| accepted.map(AuthorityFixed::new))
}

/// A client connection whose reads come through a [`Rewriter`]; writes go straight through.
pub struct AuthorityFixed<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet read by the server, from `ready_from` on.
    ready: Vec<u8>,
    ready_from: usize,
    chunk: Box<[u8]>,
    eof: bool,
}

impl<S> AuthorityFixed<S> {
    pub fn new(inner: S) -> AuthorityFixed<S> {
        AuthorityFixed {
            inner,
            rewriter: Rewriter::new(),
            ready: Vec::new(),
            ready_from: 0,
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_from < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_from);
                buf.put_slice(&this.ready[this.ready_from..this.ready_from + n]);
                this.ready_from += n;
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.is_transparent() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = ReadBuf::new(&mut this.chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            this.ready.clear();
            this.ready_from = 0;
            let read = chunk.filled();
            if read.is_empty() {
                this.rewriter.finish(&mut this.ready);
                this.eof = true;
            } else {
                if let Err(e) = this.rewriter.feed(read, &mut this.ready) {
                    warn!(error = %e, "closing a CSI connection");
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityFixed<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};
    use tokio_stream::wrappers::UnixListenerStream;

    use super::rewrite::{tests::GRPCIO_FIRST, PREFACE};
    use super::*;
    use crate::csi::identity::{IdentityService, Readiness};
    use crate::csi::v1 as pb;
    use crate::csi::v1::identity_server::IdentityServer;

    struct AlwaysReady;

    #[tonic::async_trait]
    impl Readiness for AlwaysReady {
        async fn ready(&self) -> Result<(), String> {
            Ok(())
        }
    }

    /// Serves Identity on a fresh socket, with or without the adapter.
    fn serve(dir: &std::path::Path, fixed: bool) -> std::path::PathBuf {
        let path = dir.join(if fixed { "fixed.sock" } else { "plain.sock" });
        let listener = UnixListener::bind(&path).unwrap();
        let server =
            tonic::transport::Server::builder().add_service(IdentityServer::new(IdentityService {
                driver_name: "driver.test".into(),
                readiness: Arc::new(AlwaysReady),
            }));
        let connections = UnixListenerStream::new(listener);
        tokio::spawn(async move {
            if fixed {
                server.serve_with_incoming(incoming(connections)).await
            } else {
                server.serve_with_incoming(connections).await
            }
        });
        path
    }

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Sends grpcio's captured GetPluginInfo request as raw HTTP/2 and returns the frames
    /// the server sent on stream 1 (kind, payload) until it ended the stream.
    async fn grpcio_request(path: &std::path::Path) -> Vec<(u8, Vec<u8>)> {
        let mut s = UnixStream::connect(path).await.unwrap();
        let mut request = PREFACE.to_vec();
        request.extend(frame(0x4, 0, 0, &[]));
        request.extend(frame(0x1, 0x4, 1, &hex::decode(GRPCIO_FIRST).unwrap()));
        request.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
        s.write_all(&request).await.unwrap();
        let mut on_stream = Vec::new();
        let read = async {
            loop {
                let mut head = [0u8; 9];
                s.read_exact(&mut head).await.unwrap();
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0; len];
                s.read_exact(&mut payload).await.unwrap();
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                if stream == 1 {
                    on_stream.push((head[3], payload));
                    // RST_STREAM, or END_STREAM on HEADERS (the trailers).
                    if head[3] == 0x3 || (head[3] == 0x1 && head[4] & 0x1 != 0) {
                        return;
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the server answered stream 1");
        on_stream
    }

    #[tokio::test]
    async fn grpcio_request_is_served_with_the_adapter_and_reset_without() {
        let dir = tempfile::tempdir().unwrap();
        let plain = serve(dir.path(), false);
        let fixed = serve(dir.path(), true);

        let refused = grpcio_request(&plain).await;
        assert_eq!(refused.len(), 1);
        assert_eq!(
            refused[0],
            (0x3, vec![0, 0, 0, 1]),
            "RST_STREAM PROTOCOL_ERROR"
        );

        let served = grpcio_request(&fixed).await;
        let data = served
            .iter()
            .find(|(kind, _)| *kind == 0x0)
            .expect("a DATA frame");
        // gRPC message: 5-byte prefix, then GetPluginInfoResponse with name = field 1.
        assert!(
            data.1.windows(11).any(|w| w == b"driver.test"),
            "{:?}",
            served
        );
    }

    #[tokio::test]
    async fn a_tonic_client_is_served_through_the_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let fixed = serve(dir.path(), true);
        let channel = crate::csi::connect(&fixed).await.unwrap();
        let mut client = pb::identity_client::IdentityClient::new(channel);
        for _ in 0..3 {
            let info = client
                .get_plugin_info(pb::GetPluginInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(info.name, "driver.test");
        }
    }
}
