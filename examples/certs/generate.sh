#!/bin/sh
# Regenerates the example certificates used by examples/tls.yaml: a self-signed CA and two
# leaf certificates it signs (api.example.test and *.internal.example.test). Keys are PKCS#8 PEM
# (ECDSA P-256); everything is valid for 10 years. These are for trying Portcullis out only:
# the private keys are public, never use them for anything real.
set -eu
cd "$(dirname "$0")"
days=3650
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# the CA (its key is thrown away: nothing else is ever signed with it)
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/ca.key"
openssl req -x509 -new -key "$tmp/ca.key" -sha256 -days "$days" \
  -subj "/CN=Portcullis Example CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.pem

leaf() { # leaf NAME DNS
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$tmp/$1.csr"
  printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=DNS:$2" > "$tmp/$1.ext"
  openssl x509 -req -in "$tmp/$1.csr" -CA ca.pem -CAkey "$tmp/ca.key" -CAcreateserial \
    -CAserial "$tmp/ca.srl" -days "$days" -sha256 -extfile "$tmp/$1.ext" -out "$1.pem"
}
leaf api api.example.test
leaf internal '*.internal.example.test'
