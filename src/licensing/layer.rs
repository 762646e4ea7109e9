//! The tower layer that turns an authoring or admin request into a [`Principal`]: the verified
//! identity (cached JWT verification) and how the user is licensed. Anonymous channel routes
//! never pass through it. Handlers then ask for what they need with the [`Author`], [`Admin`]
//! or [`Caller`] extractors.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{Request, StatusCode, header};
use tower::{Layer, Service};

use super::model::{Denial, Grant};
use super::{Licensing, denial_error};
use crate::error::ApiError;
use crate::identity::Identity;
use crate::identity::jwt::{JwtError, Verifier};

/// Who is calling and how they are licensed.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The verified identity.
    pub identity: Arc<Identity>,
    /// The license, or why there is none.
    pub license: Result<Grant, Denial>,
    /// Whether the gateway knows the token's tenant.
    pub tenant_known: bool,
}

/// Builds [`AuthorAuth`] services.
#[derive(Clone)]
pub struct AuthorLayer {
    verifier: Arc<Verifier>,
    licensing: Arc<Licensing>,
}

impl AuthorLayer {
    /// A layer checking tokens with `verifier` and licenses with `licensing`.
    pub fn new(verifier: Arc<Verifier>, licensing: Arc<Licensing>) -> Self {
        Self { verifier, licensing }
    }
}

impl<S> Layer<S> for AuthorLayer {
    type Service = AuthorAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthorAuth { inner, verifier: self.verifier.clone(), licensing: self.licensing.clone() }
    }
}

/// Authenticates the request and attaches its [`Principal`]; refuses with 401 otherwise.
#[derive(Clone)]
pub struct AuthorAuth<S> {
    inner: S,
    verifier: Arc<Verifier>,
    licensing: Arc<Licensing>,
}

fn unauthorized(code: &'static str, message: impl Into<std::borrow::Cow<'static, str>>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

impl<S> Service<Request<Body>> for AuthorAuth<S>
where
    S: Service<Request<Body>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // The clone that was made ready is the one called (tower's clone-and-swap idiom).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        let licensing = self.licensing.clone();
        Box::pin(async move {
            let identity = match authenticate(&verifier, &req) {
                Ok(Ok(id)) => id,
                // Only now is the token copied: the request is not held across the wait.
                Ok(Err(token)) => match verifier.verify_fetching(&token).await {
                    Ok(id) => id,
                    Err(e) => return Ok(jwt_refused(e).into_response()),
                },
                Err(e) => return Ok(e.into_response()),
            };
            let license = licensing.resolve(&identity).await;
            let tenant_known = licensing.tenant(&identity.tenant).is_some();
            req.extensions_mut().insert(Principal { identity, license, tenant_known });
            inner.call(req).await
        })
    }
}

/// The verified identity, or the token when it names a key id not held (the caller fetches the
/// keys and tries again), or the refusal.
fn authenticate(verifier: &Verifier, req: &Request<Body>) -> Result<Result<Arc<Identity>, String>, ApiError> {
    let value = req.headers().get(header::AUTHORIZATION).ok_or_else(|| {
        unauthorized("MissingToken", "Send `Authorization: Bearer <token>` with a token from your identity provider (or `botgate token`).")
    })?;
    let token = crate::identity::bearer_value(value).ok_or_else(|| {
        unauthorized("MalformedAuthorization", "The Authorization header must be `Bearer <token>`.")
    })?;
    match verifier.verify(token) {
        Ok(id) => Ok(Ok(id)),
        Err(JwtError::UnknownKey(_)) => Ok(Err(token.to_string())),
        Err(e) => Err(jwt_refused(e)),
    }
}

/// The 401 answer for a JWT the verifier refused.
pub fn jwt_refused(e: JwtError) -> ApiError {
    match e {
        JwtError::Expired => {
            unauthorized("TokenExpired", "Your token has expired. Sign in again to get a new one.")
        }
        JwtError::Invalid(why) => unauthorized("InvalidToken", format!("The token was refused: {why}.")),
        e @ JwtError::UnknownKey(_) => unauthorized("InvalidToken", format!("The token was refused: {e}.")),
    }
}

fn principal(parts: &Parts) -> Result<Principal, ApiError> {
    parts.extensions.get::<Principal>().cloned().ok_or_else(|| {
        tracing::error!("An authoring route was reached without the author layer.");
        ApiError::internal()
    })
}

/// Any authenticated caller (licensed or not).
pub struct Caller(pub Principal);

/// A licensed author (direct, group or trial).
pub struct Author(pub Principal, pub Grant);

/// A tenant admin of a tenant the gateway knows (no user license needed).
pub struct Admin(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        principal(parts).map(Caller)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Author {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let p = principal(parts)?;
        match p.license.clone() {
            Ok(g) => Ok(Author(p, g)),
            Err(d) => Err(denial_error(d)),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let p = principal(parts)?;
        if p.identity.is_admin() {
            if !p.tenant_known {
                return Err(super::unknown_tenant(&p.identity.tenant));
            }
            Ok(Admin(p))
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "NotTenantAdmin",
                "This needs the TenantAdmin role in your token. Ask your organization's administrator.",
            ))
        }
    }
}
