//! TLS for microvm endpoints (`https://<id>.<domain>`, [`crate::endpoint`]).
//!
//! Two sources of certificates:
//! - the operator's (`hearth serve --tls-cert/--tls-key`, PEM): served for every name, as
//!   a proxy or load balancer would (a wildcard `*.<domain>` is the usual one);
//! - a CA Hearth makes on first start under `<state>/tls/<domain>/` (`ca.pem`, `ca.key`
//!   0600), which clients are told to trust. It is **name-constrained** to the endpoint
//!   domain, `localhost` and the loopback addresses, so a trusted copy can vouch for
//!   nothing else even if its key leaks. Each name a client asks for by SNI
//!   (`<id>.<domain>`) gets its own leaf certificate, made on first use (an ECDSA P-256
//!   key and one signature, well under a millisecond with ring) and cached: a wildcard
//!   would not do for the default domain, since OpenSSL and browsers refuse `*.localhost`
//!   (a wildcard needs two labels after it).
//!
//! rustls with the ring provider is the TLS stack reqwest already brings in (no second
//! crypto library, no C toolchain as aws-lc-rs would need); `tokio-rustls` accepts, and
//! hyper-util's auto builder serves HTTP/1.1 and HTTP/2 (ALPN `h2`, so gRPC works) with
//! WebSocket upgrades, the same stack `axum::serve` runs on the plain listener. rcgen
//! makes the certificates.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, NameConstraints, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most per-name certificates kept; past it the cache starts over (names are cheap to
/// make again, and a client cannot grow the daemon's memory by asking for many).
const MAX_CACHED_NAMES: usize = 4096;
/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the endpoint certificates come from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// The operator's certificate chain and key (PEM files).
    Files {
        /// Certificate chain, leaf first.
        cert: PathBuf,
        /// Its private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// A CA of Hearth's own under the state directory.
    Generated,
}

/// A TLS setup failure.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("TLS: {path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// rcgen or rustls refused what was asked.
    #[error("TLS: {0}")]
    Setup(String),
}

/// The TLS configuration of the endpoint listener, and where the CA certificate is when
/// Hearth made it (for the operator to hand to clients).
pub struct Tls {
    /// rustls' server configuration (ALPN `h2`, `http/1.1`).
    pub config: Arc<rustls::ServerConfig>,
    /// The generated CA's certificate (PEM), none with the operator's certificate.
    pub ca_file: Option<PathBuf>,
}

/// Loads or makes the certificates for `domain` and builds the server configuration.
///
/// # Errors
///
/// [`TlsError`] when a file cannot be read, written or parsed.
pub fn load(source: &CertSource, state_dir: &Path, domain: &str) -> Result<Tls, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth();
    let (mut config, ca_file) = match source {
        CertSource::Files { cert, key } => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect)
                .map_err(|e| TlsError::File { path: cert.clone(), why: e.to_string() })?;
            if chain.is_empty() {
                return Err(TlsError::File { path: cert.clone(), why: "no certificate in it".into() });
            }
            let k = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File { path: key.clone(), why: e.to_string() })?;
            let c = builder.with_single_cert(chain, k).map_err(|e| TlsError::File { path: key.clone(), why: e.to_string() })?;
            (c, None)
        }
        CertSource::Generated => {
            let ca = LocalCa::load_or_create(&state_dir.join("tls").join(domain), domain)?;
            let ca_file = ca.cert_file.clone();
            let resolver = PerName::new(ca, domain, provider)?;
            (builder.with_cert_resolver(Arc::new(resolver)), Some(ca_file))
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Tls { config: Arc::new(config), ca_file })
}

/// Hearth's own CA for one endpoint domain.
struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    cert_file: PathBuf,
}

