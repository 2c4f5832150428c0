//! Who may call what: API keys, the route groups they open, and priority tiers.
//!
//! One layer over the whole router puts every request in a route group by its path, so a
//! route added later is never public by mistake: only the two probes are.
//!
//! | group   | paths                        | keys accepted            | none of its keys configured    |
//! |---------|------------------------------|--------------------------|--------------------------------|
//! | public  | `/health`, `/ready`          | none needed              |                                |
//! | API     | `/v1/*` and every other path | API keys, admin keys     | open                           |
//! | admin   | `/admin`, `/admin/*`         | admin keys               | off (403), or open on loopback |
//! | metrics | `/metrics`                   | metrics keys, admin keys | open                           |
//!
//! "Open on loopback" is the `admin_on_loopback` setting, which the server accepts only
//! when it listens on a loopback address. A missing or unknown key is 401
//! `authentication_error`; a valid key of another group is 403 `permission_error`. An API
//! key's tier sets its requests' default priority and which priorities they may ask for
//! (asking for another is 403 too); admin keys may ask for any.
//!
//! Keys are kept only as SHA-256 digests. A presented key is hashed and its digest compared
//! with every stored one in constant time, so response times tell neither a key's length
//! nor how much of it was right.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use heddle_core::Priority;

use super::errors::ApiError;
use super::AppState;

/// The priorities an API key's requests get and may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTier {
    pub default_priority: Priority,
    /// The priorities a request with this key may ask for.
    pub allowed: Vec<Priority>,
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
        }
    }

    /// NORMAL by default, any priority on request.
    pub fn any() -> Self {
        KeyTier {
            default_priority: Priority::Normal,
            allowed: Priority::ALL.to_vec(),
        }
    }
}

/// An API key (for the `/v1` routes) and its tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub key: String,
    pub tier: KeyTier,
}

/// Which keys a request's path calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteGroup {
    Public,
    Api,
    Admin,
    Metrics,
}

impl RouteGroup {
    /// The group of a request path. Anything not named here is in the API group: unknown
    /// paths and new routes need an API key whenever API keys are configured.
    pub fn of(path: &str) -> Self {
        match path {
            "/health" | "/ready" => RouteGroup::Public,
            "/metrics" => RouteGroup::Metrics,
            "/admin" => RouteGroup::Admin,
            _ if path.starts_with("/admin/") => RouteGroup::Admin,
            _ => RouteGroup::Api,
        }
    }
}

/// What a configured key opens.
#[derive(Debug, Clone)]
enum Role {
    Api(KeyTier),
    Admin,
    Metrics,
}

#[derive(Debug, Clone)]
struct StoredKey {
    digest: [u8; 32],
    role: Role,
}

/// How the admin routes are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AdminAccess {
    /// With an admin key.
    Keys,
    /// By anyone who reaches the server, which listens on loopback only.
    Loopback,
    Off,
}

/// The configured keys and what each route group requires.
#[derive(Debug, Clone)]
pub struct AccessControl {
    keys: Vec<StoredKey>,
    api_open: bool,
    metrics_open: bool,
    admin: AdminAccess,
}

impl Default for AccessControl {
    /// No keys: the API and /metrics open, admin routes off.
    fn default() -> Self {
        AccessControl::new(Vec::new(), Vec::new(), Vec::new(), false)
    }
}

impl AccessControl {
    /// `admin_on_loopback` opens the admin routes without a key when no admin key is
    /// configured; the server checks that it listens on loopback only before using it.
    pub fn new(
        api_keys: Vec<ApiKey>,
        admin_keys: Vec<String>,
        metrics_keys: Vec<String>,
        admin_on_loopback: bool,
    ) -> Self {
        let admin = if !admin_keys.is_empty() {
            AdminAccess::Keys
        } else if admin_on_loopback {
            AdminAccess::Loopback
        } else {
            AdminAccess::Off
        };
        let (api_open, metrics_open) = (api_keys.is_empty(), metrics_keys.is_empty());
        let stored = |key: &str, role: Role| StoredKey {
            digest: Sha256::digest(key.as_bytes()).into(),
            role,
        };
        let keys = api_keys
            .iter()
            .map(|k| stored(&k.key, Role::Api(k.tier.clone())))
            .chain(admin_keys.iter().map(|k| stored(k, Role::Admin)))
            .chain(metrics_keys.iter().map(|k| stored(k, Role::Metrics)))
            .collect();
        AccessControl {
            keys,
            api_open,
            metrics_open,
            admin,
        }
    }

