//! `auto`: ask every cloud's metadata service at once (short timeouts) which one this is. Only
//! run when configured: a laptop or CI machine never probes metadata addresses.

use std::time::Duration;

use reqwest::Method;

use super::http::Meta;
use super::Provider;

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn answers(p: Provider, endpoint: Option<&str>) -> bool {
    let Ok(meta) = Meta::new(endpoint.unwrap_or(p.default_endpoint()), PROBE_TIMEOUT) else { return false };
    let ok = |a: &super::http::Answer| a.status == 200 && !a.body.trim().is_empty();
    match p {
        // Alibaba serves region-id; AWS does not (its region is under placement/).
        Provider::Aliyun => meta.send(meta.request(Method::GET, "/latest/meta-data/region-id")).await.is_ok_and(|a| ok(&a)),
        Provider::Aws => {
            let token = meta
                .send(meta.request(Method::PUT, "/latest/api/token").header("X-aws-ec2-metadata-token-ttl-seconds", "60"))
                .await
                .ok()
                .filter(|a| a.status == 200)
                .map(|a| a.body.trim().to_string());
            let mut req = meta.request(Method::GET, "/latest/meta-data/placement/region");
            if let Some(t) = &token {
                req = req.header("X-aws-ec2-metadata-token", t.as_str());
            }
            meta.send(req).await.is_ok_and(|a| ok(&a))
        }
        // The answer must carry the flavor header: anything else on that name is not GCE.
        Provider::Gcp => meta
            .send(meta.request(Method::GET, "/computeMetadata/v1/instance/id").header("Metadata-Flavor", "Google"))
            .await
            .is_ok_and(|a| ok(&a) && a.headers.get("Metadata-Flavor").is_some_and(|v| v == "Google")),
        Provider::Azure => meta
            .send(
                meta.request(Method::GET, "/metadata/instance/compute/name?api-version=2021-02-01&format=text").header("Metadata", "true"),
            )
            .await
            .is_ok_and(|a| ok(&a)),
        Provider::None | Provider::Auto => false,
    }
}

/// The cloud whose metadata service answers (all probed in parallel), if any.
pub async fn detect(endpoint: Option<&str>) -> Option<Provider> {
    let order = [Provider::Gcp, Provider::Azure, Provider::Aliyun, Provider::Aws];
    let found = futures::future::join_all(order.iter().map(|p| answers(*p, endpoint))).await;
    order.into_iter().zip(found).find(|(_, ok)| *ok).map(|(p, _)| p)
}
