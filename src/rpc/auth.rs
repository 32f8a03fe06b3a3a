//! Authentication of Palisade's own gRPC APIs (ControlPlane, NodeAgent): every call carries
//! the cluster's API credential (see [`crate::replica::token`]) as `authorization: Bearer <hex>`
//! metadata. [`Auth`] adds it to a client's calls; [`RequireCredential`] refuses a server's
//! calls without it (UNAUTHENTICATED).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::{debug, warn};

use crate::replica::token;

/// The metadata key of the credential.
pub const AUTHORIZATION: &str = "authorization";

/// Refused calls are logged at warning level at most this often (per server, in ms); the
/// others at debug level, so that a misconfigured node retrying every heartbeat does not
/// flood the log.
const WARN_EVERY_MS: u64 = 60_000;

/// A client interceptor that adds the API credential to every call.
#[derive(Clone)]
pub struct Auth {
    header: MetadataValue<Ascii>,
}

impl Auth {
    /// The credential of the cluster whose secret is `secret`.
    pub fn new(secret: &[u8]) -> Auth {
        // "Bearer " and hex digits: always valid ASCII metadata.
        let mut header = match MetadataValue::try_from(token::authorization(secret)) {
            Ok(v) => v,
            Err(_) => unreachable!("a bearer of hex digits is valid metadata"),
        };
        // Kept out of debug output (hyper's, tonic's).
        header.set_sensitive(true);
        Auth { header }
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(<credential>)")
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.header.clone());
        Ok(request)
    }
}

/// A server interceptor that lets through only calls with the cluster's API credential.
#[derive(Clone)]
pub struct RequireCredential {
    secret: Arc<Vec<u8>>,
    /// The service's name, for the log.
    service: &'static str,
    /// When the last refusal was logged at warning level (ms since `started`, plus one; 0:
    /// never).
    last_warned: Arc<AtomicU64>,
    started: Instant,
}

impl RequireCredential {
    /// Checks calls of `service` against the credential derived from `secret`.
    pub fn new(secret: Arc<Vec<u8>>, service: &'static str) -> Self {
        RequireCredential {
            secret,
            service,
            last_warned: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        }
    }

    fn log_refusal(&self, peer: Option<SocketAddr>, why: token::AuthError) {
        let now = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last_warned.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_EVERY_MS;
        let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
        if due
            && self
                .last_warned
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(service = self.service, %peer, error = %why, "refused an unauthenticated call (further ones are logged at debug level for a minute)");
        } else {
            debug!(service = self.service, %peer, error = %why, "refused an unauthenticated call");
        }
    }
}

impl Interceptor for RequireCredential {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get(AUTHORIZATION)
            .map(MetadataValue::as_bytes);
        match token::check_authorization(&self.secret, header) {
            Ok(()) => Ok(request),
            Err(why) => {
                self.log_refusal(request.remote_addr(), why);
                Err(Status::unauthenticated(why.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn check(server: &mut RequireCredential, client: Option<&mut Auth>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(auth) = client {
            request = auth.call(request)?;
        }
        server.call(request).map(|_| ())
    }

    #[test]
    fn the_client_interceptor_satisfies_the_server_interceptor_of_its_cluster_only() {
        let mut server = RequireCredential::new(Arc::new(SECRET.to_vec()), "test");
        check(&mut server, Some(&mut Auth::new(SECRET))).unwrap();

        let e = check(&mut server, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(
            e.message().contains("missing authorization metadata"),
            "{e:?}"
        );

        let e = check(
            &mut server,
            Some(&mut Auth::new(b"another cluster's secret")),
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(
            e.message().contains("wrong credential for this cluster"),
            "{e:?}"
        );

        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert(AUTHORIZATION, MetadataValue::from_static("Bearer nonsense"));
        let e = server.call(request).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(
            e.message().contains("malformed authorization metadata"),
            "{e:?}"
        );
        // Many refusals in a row neither panic nor stop the right credential from working.
        for _ in 0..100 {
            assert!(check(&mut server, None).is_err());
        }
        check(&mut server, Some(&mut Auth::new(SECRET))).unwrap();
    }

    #[test]
    fn the_credential_is_not_printed() {
        let auth = Auth::new(SECRET);
        let printed = format!("{auth:?}");
        assert!(
            !printed.contains(&token::api_credential(SECRET)),
            "{printed}"
        );
    }
}
