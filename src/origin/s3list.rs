//! Listing an S3-compatible bucket (ListObjectsV2) key by key, so one key that cannot be a file
//! path here does not take the listing down.
//!
//! # Contract
//! - [`S3Lister::list`] returns every object under the prefix whose key is a valid path
//!   (`object_store::path::Path::parse`), in the order the store lists them, and the keys it
//!   skipped (empty segments as in `a//b`, `.` or `..` segments, control characters).
//! - Each page is one presigned GET (`encoding-type=url`, so any key survives the XML) with a
//!   timeout of [`super::LIST_PAGE_TIMEOUT`], retried on transport errors and `5xx` a bounded
//!   number of times; a prefix of any size lists as long as its pages keep coming.

use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use object_store::path::Path;
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::ObjectMeta;
use serde::Deserialize;

use super::{OriginError, ATTEMPTS, LIST_PAGE_TIMEOUT};

/// One page of a ListObjectsV2 answer (the fields used here).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Page {
    #[serde(default)]
    contents: Vec<Entry>,
    #[serde(default)]
    is_truncated: bool,
    next_continuation_token: Option<String>,
    encoding_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    key: String,
    size: u64,
    last_modified: chrono::DateTime<chrono::Utc>,
    #[serde(rename = "ETag")]
    e_tag: Option<String>,
}

/// What a listing found: the objects, and the keys that cannot be paths here.
#[derive(Debug, Default)]
pub struct Listing {
    pub objects: Vec<ObjectMeta>,
    pub skipped: Vec<String>,
}

pub struct S3Lister {
    s3: Arc<object_store::aws::AmazonS3>,
    client: reqwest::Client,
}

impl S3Lister {
    pub fn new(s3: Arc<object_store::aws::AmazonS3>) -> Result<Self, OriginError> {
        Ok(S3Lister { s3, client: super::http_client(LIST_PAGE_TIMEOUT)? })
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &Path) -> Result<Listing, OriginError> {
        let prefix = if prefix.as_ref().is_empty() { String::new() } else { format!("{prefix}/") };
        let mut out = Listing::default();
        let mut token: Option<String> = None;
        loop {
            let page = self.page(&prefix, token.as_deref()).await?;
            out.objects.extend(page.listing.objects);
            out.skipped.extend(page.listing.skipped);
            match page.next {
                Some(t) if token.as_ref() == Some(&t) => {
                    return Err(OriginError::Request(format!("listing: the store sent continuation token {t:?} twice")));
                }
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    /// One page, retried on transport errors and server errors.
    async fn page(&self, prefix: &str, token: Option<&str>) -> Result<ListPage, OriginError> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.page_once(prefix, token).await {
                Err(Retry::Yes(e)) if attempt < ATTEMPTS => {
                    tracing::warn!(attempt, error = %e, "listing page failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                    attempt += 1;
                }
                Err(Retry::Yes(e)) | Err(Retry::No(e)) => return Err(e),
                Ok(p) => return Ok(p),
            }
        }
    }

    async fn page_once(&self, prefix: &str, token: Option<&str>) -> Result<ListPage, Retry> {
        let mut query = vec![("list-type", "2"), ("encoding-type", "url")];
        if !prefix.is_empty() {
            query.push(("prefix", prefix));
        }
        if let Some(t) = token {
            query.push(("continuation-token", t));
        }
        let opts = SignedUrlOptions::new().with_query(query);
        let url = self
            .s3
            .signed_url_opts(Method::GET, &Path::default(), Duration::from_secs(300), &opts)
            .await
            .map_err(|e| Retry::No(OriginError::Request(crate::error::one_line(e))))?;
        let transport = |e: reqwest::Error| Retry::Yes(OriginError::Request(format!("listing: {}", e.without_url())));
        let r = self.client.get(url).send().await.map_err(transport)?;
        let status = r.status().as_u16();
        let body = r.bytes().await.map_err(transport)?;
        match status {
            200 => read_page(&body).map_err(Retry::No),
            500.. => Err(Retry::Yes(OriginError::Request(format!("listing: HTTP {status}")))),
            _ => Err(Retry::No(OriginError::Request(format!(
                "listing: HTTP {status}: {}",
                crate::error::one_line(String::from_utf8_lossy(&body[..body.len().min(300)]))
            )))),
        }
    }
}

/// One page of a listing as read: what it lists, and the token of the next page if any.
#[derive(Debug, Default)]
pub struct ListPage {
    pub listing: Listing,
    pub next: Option<String>,
}

/// A ListObjectsV2 answer body: its objects whose keys are valid paths, the keys that are not,
/// and the next page's token; an unreadable body is an error.
pub fn read_page(body: &[u8]) -> Result<ListPage, OriginError> {
    let page: Page = quick_xml::de::from_reader(body)
        .map_err(|e| OriginError::Request(crate::error::one_line(format!("listing: unreadable answer: {e}"))))?;
    let url_encoded = page.encoding_type.as_deref().is_some_and(|e| e.eq_ignore_ascii_case("url"));
    let mut listing = Listing::default();
    for e in page.contents {
        let key = if url_encoded { decode(&e.key) } else { e.key };
        match Path::parse(&key) {
            Ok(location) => {
                listing.objects.push(ObjectMeta { location, last_modified: e.last_modified, size: e.size, e_tag: e.e_tag, version: None })
            }
            Err(_) => listing.skipped.push(key),
        }
    }
    let next = page.next_continuation_token.filter(|t| page.is_truncated && !t.is_empty());
    Ok(ListPage { listing, next })
}

enum Retry {
    Yes(OriginError),
    No(OriginError),
}

/// A key of a listing with `encoding-type=url` (`+` is a space, as S3 writes it).
fn decode(key: &str) -> String {
    let plus = key.replace('+', " ");
    percent_encoding::percent_decode_str(&plus).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_parses_and_url_encoded_keys_decode() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated><NextContinuationToken>t2</NextContinuationToken><Contents><Key>p/a%2F%2Fb+c%01</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified><ETag>&quot;e1&quot;</ETag><Size>5</Size></Contents><Contents><Key>p/ok.bin</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified><Size>7</Size></Contents></ListBucketResult>"#;
        let page: Page = quick_xml::de::from_str(xml).unwrap();
        assert!(page.is_truncated);
        assert_eq!(page.contents.len(), 2);
        assert_eq!(decode(&page.contents[0].key), "p/a//b c\u{1}");
        let read = read_page(xml.as_bytes()).unwrap();
        assert_eq!(read.next.as_deref(), Some("t2"));
        assert_eq!(read.listing.skipped, vec!["p/a//b c\u{1}".to_string()]);
        assert_eq!(read.listing.objects.len(), 1);
        assert_eq!(read.listing.objects[0].location.as_ref(), "p/ok.bin");
        assert_eq!(read.listing.objects[0].size, 7);
        assert!(read_page(b"<ListBucketResult><Contents><Key>k</Key></Contents>").is_err());
        let empty: Page = quick_xml::de::from_str("<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>").unwrap();
        assert!(empty.contents.is_empty());
    }
}