    /// The role of a presented key. Every stored digest is compared, in constant time.
    fn role_of(&self, presented: &str) -> Option<&Role> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(&key.role);
            }
        }
        found
    }

    /// Whose files and batches a caller of an API route sees: everyone's when the API
    /// needs no key or the key is an admin key, else the key's own.
    pub fn scope(&self, group: RouteGroup, authorization: Option<&str>) -> Scope {
        if group != RouteGroup::Api || self.api_open {
            return Scope::All;
        }
        let Some(presented) = authorization.and_then(bearer_token) else {
            return Scope::All;
        };
        match self.role_of(presented) {
            Some(Role::Api(_)) => {
                let digest = Sha256::digest(presented.as_bytes());
                Scope::Key(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
            }
            _ => Scope::All,
        }
    }

    /// Who is calling a route of `group`, given the request's `Authorization` header.
    pub fn authorize(
        &self,
        group: RouteGroup,
        authorization: Option<&str>,
    ) -> Result<Caller, ApiError> {
        let open = match group {
            RouteGroup::Public => true,
            RouteGroup::Api => self.api_open,
            RouteGroup::Metrics => self.metrics_open,
            RouteGroup::Admin => match self.admin {
                AdminAccess::Keys => false,
                AdminAccess::Loopback => true,
                AdminAccess::Off => return Err(admin_disabled()),
            },
        };
        if open {
            return Ok(Caller::Anonymous);
        }
        let Some(presented) = authorization.and_then(bearer_token) else {
            return Err(ApiError::unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ));
        };
        let Some(role) = self.role_of(presented) else {
            return Err(ApiError::unauthorized("Incorrect API key provided."));
        };
        match (group, role) {
            (_, Role::Admin) | (RouteGroup::Metrics, Role::Metrics) => {
                Ok(Caller::Key(KeyTier::any()))
            }
            (RouteGroup::Api, Role::Api(tier)) => Ok(Caller::Key(tier.clone())),
            (RouteGroup::Admin, _) => Err(ApiError::forbidden(
                None,
                "This API key may not use admin routes.",
            )),
            (RouteGroup::Metrics, _) => Err(ApiError::forbidden(
                None,
                "This API key may not read /metrics.",
            )),
            // A metrics key on an API route (public routes returned above).
            _ => Err(ApiError::forbidden(
                None,
                "This key may only read /metrics.",
            )),
        }
    }
}

/// The key of an `Authorization: Bearer <key>` header (the scheme in any case).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn admin_disabled() -> ApiError {
    let mut error = ApiError::forbidden(
        None,
        "Admin routes are off. Start heddle with --admin-api-key to use them (or with \
         --admin-on-loopback when it listens on a loopback address).",
    );
    error.code = Some("admin_disabled");
    error
}

/// The namespace of a caller's files and batches (see [`AccessControl::scope`]). A
/// key's namespace is named by a prefix of its SHA-256 digest, never by the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Key(String),
}

impl Scope {
    /// The owner recorded on what this caller creates: None when it is everyone's.
    pub fn owner(&self) -> Option<String> {
        match self {
            Scope::All => None,
            Scope::Key(owner) => Some(owner.clone()),
        }
    }

    /// Whether this caller sees an object of `owner`.
    pub fn sees(&self, owner: Option<&str>) -> bool {
        match self {
            Scope::All => true,
            Scope::Key(mine) => owner == Some(mine.as_str()),
        }
    }
}

/// The caller of a request, as the access layer found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The route group needs no key here.
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
}

/// The layer every request passes before routing: finds its route group, checks its key,
/// and leaves the [`Caller`] for the handlers.
pub async fn check_access(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let group = RouteGroup::of(request.uri().path());
    let authorization = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    match state.access.authorize(group, authorization) {
        Ok(caller) => {
            let scope = state.access.scope(group, authorization);
            request.extensions_mut().insert(caller);
            request.extensions_mut().insert(scope);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::internal("The request skipped the access check."))
    }
}

