//! A throwaway CA and certificates, made in-process with rcgen and written
//! to a directory removed on drop: for `fanout demo --tls` and `fanout bench
//! --scenarios tls`, which need TLS on loopback with nothing set up.

use anyhow::{Context, Result};
use fanout::config::{PipelineConfig, ProcessorConfig};
use fanout::tls::{ClientTlsArgs, TlsArgs};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};

/// A CA, one server certificate (localhost, 127.0.0.1) that every server
/// uses, and one client certificate that the pipeline and the client
/// present: enough for TLS and mTLS on both hops.
pub struct Throwaway {
    dir: PathBuf,
}

impl Throwaway {
    /// Makes the CA and certificates in a new temporary directory.
    pub fn new() -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("fanout-certs-{}-{}", std::process::id(), fastrand::u64(..)));
        // Owner-only: it holds private keys, in a directory anyone can list.
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.recursive(true).create(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let this = Self { dir };
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "fanout throwaway CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_key = KeyPair::generate()?;
        this.write("ca.crt", &ca.self_signed(&ca_key)?.pem())?;
        let issuer = Issuer::new(ca, ca_key);
        for (name, usage) in
            [("server", ExtendedKeyUsagePurpose::ServerAuth), ("client", ExtendedKeyUsagePurpose::ClientAuth)]
        {
            let mut leaf = CertificateParams::new(vec!["localhost".to_owned()])?;
            leaf.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
            leaf.distinguished_name.push(DnType::CommonName, format!("fanout {name}"));
            leaf.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            this.write(&format!("{name}.crt"), &leaf.signed_by(&key, &issuer)?.pem())?;
            this.write(&format!("{name}.key"), &key.serialize_pem())?;
        }
        Ok(this)
    }

    fn write(&self, name: &str, pem: &str) -> Result<()> {
        let path = self.dir.join(name);
        std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Where the files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server's TLS: the server certificate, client certificates of the
    /// CA required.
    pub fn server(&self) -> TlsArgs {
        let mut tls = TlsArgs::with_cert(self.path("server.crt"), self.path("server.key"));
        tls.tls_client_ca = Some(self.path("ca.crt"));
        tls
    }

    /// Sets `cfg` to serve mTLS.
    pub fn processor(&self, cfg: &mut ProcessorConfig) {
        cfg.tls = self.server();
    }

    /// Sets `cfg` to serve mTLS and to dial processors over mTLS.
    pub fn pipeline(&self, cfg: &mut PipelineConfig) {
        cfg.tls = self.server();
        cfg.processor_tls.processor_ca = Some(self.path("ca.crt"));
        cfg.processor_tls.processor_cert = Some(self.path("client.crt"));
        cfg.processor_tls.processor_key = Some(self.path("client.key"));
    }

    /// A client's TLS: trusts the CA, presents the client certificate.
    pub fn client(&self) -> ClientTlsArgs {
        ClientTlsArgs {
            ca_cert: Some(self.path("ca.crt")),
            cert: Some(self.path("client.crt")),
            key: Some(self.path("client.key")),
        }
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_keys_directory_is_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let certs = Throwaway::new().unwrap();
        let mode = std::fs::metadata(certs.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", certs.dir().display());
        assert!(certs.dir().join("server.key").exists());
        let dir = certs.dir().to_owned();
        drop(certs);
        assert!(!dir.exists(), "removed on drop");
    }
}
