//! TLS client settings both programs use towards Redis (`rediss://`) and PostgreSQL
//! (`sslmode=verify-ca|verify-full`): rustls with the ring provider, trusting either the CAs an
//! operator gives (a PEM file, which the program reads) or the public web roots.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, danger};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore};

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// The chain up to a trusted CA and the host name (`verify-full`, and always for Redis).
    Full,
    /// The chain only, not the host name (`verify-ca`).
    ChainOnly,
    /// Nothing: encrypted against eavesdropping, not against a man in the middle (libpq's
    /// `require` without a root certificate).
    Nothing,
}

/// The CA certificates in a PEM text; an error names what is wrong (never the contents).
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not a PEM certificate file: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate in the file".to_owned());
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's rustls provider, for libraries that build their own configuration
/// (fred's default for `rediss://`). Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client configuration trusting `roots` (default: the public web roots).
pub fn client_config(roots: Option<RootCertStore>, verify: Verify) -> Result<ClientConfig, String> {
    install_provider();
    let roots = Arc::new(roots.unwrap_or_else(|| {
        RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
    }));
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let config = match verify {
        Verify::Full => builder.with_root_certificates(roots).with_no_client_auth(),
        Verify::ChainOnly | Verify::Nothing => {
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| format!("tls: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient { inner, verify }))
                .with_no_client_auth()
        }
    };
    Ok(config)
}

/// `verify-ca` and `require`: the signature checks of the handshake stay; what is skipped is
/// said by `verify`.
#[derive(Debug)]
struct Lenient {
    inner: Arc<WebPkiServerVerifier>,
    verify: Verify,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if self.verify == Verify::Nothing {
            return Ok(ServerCertVerified::assertion());
        }
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<danger::HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_files_are_named_not_echoed() {
        assert!(roots_from_pem(b"").is_err());
        let err = roots_from_pem(b"hunter2 is not a certificate").expect_err("junk");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(client_config(None, Verify::Full).is_ok());
    }
}
