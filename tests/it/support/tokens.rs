//! Keys and tokens for authentication tests: real keys generated per run (aws-lc-rs), tokens
//! signed with `jsonwebtoken`, and hand-made malformed or malicious tokens.

#![allow(dead_code)]

use std::sync::OnceLock;

use aws_lc_rs::{
    encoding::AsDer,
    rsa::KeySize,
    signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A signing key with its public JWK.
pub struct Signer {
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
    pub jwk: Value,
    /// The public key as PEM (for key-confusion attacks).
    pub public_pem: String,
}

impl Signer {
    pub fn ec(kid: &str) -> Self {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let pkcs8 = pair.to_pkcs8v1().unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let spki = pair.public_key().as_der().unwrap();
        Self {
            kid: kid.into(),
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                        "x": b64(&point[1..33]), "y": b64(&point[33..65])}),
            public_pem: pem("PUBLIC KEY", spki.as_ref()),
        }
    }

    pub fn ed(kid: &str) -> Self {
        let pair = Ed25519KeyPair::generate().unwrap();
        let pkcs8 = pair.to_pkcs8().unwrap();
        let public = pair.public_key().as_ref().to_vec();
        Self {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            key: EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(&public)}),
            public_pem: String::new(),
        }
    }

    /// RSA keys are slow to generate: one per test run, under any kid.
    pub fn rsa(kid: &str) -> Self {
        static PAIR: OnceLock<aws_lc_rs::rsa::KeyPair> = OnceLock::new();
        let pair =
            PAIR.get_or_init(|| aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).unwrap());
        let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'static>>::as_der(pair).unwrap();
        let public = pair.public_key();
        let spki = public.as_der().unwrap();
        Self {
            kid: kid.into(),
            alg: Algorithm::RS256,
            key: EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap(),
            jwk: json!({"kty": "RSA", "kid": kid, "alg": "RS256",
                        "n": b64(public.modulus().big_endian_without_leading_zero()),
                        "e": b64(public.exponent().big_endian_without_leading_zero())}),
            public_pem: pem("PUBLIC KEY", spki.as_ref()),
        }
    }

    pub fn header(&self) -> Header {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        header
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with(self.header(), claims)
    }

    pub fn sign_with(&self, header: Header, claims: &Value) -> String {
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// A JWKS document with these signers' public keys.
pub fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

/// Good claims: issuer `https://idp.test`, audience `api`, valid for 10 minutes.
pub fn claims(sub: &str) -> Value {
    let now = now();
    json!({"sub": sub, "iss": "https://idp.test", "aud": "api", "iat": now, "nbf": now - 5, "exp": now + 600,
           "roles": ["reader"], "tenant": "acme"})
}

/// A token assembled by hand: any header, any payload, any signature bytes.
pub fn handmade(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

/// An HS256 token whose secret is `secret` (for key-confusion attempts).
pub fn hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64(tag.as_ref()))
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}
