//! Secrets out of what is shown: a source URL as it may be logged, put in `/status` and told to
//! peers.
//!
//! # Contract
//! [`source`] drops a URL's user name and password and replaces every query value with
//! `REDACTED`; scheme, host, port and path stay, so two agents with one origin still compare
//! equal. Text that is not a URL (a bare directory) is returned as it is.

/// `s3://KEY:SECRET@bucket/p?X-Amz-Signature=abc` → `s3://bucket/p?X-Amz-Signature=REDACTED`.
pub fn source(s: &str) -> String {
    let Ok(mut u) = url::Url::parse(s) else { return s.to_string() };
    if u.cannot_be_a_base() {
        return s.to_string();
    }
    let _ = u.set_username("");
    let _ = u.set_password(None);
    if u.query().is_some() {
        let keys: Vec<String> = u.query_pairs().map(|(k, _)| k.into_owned()).collect();
        let mut q = u.query_pairs_mut();
        q.clear();
        for k in keys {
            q.append_pair(&k, "REDACTED");
        }
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_and_query_values_go() {
        assert_eq!(super::source("s3://AKIA:s3cr3t@models/llama"), "s3://models/llama");
        assert_eq!(super::source("https://u:p@h.example:8443/m?sig=abc&x=1"), "https://h.example:8443/m?sig=REDACTED&x=REDACTED");
        assert_eq!(super::source("/data/models"), "/data/models");
        assert_eq!(super::source("file:///data/models"), "file:///data/models");
        assert_eq!(super::source("s3://bucket/prefix"), "s3://bucket/prefix");
    }
}