impl LocalCa {
    /// The CA's parameters: the same every time for one key and domain, so a restart
    /// signs with the CA clients already trust without parsing its certificate back.
    fn params(key: &KeyPair, domain: &str) -> Result<CertificateParams, TlsError> {
        let mut p = CertificateParams::default();
        let id = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(key.public_key_raw()));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Hearth");
        dn.push(DnType::CommonName, format!("Hearth endpoints CA {}", hex8(&id)));
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let mut permitted = vec![GeneralSubtree::DnsName(domain.to_owned())];
        if domain != "localhost" {
            permitted.push(GeneralSubtree::DnsName("localhost".into()));
        }
        permitted.push(GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4([127, 0, 0, 0], [255, 0, 0, 0])));
        permitted.push(GeneralSubtree::IpAddress(rcgen::CidrSubnet::V6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0xff; 16])));
        p.name_constraints = Some(NameConstraints { permitted_subtrees: permitted, excluded_subtrees: Vec::new() });
        let year = this_year();
        p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        p.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
        Ok(p)
    }

    fn load_or_create(dir: &Path, domain: &str) -> Result<LocalCa, TlsError> {
        let (cert_file, key_file) = (dir.join("ca.pem"), dir.join("ca.key"));
        let file_err = |path: &Path, e: &dyn std::fmt::Display| TlsError::File { path: path.to_owned(), why: e.to_string() };
        let key = if key_file.exists() && cert_file.exists() {
            let pem = std::fs::read_to_string(&key_file).map_err(|e| file_err(&key_file, &e))?;
            KeyPair::from_pem(&pem).map_err(|e| file_err(&key_file, &e))?
        } else {
            crate::store::create_state_dir(dir).map_err(|e| file_err(dir, &e))?;
            let key = KeyPair::generate().map_err(|e| TlsError::Setup(e.to_string()))?;
            let cert = Self::params(&key, domain)?.self_signed(&key).map_err(|e| TlsError::Setup(e.to_string()))?;
            write_private(&key_file, key.serialize_pem().as_bytes()).map_err(|e| file_err(&key_file, &e))?;
            std::fs::write(&cert_file, cert.pem()).map_err(|e| file_err(&cert_file, &e))?;
            tracing::info!(ca = %cert_file.display(), "made a CA for microvm endpoints");
            key
        };
        let issuer = Issuer::new(Self::params(&key, domain)?, key);
        Ok(LocalCa { issuer, cert_file })
    }

    /// A leaf certificate and key for `names`.
    fn issue(&self, names: &[&str], provider: &rustls::crypto::CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
        let setup = |e: rcgen::Error| TlsError::Setup(e.to_string());
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(setup)?;
        for n in names {
            p.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().map_err(setup)?),
            });
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0]);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let year = this_year();
        p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        p.not_after = rcgen::date_time_ymd(year + 1, 12, 31);
        let key = KeyPair::generate().map_err(setup)?;
        let cert = p.signed_by(&key, &self.issuer).map_err(setup)?;
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = provider.key_provider.load_private_key(der).map_err(|e| TlsError::Setup(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)))
    }
}

/// Picks (and makes on first use) the certificate for the name the client asked for.
struct PerName {
    ca: LocalCa,
    /// `.<domain>`, lower case.
    suffix: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// For clients that name no endpoint host: the domain, `localhost` and loopback.
    fallback: Arc<CertifiedKey>,
    names: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for PerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerName").field("suffix", &self.suffix).finish_non_exhaustive()
    }
}

impl PerName {
    fn new(ca: LocalCa, domain: &str, provider: Arc<rustls::crypto::CryptoProvider>) -> Result<PerName, TlsError> {
        let mut names = vec![domain, "127.0.0.1", "::1"];
        if domain != "localhost" {
            names.insert(1, "localhost");
        }
        let fallback = ca.issue(&names, &provider)?;
        Ok(PerName { ca, suffix: format!(".{domain}"), provider, fallback, names: Mutex::new(HashMap::new()) })
    }
}

impl ResolvesServerCert for PerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name().map(str::to_ascii_lowercase) else {
            return Some(self.fallback.clone());
        };
        // Only `<one label>.<domain>`: the CA is asked to vouch for nothing else.
        match name.strip_suffix(self.suffix.as_str()) {
            Some(label) if crate::endpoint::valid_label(label) => {}
            _ => return Some(self.fallback.clone()),
        }
        let mut cache = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&name) {
            return Some(c.clone());
        }
        match self.ca.issue(&[&name], &self.provider) {
            Ok(c) => {
                if cache.len() >= MAX_CACHED_NAMES {
                    cache.clear();
                }
                cache.insert(name, c.clone());
                Some(c)
            }
            Err(e) => {
                tracing::warn!(%name, "no certificate for an endpoint name: {e}");
                Some(self.fallback.clone())
            }
        }
    }
}

