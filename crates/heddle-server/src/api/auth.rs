//! API keys and their priority tiers.
//!
//! With no keys configured every caller is anonymous: any priority, admin routes open
//! (the default bind address is loopback). With keys, every `/v1` and `/admin` request
//! needs `Authorization: Bearer <key>`; the key decides the default priority, which
//! priorities the request may ask for (asking for another is 403 `permission_error`,
//! since the request is well-formed but not allowed) and whether admin routes are open.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use heddle_core::Priority;

use super::errors::ApiError;
use super::AppState;

/// What one configured key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTier {
    pub default_priority: Priority,
    /// The priorities a request with this key may ask for.
    pub allowed: Vec<Priority>,
    pub admin: bool,
}

impl KeyTier {
    /// A tier named by its priority: that priority by default, and it or anything less
    /// urgent on request.
    pub fn at(priority: Priority) -> Self {
        KeyTier {
            default_priority: priority,
            allowed: Priority::ALL
                .into_iter()
                .filter(|p| *p >= priority)
                .collect(),
            admin: false,
        }
    }

    /// Every priority, admin routes included.
    pub fn unrestricted() -> Self {
        KeyTier {
            default_priority: Priority::Normal,
            allowed: Priority::ALL.to_vec(),
            admin: true,
        }
    }
}

/// A configured key and its tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub key: String,
    pub tier: KeyTier,
}

/// The configured keys.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        ApiKeys { keys }
    }

    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The tier of `presented`, comparing against every key in constant time per key so
    /// that response times do not reveal how much of a key was right.
    fn tier_of(&self, presented: &str) -> Option<&KeyTier> {
        let mut found = None;
        for key in &self.keys {
            if constant_time_eq(key.key.as_bytes(), presented.as_bytes()) {
                found = Some(&key.tier);
            }
        }
        found
    }

    /// Who is calling, from the request's `Authorization` header.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        if !self.is_enabled() {
            return Ok(Caller::Anonymous);
        }
        let Some(value) = authorization else {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ));
        };
        let presented = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .unwrap_or_default();
        match self.tier_of(presented) {
            Some(tier) => Ok(Caller::Key(tier.clone())),
            None => Err(ApiError::unauthorized("Incorrect API key provided.")),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No keys are configured.
    Anonymous,
    Key(KeyTier),
}

impl Caller {
    /// The request's priority: the one it asked for (if its key allows it), else its
    /// key's default, else NORMAL.
    pub fn priority(&self, requested: Option<Priority>) -> Result<Priority, ApiError> {
        match (self, requested) {
            (Caller::Anonymous, requested) => Ok(requested.unwrap_or_default()),
            (Caller::Key(tier), None) => Ok(tier.default_priority),
            (Caller::Key(tier), Some(priority)) if tier.allowed.contains(&priority) => Ok(priority),
            (Caller::Key(_), Some(priority)) => Err(ApiError::forbidden(
                Some("priority"),
                format!("This API key may not ask for priority \"{priority}\"."),
            )),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Anonymous => Ok(()),
            Caller::Key(tier) if tier.admin => Ok(()),
            Caller::Key(_) => Err(ApiError::forbidden(
                None,
                "This API key may not use admin routes.",
            )),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let authorization = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        state.keys.authenticate(authorization)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn keys() -> ApiKeys {
        ApiKeys::new(vec![
            ApiKey {
                key: "sk-batch".into(),
                tier: KeyTier::at(Priority::Low),
            },
            ApiKey {
                key: "sk-owner".into(),
                tier: KeyTier::unrestricted(),
            },
        ])
    }

    #[test]
    fn without_keys_everyone_is_anonymous_and_may_ask_anything() {
        let caller = ApiKeys::default().authenticate(None).unwrap();
        assert_eq!(caller, Caller::Anonymous);
        assert_eq!(
            caller.priority(Some(Priority::High)).unwrap(),
            Priority::High
        );
        assert_eq!(caller.priority(None).unwrap(), Priority::Normal);
    }

    #[test]
    fn missing_and_wrong_keys_are_401() {
        let keys = keys();
        for header in [
            None,
            Some("Bearer sk-nope"),
            Some("sk-batch"),
            Some("Bearer "),
        ] {
            let error = keys.authenticate(header).unwrap_err();
            assert_eq!(error.status, StatusCode::UNAUTHORIZED, "{header:?}");
        }
    }

    #[test]
    fn a_tier_sets_the_default_and_forbids_more_urgent_priorities() {
        let batch = keys().authenticate(Some("Bearer sk-batch")).unwrap();
        assert_eq!(batch.priority(None).unwrap(), Priority::Low);
        assert_eq!(batch.priority(Some(Priority::Low)).unwrap(), Priority::Low);
        let error = batch.priority(Some(Priority::High)).unwrap_err();
        assert_eq!(error.status, StatusCode::FORBIDDEN);
        assert!(batch.require_admin().is_err());
        let owner = keys().authenticate(Some("Bearer sk-owner")).unwrap();
        assert_eq!(
            owner.priority(Some(Priority::High)).unwrap(),
            Priority::High
        );
        assert!(owner.require_admin().is_ok());
    }
}
