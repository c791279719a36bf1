//! TLS to Postgres with rustls, with libpq's `sslmode` semantics:
//!
//! | sslmode | TLS | certificate chain | host name |
//! | --- | --- | --- | --- |
//! | `disable` | never | | |
//! | `prefer` (default) | if the server offers it | not checked | not checked |
//! | `require` | always | checked only when `sslrootcert` is given | not checked |
//! | `verify-ca` | always | checked | not checked |
//! | `verify-full` | always | checked | checked |
//!
//! `sslrootcert` is a PEM file of trusted CA certificates; without it the
//! verifying modes trust the system's roots. Both settings are taken out of
//! the connection URL before the rest is handed to tokio-postgres, which
//! knows fewer modes.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use crate::error::{Error, ErrorKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, Error> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                    "sslmode `{other}` is not disable, prefer, require, verify-ca or verify-full"
                ),
                ))
            }
        })
    }
}

/// The TLS part of a Postgres connection URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

/// How far the chain and name are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

impl TlsSettings {
    /// Splits `url` into the TLS settings and the URL without them.
    pub fn from_url(url: &str) -> Result<(TlsSettings, String), Error> {
        let mut settings = TlsSettings {
            mode: SslMode::Prefer,
            root_cert: None,
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // libpq's multi-host form: the query is the first host's URL's.
            let (first, more_hosts) = crate::config::split_hosts(url);
            let mut parsed = url::Url::parse(&first)
                .map_err(|e| Error::with_source(ErrorKind::Config, "invalid postgres.url", e))?;
            let mut kept = Vec::new();
            for (key, value) in parsed.query_pairs() {
                match &*key {
                    "sslmode" => settings.mode = SslMode::parse(&value)?,
                    "sslrootcert" => settings.root_cert = Some(PathBuf::from(&*value)),
                    _ => kept.push((key.into_owned(), value.into_owned())),
                }
            }
            parsed.set_query(None);
            if !kept.is_empty() {
                parsed.query_pairs_mut().extend_pairs(kept);
            }
            return Ok((settings, crate::config::with_hosts(&parsed, &more_hosts)));
        }
        // key=value form (no quoted values).
        let mut kept = Vec::new();
        for pair in url.split_whitespace() {
            match pair.split_once('=') {
                Some(("sslmode", value)) => settings.mode = SslMode::parse(value)?,
                Some(("sslrootcert", value)) => settings.root_cert = Some(PathBuf::from(value)),
                _ => kept.push(pair),
            }
        }
        Ok((settings, kept.join(" ")))
    }

    /// The rustls configuration, or `None` for `disable`.
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, Error> {
        let verify = match (self.mode, &self.root_cert) {
            (SslMode::Disable, _) => return Ok(None),
            (SslMode::Prefer | SslMode::Require, None) => Verify::Nothing,
            (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, _) => Verify::Chain,
            (SslMode::VerifyFull, _) => Verify::ChainAndName,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::with_source(ErrorKind::Config, "TLS setup failed", e))?;
        let config = if verify == Verify::Nothing {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth()
        } else {
            let roots = Arc::new(self.roots()?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| Error::with_source(ErrorKind::Config, "TLS setup failed", e))?;
            let verifier: Arc<dyn ServerCertVerifier> = if verify == Verify::Chain {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        };
        Ok(Some(Arc::new(config)))
    }

    /// Whether the connection must fail when the server refuses TLS.
    pub fn required(&self) -> bool {
        !matches!(self.mode, SslMode::Disable | SslMode::Prefer)
    }

    fn roots(&self) -> Result<RootCertStore, Error> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Config,
                        format!("cannot read sslrootcert {}", path.display()),
                        e,
                    )
                })?;
                for cert in certs {
                    let cert = cert.map_err(|e| {
                        Error::with_source(
                            ErrorKind::Config,
                            format!("bad certificate in sslrootcert {}", path.display()),
                            e,
                        )
                    })?;
                    roots.add(cert).map_err(|e| {
                        Error::with_source(
                            ErrorKind::Config,
                            format!("bad CA in {}", path.display()),
                            e,
                        )
                    })?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        if roots.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "no trusted CA certificates: set sslrootcert in postgres.url",
            ));
        }
        Ok(roots)
    }
}

/// The server name to present and (with verify-full) check.
pub fn server_name(host: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(host.to_owned()).map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("`{host}` is not a valid TLS server name"),
            e,
        )
    })
}

/// `require` without a CA: encryption without authentication, as in libpq.
/// Handshake signatures are still checked.
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl fmt::Debug for NoVerification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NoVerification")
    }
}

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted CA; the name is not
/// checked. webpki checks the chain before the name, so a name mismatch
/// means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_out_of_the_url() {
        let (settings, rest) = TlsSettings::from_url(
            "postgres://u:p@db:5432/app?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(settings.mode, SslMode::VerifyFull);
        assert_eq!(
            settings.root_cert.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(rest, "postgres://u:p@db:5432/app?application_name=x");
        let (settings, rest) = TlsSettings::from_url("host=db sslmode=require user=u").unwrap();
        assert_eq!(
            (settings.mode, rest.as_str()),
            (SslMode::Require, "host=db user=u")
        );
        let (settings, _) = TlsSettings::from_url("postgres://db/app").unwrap();
        assert_eq!(settings.mode, SslMode::Prefer);
        assert!(TlsSettings::from_url("postgres://db/app?sslmode=sometimes").is_err());
    }
}