/// Serves `router` over TLS on `listener` until `stop` turns true; then lets open
/// connections finish (as `axum::serve`'s graceful shutdown does on the plain listener).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!("endpoint listener: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { drop(stop.wait_for(|s| *s).await) } => break,
        };
        // No Nagle, as on the plain listener (proxied bodies go out in small pieces).
        let _ = tcp.set_nodelay(true);
        let (acceptor, router, watcher) = (acceptor.clone(), router.clone(), graceful.watcher());
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else { return };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // hyper's own 414/431/400 answers in the service's error form, as on the API's
            // listener (framing.rs).
            let io = TokioIo::new(crate::framing::Guarded::new(tls));
            let conn = builder.serve_connection_with_upgrades(io, hyper_util::service::TowerToHyperService::new(router));
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    drop(listener);
    // Long streams (SSE, a slow download) would hold the daemon's exit for ever: they get
    // a while to end, as a suspend waits for its connections, then are cut.
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

fn hex8(b: &[u8]) -> String {
    b.iter().take(4).map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_ca_persists_and_signs_per_name_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let tls = load(&CertSource::Generated, dir.path(), "localhost").unwrap();
        let ca = tls.ca_file.unwrap();
        let pem = std::fs::read_to_string(&ca).unwrap();
        let key = dir.path().join("tls/localhost/ca.key");
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions()) & 0o777, 0o600);
        // A restart keeps the CA clients were told to trust.
        let again = load(&CertSource::Generated, dir.path(), "localhost").unwrap();
        assert_eq!(std::fs::read_to_string(again.ca_file.unwrap()).unwrap(), pem);
        assert_eq!(tls.config.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    /// A TLS handshake against the generated configuration, trusting only its CA.
    async fn handshake(config: Arc<rustls::ServerConfig>, ca: &Path, name: &str) -> Result<(), std::io::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move { tokio_rustls::TlsAcceptor::from(config).accept(b).await.map(drop) });
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let r = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, a).await.map(drop);
        let _ = server.await;
        r
    }

    #[tokio::test]
    async fn each_endpoint_name_gets_a_certificate_and_no_other_name_does() {
        let dir = tempfile::tempdir().unwrap();
        let tls = load(&CertSource::Generated, dir.path(), "localhost").unwrap();
        let ca = tls.ca_file.clone().unwrap();
        for ok in ["mvm-0123456789abcdef.localhost", "localhost", "127.0.0.1"] {
            handshake(tls.config.clone(), &ca, ok).await.unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // Names the CA must not vouch for get the fallback certificate, which does not name them.
        for bad in ["example.com", "a.b.localhost", "mvm-1.localhost.example.com"] {
            assert!(handshake(tls.config.clone(), &ca, bad).await.is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ca_is_name_constrained() {
        // Even a leaf the CA did sign for another name fails verification: the constraint
        // is in the CA certificate a client trusts, not only in Hearth's resolver.
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path(), "localhost").unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let leaf = ca.issue(&["evil.example.com"], &provider).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(&ca.cert_file).unwrap()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider)).build().unwrap();
        let name = rustls::pki_types::ServerName::try_from("evil.example.com").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let r = rustls::client::danger::ServerCertVerifier::verify_server_cert(verifier.as_ref(), &leaf.cert[0], &[], &name, &[], now);
        assert!(r.is_err(), "{r:?}");
        let good = ca.issue(&["mvm-1.localhost"], &rustls::crypto::ring::default_provider()).unwrap();
        let name = rustls::pki_types::ServerName::try_from("mvm-1.localhost").unwrap();
        rustls::client::danger::ServerCertVerifier::verify_server_cert(verifier.as_ref(), &good.cert[0], &[], &name, &[], now).unwrap();
    }

    #[test]
    fn operator_files_must_hold_a_certificate_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let files = CertSource::Files { cert: cert.clone(), key: key.clone() };
        assert!(matches!(load(&files, dir.path(), "localhost"), Err(TlsError::File { .. })));
        let k = KeyPair::generate().unwrap();
        let c = CertificateParams::new(vec!["*.apps.example.com".to_owned()]).unwrap().self_signed(&k).unwrap();
        std::fs::write(&cert, c.pem()).unwrap();
        std::fs::write(&key, k.serialize_pem()).unwrap();
        let tls = load(&files, dir.path(), "apps.example.com").unwrap();
        assert!(tls.ca_file.is_none());
    }
}
