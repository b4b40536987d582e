//! Who is asking: `Authorization: Bearer KEY`, hashed with SHA-256 and compared in constant
//! time against every configured tenant's hash (all of them, so the time taken does not say
//! which tenant came close). Without configured tenants everyone is the anonymous tenant.

use axum::http::HeaderMap;
use sha2::Digest;
use subtle::ConstantTimeEq;

use super::config::Tenant;
use super::status::ApiError;

/// The tenant the request's key belongs to, or 401.
pub fn tenant<'a>(tenants: &'a [Tenant], headers: &HeaderMap) -> Result<&'a Tenant, ApiError> {
    if let [only] = tenants {
        if only.key_sha256.is_none() {
            return Ok(only);
        }
    }
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
        ));
    };
    let key = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized("The Authorization header must be `Bearer KEY`."))?;
    let hash: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
    let mut found = None;
    for tenant in tenants {
        if let Some(expected) = &tenant.key_sha256 {
            if bool::from(expected.ct_eq(&hash)) {
                found = Some(tenant);
            }
        }
    }
    found.ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::config::TenantRates;
    use crate::Limits;

    fn keyed(name: &str, key: &str) -> Tenant {
        Tenant {
            name: name.into(),
            key_sha256: Some(
                hex::decode(crate::serve::hash_key(key))
                    .unwrap()
                    .try_into()
                    .unwrap(),
            ),
            limits: Limits::default(),
            rates: TenantRates::default(),
        }
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
        headers
    }

    #[test]
    fn keys_find_their_tenant_and_others_are_401() {
        let tenants = [keyed("a", "key-a"), keyed("b", "key-b")];
        assert_eq!(tenant_name(&tenants, &bearer("key-b")), Ok("b"));
        assert_eq!(tenant_name(&tenants, &bearer("key-a")), Ok("a"));
        assert_eq!(tenant_name(&tenants, &bearer("key-c")), Err(401));
        assert_eq!(tenant_name(&tenants, &HeaderMap::new()), Err(401));
        let mut basic = HeaderMap::new();
        basic.insert("authorization", "Basic a2V5LWE=".parse().unwrap());
        assert_eq!(tenant_name(&tenants, &basic), Err(401));
    }

    fn tenant_name<'a>(tenants: &'a [Tenant], headers: &HeaderMap) -> Result<&'a str, u16> {
        tenant(tenants, headers)
            .map(|t| t.name.as_str())
            .map_err(|e| e.status.as_u16())
    }

    #[test]
    fn the_sha256_of_a_known_key() {
        assert_eq!(
            crate::serve::hash_key("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
