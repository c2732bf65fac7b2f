//! TLS helpers: throwaway CAs and certificates made with rcgen, written to
//! a directory removed on drop; TLS clients of the servers.

use fanout::proto::pipeline_client::PipelineClient;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The names every server certificate here is valid for.
pub const SERVER_NAMES: [&str; 2] = ["localhost", "processor.test"];

/// A certificate authority.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM, and the certificate's DER.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
    pub der: Vec<u8>,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    fn leaf(&self, cn: &str, names: &[&str], serial: u64, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem(), der: cert.der().to_vec() }
    }

    /// A server certificate for [`SERVER_NAMES`] and 127.0.0.1.
    pub fn server(&self, serial: u64) -> Leaf {
        self.leaf("fanout server", &SERVER_NAMES, serial, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate named `cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf(cn, &[], 1000, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A directory of PEM files, removed on drop.
pub struct Dir(PathBuf);

impl Dir {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fanout-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `contents` to `name` (replacing it); its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Writes `leaf` as `NAME.crt` and `NAME.key`; their paths.
    pub fn leaf(&self, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        (self.write(&format!("{name}.crt"), &leaf.cert), self.write(&format!("{name}.key"), &leaf.key))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tonic client TLS config trusting `ca`, presenting `client` if given.
pub fn client_tls(ca: &Ca, client: Option<&Leaf>) -> ClientTlsConfig {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem)).domain_name("localhost");
    if let Some(c) = client {
        tls = tls.identity(Identity::from_pem(&c.cert, &c.key));
    }
    tls
}

/// A `Pipeline` client over TLS to `addr`.
pub async fn tls_pipeline_client(
    addr: std::net::SocketAddr,
    ca: &Ca,
    client: Option<&Leaf>,
) -> Result<PipelineClient<Channel>, tonic::transport::Error> {
    let ch = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(client_tls(ca, client))?
        .connect_timeout(super::WAIT)
        .connect()
        .await?;
    Ok(PipelineClient::new(ch))
}

/// Handshakes with the server at `addr` (trusting `ca`, presenting
/// `client`) and returns the DER of the certificate it presented.
pub async fn peer_cert(
    addr: std::net::SocketAddr,
    ca: &Ca,
    client: Option<&Leaf>,
) -> std::io::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(c.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls =
        tokio::time::timeout(super::WAIT, connector.connect(ServerName::try_from("localhost").unwrap(), tcp))
            .await
            .expect("handshake timed out")?;
    let der = tls.get_ref().1.peer_certificates().expect("a server certificate")[0].to_vec();
    // Say goodbye properly (and see the server took the session: with
    // TLS 1.3 a refused client certificate shows up on the first read).
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    tls.flush().await?;
    let mut byte = [0u8; 1];
    tokio::time::timeout(super::WAIT, tls.read(&mut byte)).await.expect("server said nothing")?;
    Ok(der)
}
