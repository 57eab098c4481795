//! Whole-object checksums that origins publish, for checking a file assembled from peers.
//!
//! # Contract
//! - [`Checksums::lookup`] asks the origin once per call (one HEAD presigned with
//!   `x-amz-checksum-mode: ENABLED` bound to the signature, pinned to the listed etag and
//!   version, with a timeout) for the object's whole-object CRC-64: S3's
//!   `x-amz-checksum-crc64nvme` or Alibaba OSS's `x-oss-hash-crc64ecma`.
//! - [`Lookup::Unavailable`] says why there is none that chunks can be combined into (none at
//!   all, SHA-256 only, another CRC-64 than the one this agent keeps). A changed object is
//!   [`OriginError::Changed`].
//! - Only S3-compatible sources have [`Checksums`]; other sources publish nothing here.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method};
use base64::Engine;
use object_store::signer::Signer;

use super::OriginError;
use crate::catalog::ObjectVersion;

/// A CRC-64 an origin publishes for whole objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crc64Kind {
    /// S3 `x-amz-checksum-crc64nvme`.
    Nvme,
    /// Alibaba OSS `x-oss-hash-crc64ecma` (the CRC-64 of xz).
    Ecma,
}

impl Crc64Kind {
    pub fn algorithm(self) -> crc_fast::CrcAlgorithm {
        match self {
            Crc64Kind::Nvme => crc_fast::CrcAlgorithm::Crc64Nvme,
            Crc64Kind::Ecma => crc_fast::CrcAlgorithm::Crc64Xz,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Crc64Kind::Nvme => "crc64nvme",
            Crc64Kind::Ecma => "crc64ecma",
        }
    }
}

/// What the origin says of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Crc64Kind, u64),
    Unavailable(String),
}

/// The whole-object checksums of an S3-compatible origin.
pub struct Checksums {
    s3: Arc<object_store::aws::AmazonS3>,
    client: reqwest::Client,
    /// The CRC-64 this origin publishes (from its endpoint: OSS or S3).
    pub kind: Crc64Kind,
}

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

impl Checksums {
    pub fn new(s3: Arc<object_store::aws::AmazonS3>, endpoint: Option<&str>) -> Result<Self, OriginError> {
        let oss =
            endpoint.and_then(|e| url::Url::parse(e).ok()).and_then(|u| u.host_str().map(|h| h.ends_with("aliyuncs.com"))).unwrap_or(false);
        let client = super::http_client(LOOKUP_TIMEOUT)?;
        Ok(Checksums { s3, client, kind: if oss { Crc64Kind::Ecma } else { Crc64Kind::Nvme } })
    }

    /// The object's whole-object CRC-64, as the origin publishes it now.
    pub async fn lookup(&self, obj: &ObjectVersion) -> Result<Lookup, OriginError> {
        let mut signed = HeaderMap::new();
        signed.insert("x-amz-checksum-mode", HeaderValue::from_static("ENABLED"));
        if let Some(etag) = obj.etag.as_deref().and_then(|e| HeaderValue::from_str(e).ok()) {
            signed.insert("if-match", etag);
        }
        let mut opts = object_store::signer::SignedUrlOptions::new().with_query(obj.version.iter().map(|v| ("versionId", v.as_str())));
        for (name, value) in &signed {
            opts = opts.with_signed_header(name.clone(), value.clone());
        }
        let url = self
            .s3
            .signed_url_opts(Method::HEAD, &obj.location, Duration::from_secs(300), &opts)
            .await
            .map_err(|e| OriginError::Request(e.to_string()))?;
        let r = self
            .client
            .head(url)
            .headers(signed)
            .send()
            .await
            .map_err(|e| OriginError::Request(format!("checksum lookup: {}", e.without_url())))?;
        match r.status().as_u16() {
            200 => Ok(self.parse(r.headers())),
            404 => Err(OriginError::NotFound(obj.key.clone())),
            412 => Err(OriginError::Changed(obj.key.clone())),
            code => Err(OriginError::Request(format!("checksum lookup: HTTP {code}"))),
        }
    }

    fn parse(&self, h: &HeaderMap) -> Lookup {
        match parse_headers(h) {
            Lookup::Found(kind, _) if kind != self.kind => {
                Lookup::Unavailable(format!("the origin publishes {} but this agent keeps {}", kind.name(), self.kind.name()))
            }
            other => other,
        }
    }
}

/// The whole-object CRC-64 in a HEAD answer's headers.
pub fn parse_headers(h: &HeaderMap) -> Lookup {
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(v) = text("x-amz-checksum-crc64nvme") {
        let bytes = base64::engine::general_purpose::STANDARD.decode(v).ok();
        return match bytes.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok()) {
            Some(b) => Lookup::Found(Crc64Kind::Nvme, u64::from_be_bytes(b)),
            None => Lookup::Unavailable(format!("malformed x-amz-checksum-crc64nvme {v:?}")),
        };
    }
    if let Some(v) = text("x-oss-hash-crc64ecma") {
        return match v.parse::<u64>() {
            Ok(n) => Lookup::Found(Crc64Kind::Ecma, n),
            Err(_) => Lookup::Unavailable(format!("malformed x-oss-hash-crc64ecma {v:?}")),
        };
    }
    if h.contains_key("x-amz-checksum-sha256") || h.contains_key("x-amz-checksum-crc32c") || h.contains_key("x-amz-checksum-crc32") {
        return Lookup::Unavailable("the origin publishes only a checksum that cannot be combined from chunks (SHA-256 or CRC-32)".into());
    }
    Lookup::Unavailable("the origin publishes no whole-object checksum for this object".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_and_oss_headers() {
        let data = b"hello, checksum";
        let nvme = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, data);
        let mut h = HeaderMap::new();
        h.insert("x-amz-checksum-crc64nvme", base64::engine::general_purpose::STANDARD.encode(nvme.to_be_bytes()).parse().unwrap());
        assert_eq!(parse_headers(&h), Lookup::Found(Crc64Kind::Nvme, nvme));
        let mut h = HeaderMap::new();
        // Alibaba OSS's documented value for "123456789"-style checks is the CRC-64 of xz.
        let ecma = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Xz, b"123456789");
        assert_eq!(ecma, 0x995dc9bbdf1939fa);
        h.insert("x-oss-hash-crc64ecma", ecma.to_string().parse().unwrap());
        assert_eq!(parse_headers(&h), Lookup::Found(Crc64Kind::Ecma, ecma));
        let mut h = HeaderMap::new();
        h.insert("x-amz-checksum-sha256", "abc=".parse().unwrap());
        assert!(matches!(parse_headers(&h), Lookup::Unavailable(m) if m.contains("SHA-256")));
        assert!(matches!(parse_headers(&HeaderMap::new()), Lookup::Unavailable(_)));
        let mut h = HeaderMap::new();
        h.insert("x-amz-checksum-crc64nvme", "not base64!".parse().unwrap());
        assert!(matches!(parse_headers(&h), Lookup::Unavailable(m) if m.contains("malformed")));
    }
}
