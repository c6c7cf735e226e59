//! The name a guest's connection asks for, from its first bytes: the server name of a TLS
//! ClientHello (parsed by rustls) or the `Host` of an HTTP/1 request (parsed by httparse).
//! Pure, so it is tested without a VM; [`super::guard`] reads the bytes.

/// Most bytes read from a connection before it must have named its host (a ClientHello
/// with post-quantum key shares is under 2 KiB; an HTTP request head well under this).
pub const MAX_PEEK: usize = 16 << 10;

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniff {
    /// The host the connection names (lower case, no port).
    Name(String),
    /// Not enough bytes yet.
    More,
    /// Nothing to go by: TLS without a server name, not TLS nor HTTP/1, or HTTP without
    /// `Host`.
    Nameless(&'static str),
}

/// Reads the host name from `buf`, the first bytes the guest sent.
pub fn sniff(buf: &[u8]) -> Sniff {
    match buf.first() {
        None => Sniff::More,
        // A TLS handshake record.
        Some(0x16) => tls(buf),
        Some(_) => http(buf),
    }
}

fn tls(buf: &[u8]) -> Sniff {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = buf;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Sniff::Nameless("a TLS record the parser refused"),
        }
    }
    match acceptor.accept() {
        Ok(None) if buf.len() < MAX_PEEK => Sniff::More,
        Ok(None) => Sniff::Nameless("a TLS ClientHello over the size limit"),
        Ok(Some(accepted)) => match accepted.client_hello().server_name() {
            Some(n) => Sniff::Name(n.to_ascii_lowercase()),
            None => Sniff::Nameless("a TLS ClientHello without a server name (SNI)"),
        },
        Err(_) => Sniff::Nameless("not a TLS ClientHello"),
    }
}

fn http(buf: &[u8]) -> Sniff {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let host =
                req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")).map(|h| String::from_utf8_lossy(h.value).into_owned());
            match host {
                // `host:port`, `[v6]:port`: the name is what precedes the port.
                Some(h) => Sniff::Name(strip_port(h.trim()).to_ascii_lowercase()),
                None => Sniff::Nameless("an HTTP request without Host"),
            }
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_PEEK => Sniff::More,
        Ok(httparse::Status::Partial) => Sniff::Nameless("an HTTP request head over the size limit"),
        Err(_) => Sniff::Nameless("neither TLS nor HTTP/1"),
    }
}

fn strip_port(h: &str) -> &str {
    match h.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello for `name`, as a client would send it (rustls's own).
    fn client_hello(name: &str) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(Arc::new(cfg), name.to_owned().try_into().unwrap()).unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn tls_server_name_is_read_even_in_pieces() {
        let hello = client_hello("API.example.com");
        assert_eq!(sniff(&hello), Sniff::Name("api.example.com".into()));
        assert_eq!(sniff(&hello[..hello.len() / 2]), Sniff::More);
        assert!(matches!(sniff(&[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5]), Sniff::Nameless(_)));
    }

    #[test]
    fn http_host_is_read_without_its_port() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: Example.com:8080\r\n\r\n"), Sniff::Name("example.com".into()));
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHo"), Sniff::More);
        assert!(matches!(sniff(b"GET / HTTP/1.1\r\n\r\n"), Sniff::Nameless(_)));
        assert!(matches!(sniff(b"SSH-2.0-OpenSSH\r\n"), Sniff::Nameless(_)));
    }
}
