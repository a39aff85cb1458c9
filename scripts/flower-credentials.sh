#!/usr/bin/env bash
# Credentials for a Flower deployment of fedit: a private CA, the SuperLink's TLS
# certificate signed by it, and one ECDSA key pair per SuperNode (node authentication).
#   scripts/flower-credentials.sh OUT_DIR [NODES] [EXTRA_SANS]
#   scripts/flower-credentials.sh creds 2 "DNS:fl.example.org,IP:10.0.0.5"
# OUT_DIR/ca.crt          give to every SuperNode and `flwr` user (--root-certificates)
# OUT_DIR/ca.key          keep offline: it signs the next server certificate (rotation)
# OUT_DIR/server.pem/.key the SuperLink's certificate and key (--ssl-certfile/--ssl-keyfile)
# OUT_DIR/node-K, .pub    SuperNode K's private key (stays on its machine) and public key
#                         (registered with `flwr supernode register node-K.pub CONNECTION`)
# The server certificate names 127.0.0.1 and localhost plus EXTRA_SANS (the address the
# SuperNodes dial). Nothing is overwritten: a new OUT_DIR is a new set of credentials,
# and an existing ca.key in OUT_DIR is reused to sign a fresh server certificate.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [NODES] [EXTRA_SANS]}
nodes=${2:-2}
extra=${3:-}
days=${FEDIT_CERT_DAYS:-365}
mkdir -p "$out"
cd "$out"
umask 077

if [[ ! -f ca.key ]]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=fedit private CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt 2>/dev/null
fi

sans="IP:127.0.0.1,DNS:localhost${extra:+,$extra}"
stamp=$(date +%Y%m%d%H%M%S)-$$
openssl ecparam -name prime256v1 -genkey -noout -out "server-$stamp.key"
openssl req -new -key "server-$stamp.key" -subj "/CN=fedit SuperLink" -out server.csr 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$sans" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
  -sha256 -extfile server.ext -out "server-$stamp.pem" 2>/dev/null
rm -f server.csr server.ext
ln -sf "server-$stamp.pem" server.pem
ln -sf "server-$stamp.key" server.key

for ((k = 0; k < nodes; k++)); do
  [[ -f node-$k ]] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedit node $k" -f "node-$k"
done
chmod 644 ca.crt server-*.pem ./*.pub
echo "credentials in $out: ca.crt, server.pem (SAN $sans), server.key, node-0..$((nodes - 1))"
