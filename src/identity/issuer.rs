//! Which configured issuer a token's `iss` names: an exact string, or a multi-tenant template
//! whose `{tid}` stands for one path segment of `[A-Za-z0-9-]` (only the string is matched;
//! the keys come from the entry's key source).

use crate::config::TENANT_PLACEHOLDER;

/// An accepted `iss`, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerPattern {
    /// Exactly this string.
    Exact(String),
    /// `prefix`, one tenant segment, `suffix`.
    Tenant {
        /// What comes before `{tid}`.
        prefix: String,
        /// What comes after `{tid}`.
        suffix: String,
    },
}

/// How an `iss` matched a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssuerMatch<'a> {
    /// An exact issuer.
    Exact,
    /// A template issuer, with the tenant segment the token's `tid` must equal.
    Tenant(&'a str),
}

impl IssuerPattern {
    /// The pattern of a configured issuer (the first `{tid}` is the placeholder; validation
    /// refuses a second).
    pub fn parse(issuer: &str) -> Self {
        match issuer.split_once(TENANT_PLACEHOLDER) {
            Some((prefix, suffix)) => Self::Tenant { prefix: prefix.into(), suffix: suffix.into() },
            None => Self::Exact(issuer.into()),
        }
    }

    /// Whether `iss` is of this pattern, and with which tenant segment.
    pub fn matches<'a>(&self, iss: &'a str) -> Option<IssuerMatch<'a>> {
        match self {
            Self::Exact(s) => (s == iss).then_some(IssuerMatch::Exact),
            Self::Tenant { prefix, suffix } => {
                let segment = iss.strip_prefix(prefix.as_str())?.strip_suffix(suffix.as_str())?;
                let ok =
                    !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                ok.then_some(IssuerMatch::Tenant(segment))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_matches_one_segment_of_plain_characters() {
        let p = IssuerPattern::parse("https://login.example/{tid}/v2.0");
        assert_eq!(p.matches("https://login.example/contoso-1/v2.0"), Some(IssuerMatch::Tenant("contoso-1")));
        for bad in [
            "https://login.example//v2.0",
            "https://login.example/a/b/v2.0",
            "https://login.example/a.b/v2.0",
            "https://login.example/a%2Fb/v2.0",
            "https://login.example/a_b/v2.0",
            "https://login.example/contoso/v2.0/",
            "http://login.example/contoso/v2.0",
        ] {
            assert_eq!(p.matches(bad), None, "{bad}");
        }
        let exact = IssuerPattern::parse("http://a.example");
        assert_eq!(exact.matches("http://a.example"), Some(IssuerMatch::Exact));
        assert_eq!(exact.matches("http://a.example/"), None);
    }
}
