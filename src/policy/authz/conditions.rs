//! Attribute conditions on a permission: small and declarative, enough for multi-tenant least
//! privilege without a policy language.

use std::fmt;

use serde_json::Value;

use super::RequestFacts;
use crate::{config::model::ConditionConfig, policy::authn::Identity, route::PathPattern};

/// A compiled condition.
#[derive(Debug)]
pub enum Condition {
    /// The permission pattern's `{param}` equals the claim (or an element of an array claim).
    ParamEqualsClaim {
        param: Box<str>,
        claim: Box<str>,
    },
    /// The claim (or an element of it) is one of the values (sorted).
    ClaimIn {
        claim: Box<str>,
        values: Box<[Box<str>]>,
    },
    ClientIpIn(Box<[ipnet::IpNet]>),
}

impl Condition {
    /// Compiles one condition of a permission with pattern `path`; the error names the problem.
    pub fn compile(config: &ConditionConfig, path: &PathPattern) -> Result<Self, String> {
        Ok(match config {
            ConditionConfig::ParamEqualsClaim { param, claim } => {
                if !path.has_param(param) {
                    return Err(format!(
                        "the permission's path has no parameter `{{{param}}}`"
                    ));
                }
                if claim.is_empty() {
                    return Err("`claim` is empty".into());
                }
                Self::ParamEqualsClaim {
                    param: param.as_str().into(),
                    claim: claim.as_str().into(),
                }
            }
            ConditionConfig::ClaimIn { claim, values } => {
                if values.is_empty() {
                    return Err("`values` is empty: the condition could never hold".into());
                }
                let mut values: Vec<Box<str>> = values.iter().map(|v| v.as_str().into()).collect();
                values.sort_unstable();
                Self::ClaimIn {
                    claim: claim.as_str().into(),
                    values: values.into(),
                }
            }
            ConditionConfig::ClientIpIn(networks) => {
                if networks.is_empty() {
                    return Err("no networks: the condition could never hold".into());
                }
                let parsed = networks
                    .iter()
                    .map(|text| {
                        crate::config::parse_cidr(text).ok_or_else(|| {
                            format!("`{text}` is not a CIDR (10.0.0.0/8, 2001:db8::/32)")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Self::ClientIpIn(parsed.into())
            }
        })
    }

    /// The claims this condition reads (the identity must keep them).
    pub fn claim(config: &ConditionConfig) -> Option<&str> {
        match config {
            ConditionConfig::ParamEqualsClaim { claim, .. }
            | ConditionConfig::ClaimIn { claim, .. } => Some(claim),
            ConditionConfig::ClientIpIn(_) => None,
        }
    }

    /// Whether the condition holds for this request; `pattern` is the permission's.
    pub fn holds(
        &self,
        identity: &Identity,
        pattern: &PathPattern,
        facts: &RequestFacts<'_>,
    ) -> bool {
        match self {
            Self::ParamEqualsClaim { param, claim } => {
                let Some(value) = pattern
                    .captures(facts.path)
                    .and_then(|params| params.into_iter().find(|(name, _)| *name == &**param))
                    .map(|(_, value)| value)
                else {
                    return false;
                };
                identity
                    .claim(claim)
                    .is_some_and(|claim| any_scalar(&claim, &|text| text == value))
            }
            Self::ClaimIn { claim, values } => identity.claim(claim).is_some_and(|claim| {
                any_scalar(&claim, &|text| {
                    values.binary_search_by(|v| (**v).cmp(text)).is_ok()
                })
            }),
            Self::ClientIpIn(networks) => networks.iter().any(|n| n.contains(&facts.client_ip)),
        }
    }
}

/// Whether `test` holds for the claim's value as text: a string, a number or boolean by its JSON
/// text, or any of those in an array. Objects never match.
fn any_scalar(value: &Value, test: &dyn Fn(&str) -> bool) -> bool {
    match value {
        Value::String(text) => test(text),
        Value::Number(_) | Value::Bool(_) => test(&value.to_string()),
        Value::Array(items) => items
            .iter()
            .any(|item| !item.is_array() && any_scalar(item, test)),
        Value::Null | Value::Object(_) => false,
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ParamEqualsClaim { param, claim } => {
                write!(f, "path parameter `{param}` equals claim `{claim}`")
            }
            Self::ClaimIn { claim, values } => {
                write!(f, "claim `{claim}` is one of {}", values.join(", "))
            }
            Self::ClientIpIn(networks) => {
                let list: Vec<String> = networks.iter().map(ToString::to_string).collect();
                write!(f, "client address is in {}", list.join(", "))
            }
        }
    }
}