impl FromRequestParts<AppState> for Scope {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Scope>()
            .cloned()
            .ok_or_else(|| ApiError::internal("The request skipped the access check."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn with_keys(admin_on_loopback: bool) -> AccessControl {
        AccessControl::new(
            vec![
                ApiKey {
                    key: "sk-batch".into(),
                    tier: KeyTier::at(Priority::Low),
                },
                ApiKey {
                    key: "sk-app".into(),
                    tier: KeyTier::any(),
                },
            ],
            vec!["sk-owner".into()],
            vec!["sk-scraper".into()],
            admin_on_loopback,
        )
    }

    fn status(access: &AccessControl, path: &str, header: Option<&str>) -> StatusCode {
        match access.authorize(RouteGroup::of(path), header) {
            Ok(_) => StatusCode::OK,
            Err(error) => error.status,
        }
    }

    #[test]
    fn paths_fall_in_groups_and_anything_unnamed_is_api() {
        assert_eq!(RouteGroup::of("/health"), RouteGroup::Public);
        assert_eq!(RouteGroup::of("/ready"), RouteGroup::Public);
        assert_eq!(RouteGroup::of("/metrics"), RouteGroup::Metrics);
        assert_eq!(RouteGroup::of("/admin/models"), RouteGroup::Admin);
        assert_eq!(RouteGroup::of("/admin"), RouteGroup::Admin);
        for path in [
            "/v1/models",
            "/",
            "/health/",
            "/metrics/x",
            "/administer",
            "//admin",
        ] {
            assert_eq!(RouteGroup::of(path), RouteGroup::Api, "{path}");
        }
    }

    #[test]
    fn without_keys_the_api_and_metrics_are_open_and_admin_is_off() {
        let access = AccessControl::default();
        let caller = access.authorize(RouteGroup::Api, None).unwrap();
        assert_eq!(caller, Caller::Anonymous);
        assert_eq!(
            caller.priority(Some(Priority::High)).unwrap(),
            Priority::High
        );
        // OpenAI clients send some key even to an open server.
        assert!(access
            .authorize(RouteGroup::Api, Some("Bearer unused"))
            .is_ok());
        assert_eq!(status(&access, "/metrics", None), StatusCode::OK);
        let error = access.authorize(RouteGroup::Admin, None).unwrap_err();
        assert_eq!(error.status, StatusCode::FORBIDDEN);
        assert_eq!(error.code, Some("admin_disabled"));
        let loopback = AccessControl::new(Vec::new(), Vec::new(), Vec::new(), true);
        assert_eq!(status(&loopback, "/admin/models", None), StatusCode::OK);
    }

    #[test]
    fn missing_and_wrong_keys_are_401_in_every_keyed_group() {
        let access = with_keys(false);
        for path in ["/v1/models", "/admin/models", "/metrics", "/v1/unknown"] {
            for header in [
                None,
                Some("Bearer sk-nope"),
                Some("sk-batch"),
                Some("Bearer "),
                Some("Basic sk-batch"),
                Some("Bearer sk-batc"),
                Some("Bearer sk-batchx"),
            ] {
                assert_eq!(
                    status(&access, path, header),
                    StatusCode::UNAUTHORIZED,
                    "{path} {header:?}"
                );
            }
        }
        assert_eq!(status(&access, "/health", None), StatusCode::OK);
    }

    #[test]
    fn each_api_key_has_its_own_scope_and_admin_keys_see_all() {
        let access = with_keys(false);
        let scope = |key: &str| access.scope(RouteGroup::Api, Some(&format!("Bearer {key}")));
        let (batch, app) = (scope("sk-batch"), scope("sk-app"));
        assert!(matches!(&batch, Scope::Key(id) if id.len() == 16 && !id.contains("sk-")));
        assert_ne!(batch, app);
        assert_eq!(batch, scope("sk-batch"));
        assert_eq!(scope("sk-owner"), Scope::All);
        assert!(batch.sees(batch.owner().as_deref()) && !batch.sees(app.owner().as_deref()));
        assert!(!batch.sees(None) && Scope::All.sees(batch.owner().as_deref()));
        let open = AccessControl::default();
        assert_eq!(
            open.scope(RouteGroup::Api, Some("Bearer sk-batch")),
            Scope::All
        );
    }

    #[test]
    fn each_key_opens_its_own_groups() {
        let access = with_keys(false);
        let cases = [
            ("sk-batch", "/v1/models", StatusCode::OK),
            ("sk-batch", "/admin/models", StatusCode::FORBIDDEN),
            ("sk-batch", "/metrics", StatusCode::FORBIDDEN),
            ("sk-owner", "/v1/models", StatusCode::OK),
            ("sk-owner", "/admin/models", StatusCode::OK),
            ("sk-owner", "/metrics", StatusCode::OK),
            ("sk-scraper", "/metrics", StatusCode::OK),
            ("sk-scraper", "/v1/models", StatusCode::FORBIDDEN),
            ("sk-scraper", "/admin/models", StatusCode::FORBIDDEN),
        ];
        for (key, path, expected) in cases {
            let header = format!("bearer {key}");
            assert_eq!(
                status(&access, path, Some(&header)),
                expected,
                "{key} {path}"
            );
        }
        // With admin keys configured, admin_on_loopback does not open the routes.
        let with_both = with_keys(true);
        assert_eq!(
            status(&with_both, "/admin/models", None),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn a_tier_sets_the_default_and_forbids_more_urgent_priorities() {
        let access = with_keys(false);
        let batch = access
            .authorize(RouteGroup::Api, Some("Bearer sk-batch"))
            .unwrap();
        assert_eq!(batch.priority(None).unwrap(), Priority::Low);
        assert_eq!(batch.priority(Some(Priority::Low)).unwrap(), Priority::Low);
        let error = batch.priority(Some(Priority::High)).unwrap_err();
        assert_eq!(error.status, StatusCode::FORBIDDEN);
        let owner = access
            .authorize(RouteGroup::Api, Some("Bearer sk-owner"))
            .unwrap();
        assert_eq!(
            owner.priority(Some(Priority::High)).unwrap(),
            Priority::High
        );
    }
}
